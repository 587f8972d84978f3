// What a module image (a CUBIN: an ELF file for the GPU) takes of the GPU's
// memory when the driver loads it, read from the image before it is loaded.
//
// A module's `__device__` and `__managed__` variables are allocated by
// cuModuleLoadData, outside every buffer a job or session declares: one
// line of kernel source (`__device__ char big[1ull << 36];`) would
// otherwise take 64 GiB of the GPU for as long as the module stays loaded.
// Uninitialized variables live in NOBITS sections, whose size is not
// bounded by the image's own size, and the section header's size field is
// not to be trusted alone (a 16 GiB array was seen in a section whose
// header said 16 KiB): each section counts to its furthest symbol.
#pragma once

#include <cstdint>
#include <string_view>

#include "util/status.h"

namespace gpuq::worker {

// Device memory that a module and its kernels take beyond the buffers of
// the jobs and sessions that use them (below): the
// module's variables and code, allocated when it loads, and the local
// memory (per-thread stack and arrays) the driver reserves for every
// thread the device can hold at once, kept grown after the kernel that
// needed it. Each is bounded; 0 means no bound.
struct ModuleBounds {
  uint64_t module_bytes = 64ull << 20;
  uint64_t local_bytes = 4ull << 30;
  uint64_t resident_threads = 0;  // multiprocessors × threads each; 0: not checked
};

// The bytes of device memory the image's loadable sections span: every
// section the loader allocates (SHF_ALLOC: code, constant banks, global
// variables initialized or not), each to the end of its furthest symbol,
// but for shared memory (on the multiprocessor, per block, checked at
// launch). kInvalid for anything but a well-formed 64-bit little-endian
// ELF image whose tables lie within it.
StatusOr<uint64_t> ModuleDeviceBytes(std::string_view image);

// True if `image` starts as an ELF file does (a CUBIN; otherwise PTX).
bool IsElfImage(std::string_view image);

}  // namespace gpuq::worker
