// Starts and supervises gpuq-worker processes, one per GPU: a worker that
// exits is started again with backoff (100 ms doubling to 5 s, reset once it
// has run 30 s). A worker is a process, not a thread, because after a kernel
// faults nothing in its process can use the GPU again (docs/DESIGN.md,
// "Processes").
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "worker/exit_codes.h"

namespace gpuq::worker {

// The program `name` in the running executable's directory.
std::string Beside(const std::string& name);

class WorkerSupervisor {
 public:
  // `worker_bin` empty: gpuq-worker beside the running executable.
  // `extra_args` are passed to every worker (CURVE key options, say).
  WorkerSupervisor(std::string broker_endpoint, std::string worker_bin, int heartbeat_ms,
                   std::vector<std::string> extra_args = {});
  ~WorkerSupervisor();

  // Starts `count` workers, or one per visible GPU when count < 0 (asks
  // `gpuq-worker --count`). Logs plainly when there is no driver or no GPU.
  void Start(int count);
  // Stops every worker (SIGTERM, then SIGKILL after 2 s) and waits for them.
  void Stop();
  // Workers started (and kept running) by Start().
  size_t started();
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

  const std::string endpoint_, bin_;
  const int heartbeat_ms_;
  const std::vector<std::string> extra_args_;
  std::mutex mu_;
  std::vector<Child> children_;  // GUARDED_BY(mu_)
  std::atomic<bool> stop_{false};
  std::atomic<int> restarts_{0};
  std::thread thread_;
};

}  // namespace gpuq::worker
