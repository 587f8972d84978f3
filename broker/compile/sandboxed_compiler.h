// Runs one NVRTC compile in a confined child process (gpuq-nvrtc) and bounds
// it in wall time and memory. See nvrtc_sandbox_main.cc for the confinement.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "broker/compile/compile_request.h"

namespace gpuq::compile {

struct SandboxLimits {
  std::chrono::milliseconds wall{10000};
  uint64_t memory_bytes = 4ull << 30;  // address space of the helper
};

// Thread-safe: each Compile() spawns its own helper, so a hung or runaway
// compile holds up only its own caller. The process must not reap children
// it did not start with a catch-all waitpid(-1); SIGPIPE is ignored from the
// first construction on (a helper that dies mid-request must not kill us).
class SandboxedCompiler {
 public:
  // Empty arguments take the defaults below.
  SandboxedCompiler(std::string helper_path = "", std::string cuda_include = "");

  // A compile that NVRTC rejects is a CompileOutput with ok == false. Errors:
  // kTimeout (wall or CPU time ran out; the helper was killed),
  // kResourceExhausted (the helper died, most often at the memory limit),
  // kUnavailable (no helper, no Landlock), kInternal (bad reply).
  StatusOr<CompileOutput> Compile(const CompileRequest& request,
                                  const SandboxLimits& limits) const;

  const std::string& helper_path() const { return helper_path_; }
  const std::string& cuda_include() const { return cuda_include_; }

 private:
  std::string helper_path_;
  std::string cuda_include_;
};

// gpuq-nvrtc beside the running executable, or $GPUQ_NVRTC_HELPER.
std::string DefaultHelperPath();
// $GPUQ_CUDA_INCLUDE, else the toolkit's include directory found at build
// time, else /usr/local/cuda/include; resolved to its real path.
std::string DefaultCudaInclude();

}  // namespace gpuq::compile
