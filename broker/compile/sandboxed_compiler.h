// Runs NVRTC compiles in confined child processes (gpuq-nvrtc), one process
// per compile, bounded in wall time and memory. See nvrtc_sandbox_main.cc for
// the confinement and sandbox_io.h for the protocol.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>

#include "broker/compile/compile_request.h"
#include "broker/compile/unique_fd.h"

namespace gpuq::compile {

struct SandboxLimits {
  std::chrono::milliseconds wall{10000};
  uint64_t memory_bytes = 4ull << 30;  // data the helper may write (RLIMIT_DATA)
};

struct SandboxOptions {
  std::string helper_path;   // empty: DefaultHelperPath()
  std::string cuda_include;  // empty: DefaultCudaInclude(); resolved to its real path
  SandboxLimits limits;
  // Helpers enter a user and mount namespace that shows them only the
  // toolkit's headers, where the kernel allows it (else Landlock alone, as
  // with false).
  bool namespaces = true;
};

// How a helper is confined (the helper says so; see sandbox_io.h).
enum class Isolation { kNamespaces, kLandlock };
std::string_view IsolationName(Isolation i);

// One started helper process and the ends of its pipes. Move-only: the one
// owner kills (SIGKILL) and reaps the process on destruction unless it was
// reaped already, so no exit path leaves a zombie or a runaway compiler.
// Not thread-safe: one thread at a time.
class Helper {
 public:
  Helper(Helper&& o) noexcept;
  Helper& operator=(Helper&& o) noexcept;
  ~Helper();

  pid_t pid() const { return pid_; }
  // Whether WaitReady() has succeeded.
  bool ready() const { return ready_; }
  // Waits until the helper says it is confined and waiting for its request,
  // or until `deadline`. Errors: kTimeout at the deadline; kUnavailable when
  // it cannot confine itself (no Landlock), or when `cancel_fd` (if not -1)
  // became readable; kInternal when it died first.
  StatusOr<Isolation> WaitReady(std::chrono::steady_clock::time_point deadline,
                                int cancel_fd = -1);
  // True while a ready helper waits, alive, for its request (it has written
  // nothing more and closed nothing). Does not block.
  bool Waiting() const;

 private:
  friend class SandboxedCompiler;
  friend class HelperPool;  // watches out_ of the helpers it starts
  Helper(pid_t pid, UniqueFd in, UniqueFd out, UniqueFd err);
  void Kill();
  int Reap();  // waits for the exit; returns the wait status
  // Waits for the exit until `deadline`, then kills it; returns the status.
  int ReapBy(std::chrono::steady_clock::time_point deadline);
  // What it wrote on stderr and nobody read yet (the head); does not block.
  std::string DrainStderr();

  pid_t pid_ = -1;
  bool reaped_ = true;  // nothing to kill or reap (none, moved from, or reaped)
  UniqueFd pidfd_;
  UniqueFd in_, out_, err_;  // its stdin, stdout and stderr
  bool ready_ = false;
  Isolation isolation_ = Isolation::kLandlock;
};

// Thread-safe: helpers are independent processes, so a hung or runaway
// compile holds up only its own caller. The process must not reap children
// it did not start with a catch-all waitpid(-1); SIGPIPE is ignored from the
// first construction on (a helper that dies mid-request must not kill us).
// PR_SET_PDEATHSIG ties each helper to the thread that started it: start
// helpers on threads that outlive them.
class SandboxedCompiler {
 public:
  explicit SandboxedCompiler(SandboxOptions options = {});

  // Starts a helper. It warms NVRTC up on a fixed kernel compiled for
  // `warm_arch` (when it names an architecture NVRTC can target; else the
  // newest), confines itself and waits for one request; Run() serves it.
  // Errors: kUnavailable (no helper program, spawn failed),
  // kResourceExhausted (no pipes).
  StatusOr<Helper> Start(const std::string& warm_arch = {}) const;

  // Serves one request with `helper`; waits for it to be ready first if it
  // is not. The wall limit runs from this call. Returns once the reply is
  // whole, without waiting for the helper to exit: afterwards `helper` is
  // spent (exited or exiting); destroy it (which reaps it) or hand it to
  // HelperPool::Retire(). A compile that NVRTC rejects is a CompileOutput
  // with ok == false. Errors: kTimeout (wall or CPU time ran out; the helper
  // was killed), kResourceExhausted (the helper died, most often at the
  // memory limit, or its output is too large), kUnavailable (no Landlock; or
  // `cancel_fd` became readable, which kills the helper: a way to stop a
  // compile from another thread), kInternal (bad reply).
  StatusOr<CompileOutput> Run(Helper& helper, const CompileRequest& request,
                              int cancel_fd = -1) const;

  // Start(), then Run().
  StatusOr<CompileOutput> Compile(const CompileRequest& request) const;

  const SandboxOptions& options() const { return options_; }

 private:
  SandboxOptions options_;
};

// gpuq-nvrtc beside the running executable, or $GPUQ_NVRTC_HELPER.
std::string DefaultHelperPath();
// $GPUQ_CUDA_INCLUDE, else the toolkit's include directory found at build
// time, else /usr/local/cuda/include; resolved to its real path.
std::string DefaultCudaInclude();

}  // namespace gpuq::compile
