# What `cmake --install` puts under the prefix: the public headers, the
# client libraries with a CMake package (find_package(gpuq): gpuq::client,
# gpuq::c) and pkg-config files (gpuq.pc: the C API; gpuq-client.pc: the C++
# client); in a full build also the programs and systemd units.
include(CMakePackageConfigHelpers)

install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/gpuq DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}
        FILES_MATCHING PATTERN "*.h")
install(FILES ${PROJECT_BINARY_DIR}/include/gpuq/version.h
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/gpuq)
install(TARGETS gpuq_status gpuq_schema gpuq_fileio gpuq_client gpuq_c gpuq_c_static
        EXPORT gpuqTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})

set(GPUQ_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/gpuq)
install(EXPORT gpuqTargets NAMESPACE gpuq:: DESTINATION ${GPUQ_CMAKE_DIR})
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/gpuqConfig.cmake.in
                              ${PROJECT_BINARY_DIR}/gpuqConfig.cmake
                              INSTALL_DESTINATION ${GPUQ_CMAKE_DIR})
# 0.x: a new minor version may change the interface.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/gpuqConfigVersion.cmake
                                 COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/gpuqConfig.cmake ${PROJECT_BINARY_DIR}/gpuqConfigVersion.cmake
        DESTINATION ${GPUQ_CMAKE_DIR})

# From LIBDIR/pkgconfig up to the prefix.
file(RELATIVE_PATH GPUQ_PC_UP /prefix/${CMAKE_INSTALL_LIBDIR}/pkgconfig /prefix)
foreach(pc gpuq gpuq-client)
  configure_file(${PROJECT_SOURCE_DIR}/cmake/${pc}.pc.in ${PROJECT_BINARY_DIR}/${pc}.pc @ONLY)
  install(FILES ${PROJECT_BINARY_DIR}/${pc}.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
endforeach()

if(GPUQ_CLIENT_ONLY)
  return()
endif()

# The programs; gpuqd finds gpuq-nvrtc and gpuq-worker beside itself.
install(TARGETS gpuqd gpuq-worker gpuq-session gpuq-nvrtc gpuq RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
# The systemd units name the programs where the install puts them (the
# prefix is the one given at install time: `cmake --install --prefix`).
foreach(unit gpuqd.service gpuq-worker.service)
  install(CODE "
    file(READ \"${PROJECT_SOURCE_DIR}/docker/systemd/${unit}\" text)
    string(REPLACE \"/usr/local/bin/\" \"\${CMAKE_INSTALL_PREFIX}/${CMAKE_INSTALL_BINDIR}/\" text \"\${text}\")
    file(WRITE \"${PROJECT_BINARY_DIR}/systemd/${unit}\" \"\${text}\")
  ")
  install(FILES ${PROJECT_BINARY_DIR}/systemd/${unit} DESTINATION lib/systemd/system)
endforeach()
