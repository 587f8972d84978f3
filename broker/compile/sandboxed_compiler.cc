#include "broker/compile/sandboxed_compiler.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>

#include "broker/compile/sandbox_io.h"

extern char** environ;

namespace gpuq::compile {
namespace {

constexpr size_t kMaxReplyBytes = 512u << 20;
constexpr size_t kMaxStderrBytes = 16u << 10;

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() { Reset(); }
  UniqueFd(UniqueFd&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) {
      Reset();
      fd_ = o.fd_;
      o.fd_ = -1;
    }
    return *this;
  }
  int get() const { return fd_; }
  void Reset() {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

Status MakePipe(UniqueFd* read_end, UniqueFd* write_end) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) {
    return Error(Code::kResourceExhausted, std::string("pipe2: ") + strerror(errno));
  }
  *read_end = UniqueFd(fds[0]);
  *write_end = UniqueFd(fds[1]);
  return Status::Ok();
}

std::string Exe() {
  char buf[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  return n > 0 ? std::string(buf, n) : std::string();
}

// Owns a spawned child: kills and reaps it unless it was reaped already, so
// that no exit path leaves a zombie or a runaway compiler.
class Child {
 public:
  explicit Child(pid_t pid) : pid_(pid) {
    pidfd_ = UniqueFd(static_cast<int>(syscall(SYS_pidfd_open, pid, 0)));
  }
  ~Child() {
    if (!reaped_) {
      Kill();
      (void)Wait();
    }
  }
  int pidfd() const { return pidfd_.get(); }
  void Kill() {
    if (pidfd_.get() >= 0) {
      syscall(SYS_pidfd_send_signal, pidfd_.get(), SIGKILL, nullptr, 0);
    } else {
      kill(pid_, SIGKILL);
    }
  }
  int Wait() {
    int status = 0;
    while (waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
    reaped_ = true;
    return status;
  }

 private:
  pid_t pid_;
  UniqueFd pidfd_;
  bool reaped_ = false;
};

}  // namespace

std::string DefaultHelperPath() {
  if (const char* p = getenv("GPUQ_NVRTC_HELPER"); p && *p) return p;
  std::filesystem::path exe(Exe());
  return (exe.parent_path() / "gpuq-nvrtc").string();
}

std::string DefaultCudaInclude() {
  std::string dir;
  if (const char* p = getenv("GPUQ_CUDA_INCLUDE"); p && *p) {
    dir = p;
  } else if (std::filesystem::exists(GPUQ_CUDA_INCLUDE_DIR "/cuda.h")) {
    dir = GPUQ_CUDA_INCLUDE_DIR;
  } else {
    dir = "/usr/local/cuda/include";
  }
  std::error_code ec;
  auto real = std::filesystem::canonical(dir, ec);
  return ec ? dir : real.string();
}

SandboxedCompiler::SandboxedCompiler(std::string helper_path, std::string cuda_include)
    : helper_path_(helper_path.empty() ? DefaultHelperPath() : std::move(helper_path)),
      cuda_include_(cuda_include.empty() ? DefaultCudaInclude() : std::move(cuda_include)) {
  static std::once_flag ignore_sigpipe;
  std::call_once(ignore_sigpipe, [] { signal(SIGPIPE, SIG_IGN); });
}

StatusOr<CompileOutput> SandboxedCompiler::Compile(const CompileRequest& request,
                                                   const SandboxLimits& limits) const {
  if (access(helper_path_.c_str(), X_OK) != 0) {
    return Error(Code::kUnavailable, "compile helper " + helper_path_ + " is missing");
  }
  const std::string input = EncodeSandboxRequest({request, cuda_include_});

  UniqueFd in_r, in_w, out_r, out_w, err_r, err_w;
  GPUQ_RETURN_IF_ERROR(MakePipe(&in_r, &in_w));
  GPUQ_RETURN_IF_ERROR(MakePipe(&out_r, &out_w));
  GPUQ_RETURN_IF_ERROR(MakePipe(&err_r, &err_w));

  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, in_r.get(), 0);
  posix_spawn_file_actions_adddup2(&fa, out_w.get(), 1);
  posix_spawn_file_actions_adddup2(&fa, err_w.get(), 2);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none, defaults;
  sigemptyset(&none);
  sigemptyset(&defaults);
  sigaddset(&defaults, SIGPIPE);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &defaults);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);

  // CPU time is bounded too, a little above the wall limit, in case the
  // parent itself is stopped while the helper runs.
  const auto wall_s = std::chrono::duration_cast<std::chrono::seconds>(limits.wall).count();
  std::string mem = std::to_string(limits.memory_bytes);
  std::string cpu = std::to_string(wall_s + 2);
  char* argv[] = {const_cast<char*>(helper_path_.c_str()), mem.data(), cpu.data(), nullptr};
  pid_t pid = -1;
  int rc = posix_spawn(&pid, helper_path_.c_str(), &fa, &attr, argv, environ);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) {
    return Error(Code::kUnavailable, "spawn " + helper_path_ + ": " + strerror(rc));
  }
  Child child(pid);
  in_r.Reset();
  out_w.Reset();
  err_w.Reset();
  fcntl(in_w.get(), F_SETFL, O_NONBLOCK);

  const auto deadline = std::chrono::steady_clock::now() + limits.wall;
  std::string reply, errors;
  size_t written = 0;
  bool out_open = true, err_open = true;
  char buf[1 << 16];
  while (out_open || err_open) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      child.Kill();
      child.Wait();
      return Error(Code::kTimeout, "compile ran past its wall-time limit of " +
                                       std::to_string(limits.wall.count()) +
                                       " ms and was stopped");
    }
    pollfd fds[3];
    nfds_t n = 0;
    int in_idx = -1, out_idx = -1, err_idx = -1;
    if (in_w.get() >= 0) {
      in_idx = n;
      fds[n++] = {in_w.get(), POLLOUT, 0};
    }
    if (out_open) {
      out_idx = n;
      fds[n++] = {out_r.get(), POLLIN, 0};
    }
    if (err_open) {
      err_idx = n;
      fds[n++] = {err_r.get(), POLLIN, 0};
    }
    int pr = poll(fds, n, static_cast<int>(left.count()));
    if (pr < 0 && errno != EINTR) {
      return Error(Code::kInternal, std::string("poll: ") + strerror(errno));
    }
    if (pr <= 0) continue;
    if (in_idx >= 0 && fds[in_idx].revents) {
      ssize_t w = write(in_w.get(), input.data() + written, input.size() - written);
      if (w > 0) written += w;
      if (w < 0 && errno != EAGAIN && errno != EINTR) in_w.Reset();  // helper gone
      if (written == input.size()) in_w.Reset();                   // EOF for the helper
    }
    auto drain = [&](int idx, const UniqueFd& fd, std::string* into, size_t max,
                     bool* open) -> Status {
      if (idx < 0 || !fds[idx].revents) return Status::Ok();
      ssize_t r = read(fd.get(), buf, sizeof buf);
      if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
        *open = false;
      } else if (r > 0) {
        if (into->size() + r > max) {
          if (into == &errors) return Status::Ok();  // keep only the head
          return Error(Code::kResourceExhausted, "compile output is over " +
                                                     std::to_string(max) + " bytes");
        }
        into->append(buf, r);
      }
      return Status::Ok();
    };
    GPUQ_RETURN_IF_ERROR(drain(out_idx, out_r, &reply, kMaxReplyBytes, &out_open));
    GPUQ_RETURN_IF_ERROR(drain(err_idx, err_r, &errors, kMaxStderrBytes, &err_open));
  }
  // Both pipes closed: the helper has exited or is about to.
  const int status = child.Wait();
  if (WIFSIGNALED(status)) {
    int sig = WTERMSIG(status);
    if (sig == SIGXCPU || sig == SIGKILL) {
      return Error(Code::kTimeout, "compile ran past its CPU-time limit and was stopped");
    }
    return Error(Code::kResourceExhausted,
                 std::string("the compiler died (") + strsignal(sig) +
                     "), most likely at its memory limit of " +
                     std::to_string(limits.memory_bytes >> 20) + " MiB");
  }
  if (WEXITSTATUS(status) != 0) {
    return Error(Code::kInternal, "compile helper exited with status " +
                                      std::to_string(WEXITSTATUS(status)) + ": " +
                                      errors.substr(0, 1024));
  }
  CompileOutput out;
  GPUQ_RETURN_IF_ERROR(DecodeSandboxReply(reply, &out));
  // Only a rejection of the source is an outcome; anything else says nothing
  // about the source and must not be cached as if it did.
  if (!out.ok && out.code != Code::kCompileError && out.code != Code::kSandboxViolation) {
    return Error(out.code, out.log);
  }
  return out;
}

}  // namespace gpuq::compile
