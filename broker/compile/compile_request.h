// What the compile service is asked to build, and what one compile produces.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "schema/messages.h"
#include "util/status.h"

namespace gpuq::compile {

struct CompileRequest {
  std::string source;
  std::string source_name = "kernel.cu";
  std::vector<schema::NamedHeader> headers;
  std::vector<std::string> options;           // checked by ValidateOptions
  std::vector<std::string> name_expressions;  // C++ names to lower ("f<int>")
  std::string arch;                           // "sm_90" (CUBIN+PTX) or "compute_90" (PTX)
};

struct LoweredName {
  std::string expression, lowered;
  bool operator==(const LoweredName&) const = default;
};

// The outcome of one NVRTC run inside the sandbox. A compile that NVRTC
// rejects is an outcome (ok == false, code kCompileError or
// kSandboxViolation, log set), not a Status error: it is deterministic and
// is cached like a success.
struct CompileOutput {
  bool ok = false;
  Code code = Code::kOk;
  std::string log;
  std::string ptx, cubin;
  std::vector<LoweredName> lowered;
  uint64_t nvrtc_us = 0;  // time inside nvrtcCompileProgram
};

// A compile log is kept to its first kMaxLogBytes (a few includes of a
// header full of warnings make NVRTC write a hundred megabytes: the log
// travels in every failed job's error, whose bound on the wire is 1 MiB, and
// fills the kernel cache). TruncateLog cuts a longer one, saying so.
inline constexpr size_t kMaxLogBytes = 256 << 10;
void TruncateLog(std::string* log);

// NVRTC's own diagnostic `what` ("cannot open source file \"",
// "out of memory") as a catastrophic error, on a line of its own: never a
// source line the log echoes (indented), nor the text of an #error or
// #warning directive, which a kernel's author writes.
bool HasCatastrophicError(std::string_view log, std::string_view what);

// Rejects options that are not on the allowed list (compile_options.cc):
// anything that names files (-I, --pre-include, --time, ...), sets the
// architecture (the service does), or changes what is produced.
Status ValidateOptions(const std::vector<std::string>& options);

// "sm_90", "sm_90a", "sm_100f" or "compute_90".
Status ValidateArch(const std::string& arch);

// The virtual architectures this process's NVRTC can compile for, ascending
// (nvrtcGetSupportedArchs: 75, 80, ..., 121 for CUDA 13.0, which dropped
// everything before 75). Asked once; thread-safe.
const std::vector<int>& SupportedArchs();

// Whether `arch` is valid (ValidateArch) and its number is one of
// SupportedArchs(): CanTarget("sm_90") and CanTarget("compute_80a") are
// true with CUDA 13, CanTarget("sm_70") is false. Thread-safe, cheap.
bool CanTarget(const std::string& arch);

}  // namespace gpuq::compile
