// The device a worker test double announces in `ready`: `arch` ("sm_90")
// gives its compute capability; 16 GiB, all free; the usual limits.
#pragma once

#include <string>

#include "schema/messages.h"

namespace gpuq::testing {

inline schema::DeviceInfo FakeDevice(const std::string& name, const std::string& uuid,
                                     const std::string& arch) {
  schema::DeviceInfo d;
  d.name = name;
  d.uuid = uuid;
  d.cc_major = static_cast<uint32_t>(std::stoi(arch.substr(3, arch.size() - 4)));
  d.cc_minor = static_cast<uint32_t>(arch.back() - '0');
  d.total_bytes = d.free_bytes = 1ull << 34;
  d.max_threads_per_block = 1024;
  d.max_block = {1024, 1024, 64};
  d.max_grid = {2147483647, 65535, 65535};
  return d;
}

}  // namespace gpuq::testing
