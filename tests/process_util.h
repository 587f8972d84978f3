// Real processes for integration tests: gpuqd and worker test doubles,
// started, signalled and reaped by the test.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <string>
#include <vector>

namespace gpuq::testing {

// A child process; killed (SIGKILL) and reaped on destruction.
class Process {
 public:
  Process() = default;
  ~Process();
  Process(Process&& o) noexcept;
  Process& operator=(Process&& o) noexcept;

  // Starts argv[0] with stdout and stderr appended to `log`.
  static Process Start(const std::vector<std::string>& argv, const std::string& log);
  pid_t pid() const { return pid_; }
  bool running();
  void Signal(int sig);
  // Sends SIGKILL and reaps.
  void Kill();
  // Waits up to `timeout` for an exit; returns the exit status or -1.
  int Wait(std::chrono::milliseconds timeout);

 private:
  pid_t pid_ = -1;
};

// gpuqd on ipc endpoints in `dir`, with its store and cache there.
class BrokerProcess {
 public:
  // `workers`: gpuqd's --workers ("0": none; "-1": one per visible GPU).
  BrokerProcess(std::string dir, std::vector<std::string> extra = {},
                std::string workers = "0");
  // Starts (or restarts) it and waits until it serves. Returns false if it
  // did not come up.
  bool Start();
  void Kill() { process_.Kill(); }
  // SIGTERM, and wait for a clean exit; returns the exit status.
  int Stop();
  Process& process() { return process_; }
  std::string client_endpoint() const { return "ipc://" + dir_ + "/client.sock"; }
  std::string worker_endpoint() const { return "ipc://" + dir_ + "/workers.sock"; }
  std::string store() const { return dir_ + "/jobs.db"; }
  int metrics_port() const { return metrics_port_; }
  size_t resumed() const { return resumed_; }

 private:
  std::string dir_;
  std::vector<std::string> extra_;
  std::string workers_;
  Process process_;
  int metrics_port_ = 0;
  size_t resumed_ = 0;
};

}  // namespace gpuq::testing
