// Warm compile helpers: a few gpuq-nvrtc processes kept started, warmed up
// and confined, each waiting for one request, so that a compile does not
// wait for a process to start and NVRTC to pay its first-use cost.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <deque>
#include <string>
#include <thread>
#include <vector>

#include "broker/compile/sandboxed_compiler.h"
#include "util/mutex.h"
#include "util/thread_annotations.h"

namespace gpuq::compile {

// Keeps `warm` helpers ready. A helper serves one request and exits, so each
// one taken is replaced by a starter thread that the pool owns (helpers die
// with the thread that started them: see SandboxedCompiler). Replacements
// start once no helper taken is still at work, or at once when none is left
// waiting: a replacement warming up does not take a core from the compile
// that made room for it unless the pool would otherwise run dry. A helper
// that fails to become ready is dropped and the next start is delayed, up to
// 10 s, so that a broken helper does not become a fork loop. Thread-safe.
class HelperPool {
 public:
  // `compiler` must outlive the pool. warm == 0: no starter thread, Take()
  // starts each helper itself.
  HelperPool(const SandboxedCompiler* compiler, size_t warm);
  // Stops the starter thread and kills the helpers still waiting.
  ~HelperPool();
  HelperPool(const HelperPool&) = delete;
  HelperPool& operator=(const HelperPool&) = delete;

  // A ready helper when one is waiting; else one the starter thread has
  // begun, once ready, when there are more begun than callers waiting for
  // them; else a new one started on the calling thread (Run() waits for it
  // to be ready). Each helper taken, started or not, must be given back to
  // Retire() once spent. Errors: those of SandboxedCompiler::Start().
  StatusOr<Helper> Take() LOCKS_EXCLUDED(mu_);

  // Takes back a helper from Take() once it has served its request (or
  // failed to): the starter thread reaps it, so the caller does not wait
  // for its exit. Also counts it as no longer at work.
  void Retire(Helper spent) LOCKS_EXCLUDED(mu_);

  // The architecture helpers started from now on warm NVRTC up for (the
  // one compiled for last: see SandboxedCompiler::Start).
  void NoteArch(const std::string& arch) LOCKS_EXCLUDED(mu_);

  // Blocks until `warm` helpers are ready and waiting, or `timeout` passes;
  // returns whether they are. For benchmarks and tests.
  bool WaitUntilWarm(std::chrono::milliseconds timeout) LOCKS_EXCLUDED(mu_);

  // The process ids of the helpers ready and waiting now. For tests.
  std::vector<pid_t> WaitingPids() LOCKS_EXCLUDED(mu_);

  struct Counts {
    uint64_t warm = 0;  // helpers Take() gave out ready, or once ready
    uint64_t cold = 0;  // helpers Take() started on its caller's thread
  };
  Counts counts() LOCKS_EXCLUDED(mu_);

 private:
  void StarterLoop() LOCKS_EXCLUDED(mu_);

  const SandboxedCompiler* const compiler_;
  const size_t warm_;
  Mutex mu_;
  CondVar changed_{&mu_};  // a helper became ready or was taken, or stopping
  std::deque<Helper> waiting_ GUARDED_BY(mu_);  // ready, oldest first
  size_t starting_ GUARDED_BY(mu_) = 0;         // begun by the starter thread
  size_t takers_waiting_ GUARDED_BY(mu_) = 0;   // Take() calls waiting for those
  size_t at_work_ GUARDED_BY(mu_) = 0;          // taken and not yet retired
  std::vector<Helper> retired_ GUARDED_BY(mu_);  // spent, for the starter to reap
  bool stop_ GUARDED_BY(mu_) = false;
  std::string warm_arch_ GUARDED_BY(mu_);
  Counts counts_ GUARDED_BY(mu_);
  std::thread starter_;
};

}  // namespace gpuq::compile
