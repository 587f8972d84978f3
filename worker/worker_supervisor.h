// Starts and supervises gpuq-worker processes, one per GPU: a worker that
// exits is started again with backoff (100 ms doubling to 5 s, reset once it
// has run 30 s). A worker is a process, not a thread, because after a kernel
// faults nothing in its process can use the GPU again (docs/DESIGN.md,
// "Processes").
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "util/mutex.h"
#include "worker/exit_codes.h"

namespace gpuq::worker {

// The program `name` in the running executable's directory.
std::string Beside(const std::string& name);

// For a process a supervisor started (its --parent-pid): SIGTERM comes when
// the thread that started it ends, which the supervisor's does only when it
// stops or its process dies, however it dies (a SIGKILLed gpuqd left its
// workers connecting to the next gpuqd beside the ones that one starts).
// False when `parent` is no longer this process's parent (it ended first).
bool EndWithParent(pid_t parent);

class WorkerSupervisor {
 public:
  // `worker_bin` empty: gpuq-worker beside the running executable.
  // `extra_args` are passed to every worker (CURVE key options, say).
  WorkerSupervisor(std::string broker_endpoint, std::string worker_bin, int heartbeat_ms,
                   std::vector<std::string> extra_args = {});
  ~WorkerSupervisor();

  // Starts `count` workers, or one per visible GPU when count < 0 (asks
  // `gpuq-worker --count`). Logs plainly when there is no driver or no GPU.
  // Each worker ends with the supervisor (--parent-pid: EndWithParent).
  void Start(int count);
  // Stops every worker (SIGTERM, then SIGKILL after 2 s) and waits for them.
  void Stop();
  // Workers started (and kept running) by Start(): those retired (no
  // driver, no such GPU) no longer count.
  size_t started();
  // Called with started() once Start() has its workers (on its caller's
  // thread) and each time one is retired (on the supervisor's): in that
  // order, so the last call holds the count. Set before Start().
  void OnCount(std::function<void(size_t)> f) { on_count_ = std::move(f); }
  // Restarts so far (for tests and stats).
  int restarts() const { return restarts_.load(); }

 private:
  struct Child {
    int ordinal;
    pid_t pid = -1;
    std::chrono::steady_clock::time_point started, next_start;
    std::chrono::milliseconds backoff{100};
    bool retired = false;
  };
  void Loop();
  pid_t Spawn(int ordinal);
  size_t Kept() const EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string endpoint_, bin_;
  const int heartbeat_ms_;
  const std::vector<std::string> extra_args_;
  Mutex mu_;
  std::vector<Child> children_ GUARDED_BY(mu_);
  std::atomic<bool> stop_{false};
  std::atomic<int> restarts_{0};
  std::function<void(size_t)> on_count_;  // set before the thread starts
  std::thread thread_;
};

}  // namespace gpuq::worker
