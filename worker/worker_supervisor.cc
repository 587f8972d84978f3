#include "worker/worker_supervisor.h"

#include <limits.h>
#include <signal.h>
#include <spawn.h>
#include <spdlog/spdlog.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <optional>

extern char** environ;

namespace gpuq::worker {

std::string Beside(const std::string& name) {
  char buf[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  std::filesystem::path exe(std::string(buf, n > 0 ? n : 0));
  return (exe.parent_path() / name).string();
}

bool EndWithParent(pid_t parent) {
  if (prctl(PR_SET_PDEATHSIG, SIGTERM) != 0) return false;
  // A parent that ended before the call above has left this process to
  // another (init, a subreaper): no signal will come.
  return getppid() == parent;
}

namespace {

pid_t SpawnArgs(const std::vector<std::string>& args) {
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  // Nothing of gpuqd's but the standard three: connections accepted
  // without O_CLOEXEC (the metrics server's) stayed open in every worker.
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addclosefrom_np(&fa, 3);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) spdlog::warn("cannot start {}: {}", argv[0], strerror(rc));
  return rc == 0 ? pid : -1;
}

}  // namespace

WorkerSupervisor::WorkerSupervisor(std::string broker_endpoint, std::string worker_bin,
                                   int heartbeat_ms, std::vector<std::string> extra_args)
    : endpoint_(std::move(broker_endpoint)),
      bin_(worker_bin.empty() ? Beside("gpuq-worker") : std::move(worker_bin)),
      heartbeat_ms_(heartbeat_ms),
      extra_args_(std::move(extra_args)) {}

WorkerSupervisor::~WorkerSupervisor() { Stop(); }

pid_t WorkerSupervisor::Spawn(int ordinal) {
  std::vector<std::string> args = {bin_, "--broker", endpoint_, "--device", std::to_string(ordinal),
                                   "--heartbeat-ms", std::to_string(heartbeat_ms_),
                                   "--parent-pid", std::to_string(getpid())};
  args.insert(args.end(), extra_args_.begin(), extra_args_.end());
  return SpawnArgs(args);
}

size_t WorkerSupervisor::started() {
  MutexLock lock(&mu_);
  return Kept();
}

size_t WorkerSupervisor::Kept() const {
  return std::count_if(children_.begin(), children_.end(),
                       [](const Child& c) { return !c.retired; });
}

void WorkerSupervisor::Start(int count) {
  if (access(bin_.c_str(), X_OK) != 0) {
    spdlog::warn("no GPU worker attached: {} is missing", bin_);
    return;
  }
  if (count < 0) {
    // The worker counts the GPUs; the broker never loads the driver itself.
    int fds[2];
    if (pipe(fds) != 0) return;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, fds[1], 1);
    posix_spawn_file_actions_addclosefrom_np(&fa, 3);
    std::string b = bin_, flag = "--count";
    char* argv[] = {b.data(), flag.data(), nullptr};
    pid_t pid = -1;
    int rc = posix_spawn(&pid, argv[0], &fa, nullptr, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    close(fds[1]);
    char buf[64] = {};
    ssize_t n = 0;
    if (rc == 0) {
      // A signal (a reload's SIGHUP) is not the end of the answer.
      do {
        n = read(fds[0], buf, sizeof buf - 1);
      } while (n < 0 && errno == EINTR);
    }
    close(fds[0]);
    int status = 0;
    if (rc == 0) {
      while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
    }
    const int exit = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    if (rc != 0 || exit == kExitNoDriver) {
      spdlog::warn("no GPU worker attached: no CUDA driver on this machine "
                   "(queue, compile and stats still serve)");
      return;
    }
    count = n > 0 ? atoi(buf) : 0;
    if (count <= 0) {
      spdlog::warn("no GPU worker attached: the CUDA driver sees no GPU "
                   "(queue, compile and stats still serve)");
      return;
    }
  }
  {
    MutexLock lock(&mu_);
    for (int i = 0; i < count; ++i) {
      Child c;
      c.ordinal = i;
      c.next_start = std::chrono::steady_clock::now();
      children_.push_back(c);
    }
  }
  spdlog::info("supervising {} GPU worker(s)", count);
  if (on_count_) on_count_(static_cast<size_t>(count));  // before any retirement
  thread_ = std::thread([this] { Loop(); });
}

void WorkerSupervisor::Loop() {
  using namespace std::chrono;
  while (!stop_.load()) {
    std::optional<size_t> retired;  // started() after a retirement
    {
      MutexLock lock(&mu_);
      const auto now = steady_clock::now();
      for (Child& c : children_) {
        if (c.retired) continue;
        if (c.pid > 0) {
          int status = 0;
          if (waitpid(c.pid, &status, WNOHANG) != c.pid) continue;
          const int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
          c.pid = -1;
          if (code == kExitNoDriver || code == kExitNoDevice) {
            spdlog::warn("worker for GPU {} exited: no driver or no such GPU; not restarting",
                         c.ordinal);
            c.retired = true;
            retired = Kept();
            continue;
          }
          if (now - c.started > seconds(30)) c.backoff = milliseconds(100);
          c.next_start = now + c.backoff;
          spdlog::warn("worker for GPU {} exited ({} {}); restarting in {} ms", c.ordinal,
                       WIFSIGNALED(status) ? "signal" : "status",
                       WIFSIGNALED(status) ? WTERMSIG(status) : code, c.backoff.count());
          c.backoff = std::min(c.backoff * 2, duration_cast<milliseconds>(seconds(5)));
          ++restarts_;
        }
        if (c.pid < 0 && now >= c.next_start) {
          c.pid = Spawn(c.ordinal);
          c.started = now;
          if (c.pid < 0) c.next_start = now + c.backoff;
        }
      }
    }
    if (retired && on_count_) on_count_(*retired);
    std::this_thread::sleep_for(milliseconds(20));
  }
}

void WorkerSupervisor::Stop() {
  if (stop_.exchange(true)) return;
  if (thread_.joinable()) thread_.join();
  MutexLock lock(&mu_);
  for (Child& c : children_) {
    if (c.pid > 0) kill(c.pid, SIGTERM);
  }
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  for (Child& c : children_) {
    while (c.pid > 0) {
      int status;
      if (waitpid(c.pid, &status, WNOHANG) == c.pid) {
        c.pid = -1;
      } else if (std::chrono::steady_clock::now() > give_up) {
        kill(c.pid, SIGKILL);
        waitpid(c.pid, &status, 0);
        c.pid = -1;
      } else {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    }
  }
}

}  // namespace gpuq::worker
