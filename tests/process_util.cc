#include "tests/process_util.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <thread>

#include "tests/test_util.h"

namespace gpuq::testing {

Process::~Process() { Kill(); }

Process::Process(Process&& o) noexcept : pid_(o.pid_) { o.pid_ = -1; }

Process& Process::operator=(Process&& o) noexcept {
  if (this != &o) {
    Kill();
    pid_ = o.pid_;
    o.pid_ = -1;
  }
  return *this;
}

Process Process::Start(const std::vector<std::string>& argv, const std::string& log) {
  Process p;
  // PR_SET_PDEATHSIG fires when the forking *thread* ends, so only children
  // of the main thread get it; the others rely on ~Process().
  const bool main_thread = gettid() == getpid();
  pid_t pid = fork();
  if (pid == 0) {
    // Dies with the test, even when the test is killed.
    if (main_thread) prctl(PR_SET_PDEATHSIG, SIGKILL);
    int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
      close(fd);
    }
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  p.pid_ = pid;
  return p;
}

bool Process::running() {
  if (pid_ <= 0) return false;
  int status;
  if (waitpid(pid_, &status, WNOHANG) == pid_) {
    pid_ = -1;
    return false;
  }
  return true;
}

void Process::Signal(int sig) {
  if (pid_ > 0) kill(pid_, sig);
}

void Process::Kill() {
  if (pid_ <= 0) return;
  kill(pid_, SIGKILL);
  waitpid(pid_, nullptr, 0);
  pid_ = -1;
}

int Process::Wait(std::chrono::milliseconds timeout) {
  const auto until = std::chrono::steady_clock::now() + timeout;
  while (pid_ > 0 && std::chrono::steady_clock::now() < until) {
    int status;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return -1;
}

BrokerProcess::BrokerProcess(std::string dir, std::vector<std::string> extra,
                             std::string workers)
    : dir_(std::move(dir)), extra_(std::move(extra)), workers_(std::move(workers)) {}

bool BrokerProcess::Start() {
  process_.Kill();
  const std::string ready = dir_ + "/ready.json";
  std::filesystem::remove(ready);
  std::vector<std::string> argv = {BinPath("gpuqd"),
                                   "--listen", client_endpoint(),
                                   "--worker-listen", worker_endpoint(),
                                   "--store", store(),
                                   "--cache", dir_ + "/kernels.db",
                                   "--workers", workers_,
                                   "--metrics", "127.0.0.1:0",
                                   "--ready-file", ready,
                                   "--log-level", "debug"};
  // A test may choose its own heartbeat (a raw worker answers slowly).
  if (std::find(extra_.begin(), extra_.end(), "--heartbeat-ms") == extra_.end()) {
    argv.insert(argv.end(), {"--heartbeat-ms", TestHeartbeatMs()});
  }
  argv.insert(argv.end(), extra_.begin(), extra_.end());
  process_ = Process::Start(argv, dir_ + "/gpuqd.log");
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (std::chrono::steady_clock::now() < until) {
    if (std::filesystem::exists(ready)) {
      auto j = nlohmann::json::parse(ReadFile(ready), nullptr, false);
      if (!j.is_discarded()) {
        metrics_port_ = j.value("metrics_port", 0);
        resumed_ = j.value("resumed", 0);
        return true;
      }
    }
    if (!process_.running()) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return false;
}

int BrokerProcess::Stop() {
  process_.Signal(SIGTERM);
  int rc = process_.Wait(std::chrono::seconds(10));
  process_.Kill();
  return rc;
}

}  // namespace gpuq::testing
