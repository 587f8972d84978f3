#include "broker/compile/sandboxed_compiler.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "broker/compile/sandbox_io.h"

extern char** environ;

namespace gpuq::compile {
namespace {

constexpr size_t kMaxReplyBytes = 512u << 20;
constexpr size_t kMaxStderrBytes = 16u << 10;

Status MakePipe(UniqueFd* read_end, UniqueFd* write_end) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) {
    // The broker's state, not the source's: never remembered as the
    // source's outcome (a retry may find descriptors free).
    return Error(Code::kUnavailable, std::string("pipe2: ") + strerror(errno));
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

int MillisLeft(std::chrono::steady_clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
      deadline - std::chrono::steady_clock::now());
  return static_cast<int>(std::clamp<int64_t>(left.count(), 0, INT32_MAX));
}

Status Cancelled() { return Error(Code::kUnavailable, "the compile was cancelled"); }

// Why a helper that ended (wait `status`) without a whole reply did.
Status Ended(int status, const SandboxLimits& limits, const std::string& errors) {
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
  return Error(Code::kInternal, "compile helper exited with status " +
                                    std::to_string(WEXITSTATUS(status)) +
                                    " without a reply: " + errors.substr(0, 1024));
}

Status WallTimeout(const SandboxLimits& limits) {
  return Error(Code::kTimeout, "compile ran past its wall-time limit of " +
                                   std::to_string(limits.wall.count()) + " ms and was stopped");
}

}  // namespace

std::string_view IsolationName(Isolation i) {
  return i == Isolation::kNamespaces ? "namespaces+landlock" : "landlock";
}

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

// ------------------------------------------------------------------ Helper

Helper::Helper(pid_t pid, UniqueFd in, UniqueFd out, UniqueFd err)
    : pid_(pid),
      reaped_(false),
      pidfd_(static_cast<int>(syscall(SYS_pidfd_open, pid, 0))),
      in_(std::move(in)),
      out_(std::move(out)),
      err_(std::move(err)) {}

Helper::Helper(Helper&& o) noexcept
    : pid_(o.pid_),
      reaped_(std::exchange(o.reaped_, true)),
      pidfd_(std::move(o.pidfd_)),
      in_(std::move(o.in_)),
      out_(std::move(o.out_)),
      err_(std::move(o.err_)),
      ready_(o.ready_),
      isolation_(o.isolation_) {}

Helper& Helper::operator=(Helper&& o) noexcept {
  if (this != &o) {
    if (!reaped_) {
      Kill();
      Reap();
    }
    pid_ = o.pid_;
    reaped_ = std::exchange(o.reaped_, true);
    pidfd_ = std::move(o.pidfd_);
    in_ = std::move(o.in_);
    out_ = std::move(o.out_);
    err_ = std::move(o.err_);
    ready_ = o.ready_;
    isolation_ = o.isolation_;
  }
  return *this;
}

Helper::~Helper() {
  if (!reaped_) {
    Kill();
    Reap();
  }
}

void Helper::Kill() {
  if (pidfd_) {
    syscall(SYS_pidfd_send_signal, pidfd_.get(), SIGKILL, nullptr, 0);
  } else if (!reaped_) {
    kill(pid_, SIGKILL);
  }
}

int Helper::Reap() {
  int status = 0;
  while (waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
  }
  reaped_ = true;
  return status;
}

StatusOr<Isolation> Helper::WaitReady(std::chrono::steady_clock::time_point deadline,
                                      int cancel_fd) {
  if (ready_) return isolation_;
  if (reaped_ || !out_) return Error(Code::kInternal, "no compile helper");
  for (;;) {
    pollfd fds[2] = {{out_.get(), POLLIN, 0}, {cancel_fd, POLLIN, 0}};
    int n = poll(fds, cancel_fd >= 0 ? 2 : 1, MillisLeft(deadline));
    if (n < 0 && errno != EINTR) {
      return Error(Code::kInternal, std::string("poll: ") + strerror(errno));
    }
    if (cancel_fd >= 0 && fds[1].revents) return Cancelled();
    if (n > 0 && fds[0].revents) break;
    if (n == 0 || std::chrono::steady_clock::now() >= deadline) {
      return Error(Code::kTimeout, "the compile helper was not ready in time");
    }
  }
  char byte = 0;
  ssize_t r;
  while ((r = read(out_.get(), &byte, 1)) < 0 && errno == EINTR) {
  }
  if (r == 1 && (byte == kReadyNamespaces || byte == kReadyLandlock)) {
    ready_ = true;
    isolation_ = byte == kReadyNamespaces ? Isolation::kNamespaces : Isolation::kLandlock;
    return isolation_;
  }
  // It could not confine itself (and says why), or it died.
  std::string said;
  char buf[4096];
  CompileOutput out;
  Status decoded = Error(Code::kUnavailable, "no reply");
  while (r == 1 && byte == kCannotConfine && decoded.code() == Code::kUnavailable) {
    ssize_t m = read(out_.get(), buf, sizeof buf);
    if (m < 0 && errno == EINTR) continue;
    if (m <= 0) break;
    said.append(buf, m);
    decoded = DecodeSandboxReply(said, &out, kMaxStderrBytes);
  }
  const int status = ReapBy(deadline);
  const std::string errors = DrainStderr();
  if (decoded.ok() && !out.ok) {
    return Error(out.code == Code::kOk ? Code::kInternal : out.code, out.log);
  }
  return Error(Code::kInternal,
               "compile helper " +
                   (WIFSIGNALED(status)
                        ? std::string("was killed by ") + strsignal(WTERMSIG(status))
                        : "exited with status " + std::to_string(WEXITSTATUS(status))) +
                   " before it was ready: " + errors.substr(0, 1024));
}

int Helper::ReapBy(std::chrono::steady_clock::time_point deadline) {
  if (pidfd_) {
    // A pidfd is readable once its process has exited.
    pollfd fd{pidfd_.get(), POLLIN, 0};
    while (poll(&fd, 1, MillisLeft(deadline)) < 0 && errno == EINTR) {
    }
    if (!fd.revents) Kill();
  }
  return Reap();
}

std::string Helper::DrainStderr() {
  std::string errors;
  char buf[4096];
  for (ssize_t m; errors.size() < kMaxStderrBytes &&
                  ((m = read(err_.get(), buf, sizeof buf)) > 0 || (m < 0 && errno == EINTR));) {
    if (m > 0) errors.append(buf, m);
  }
  return errors;
}

bool Helper::Waiting() const {
  if (!ready_ || reaped_ || !out_) return false;
  // A waiting helper has nothing more to say; a dead one's pipe is closed.
  pollfd fd{out_.get(), POLLIN, 0};
  return poll(&fd, 1, 0) == 0;
}

// ------------------------------------------------------------ SandboxedCompiler

SandboxedCompiler::SandboxedCompiler(SandboxOptions options) : options_(std::move(options)) {
  if (options_.helper_path.empty()) options_.helper_path = DefaultHelperPath();
  if (options_.cuda_include.empty()) {
    options_.cuda_include = DefaultCudaInclude();
  } else {
    // The helper mounts it at its own path and judges include paths against
    // it as text: it must be the real, absolute path.
    std::error_code ec;
    auto real = std::filesystem::canonical(options_.cuda_include, ec);
    if (!ec) options_.cuda_include = real.string();
  }
  static std::once_flag ignore_sigpipe;
  std::call_once(ignore_sigpipe, [] { signal(SIGPIPE, SIG_IGN); });
}

StatusOr<Helper> SandboxedCompiler::Start(const std::string& warm_arch) const {
  const std::string& path = options_.helper_path;
  if (access(path.c_str(), X_OK) != 0) {
    return Error(Code::kUnavailable, "compile helper " + path + " is missing");
  }
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
  // parent itself is stopped while the helper runs; the helper's warm-up
  // (a fraction of a second) counts against it.
  const SandboxLimits& limits = options_.limits;
  const auto wall_s = std::chrono::duration_cast<std::chrono::seconds>(limits.wall).count();
  std::string mem = std::to_string(limits.memory_bytes);
  std::string cpu = std::to_string(wall_s + 2);
  std::string mode = options_.namespaces ? "namespaces" : "landlock";
  std::string include = options_.cuda_include;
  std::string arch = warm_arch.empty() ? "newest" : warm_arch;
  char* argv[] = {const_cast<char*>(path.c_str()),
                  mem.data(),
                  cpu.data(),
                  mode.data(),
                  include.data(),
                  arch.data(),
                  nullptr};
  // The driver's compute cache (~/.nv/ComputeCache, which NVRTC uses where a
  // driver is installed) is not the helper's to read or write: it could not
  // write it under Landlock anyway, and a cache shared with other programs
  // is no place for output of untrusted source.
  std::vector<std::string> env_strings;
  for (char** e = environ; *e != nullptr; ++e) {
    if (std::string_view(*e).rfind("CUDA_CACHE_DISABLE=", 0) != 0) env_strings.push_back(*e);
  }
  env_strings.push_back("CUDA_CACHE_DISABLE=1");
  std::vector<char*> env;
  for (std::string& e : env_strings) env.push_back(e.data());
  env.push_back(nullptr);
  pid_t pid = -1;
  int rc = posix_spawn(&pid, path.c_str(), &fa, &attr, argv, env.data());
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) return Error(Code::kUnavailable, "spawn " + path + ": " + strerror(rc));
  fcntl(in_w.get(), F_SETFL, O_NONBLOCK);
  fcntl(err_r.get(), F_SETFL, O_NONBLOCK);  // read once it has exited, for what it said
  return Helper(pid, std::move(in_w), std::move(out_r), std::move(err_r));
}

StatusOr<CompileOutput> SandboxedCompiler::Compile(const CompileRequest& request) const {
  GPUQ_ASSIGN_OR_RETURN(Helper helper, Start(request.arch));
  return Run(helper, request);
}

StatusOr<CompileOutput> SandboxedCompiler::Run(Helper& helper, const CompileRequest& request,
                                               int cancel_fd) const {
  const SandboxLimits& limits = options_.limits;
  const auto deadline = std::chrono::steady_clock::now() + limits.wall;
  if (!helper.ready()) {
    auto ready = helper.WaitReady(deadline, cancel_fd);
    if (!ready.ok()) {
      // A helper slow to start says nothing about the source (a loaded
      // machine): unavailable, which is not remembered, not the source's
      // timeout, which is.
      return ready.status().code() == Code::kTimeout
                 ? Error(Code::kUnavailable,
                         "the compile helper was not ready within the compile's wall-time "
                         "limit of " + std::to_string(limits.wall.count()) + " ms")
                 : ready.status();
    }
  }
  const std::string input = EncodeSandboxRequest(request);
  std::string reply, errors;
  size_t written = 0;
  bool out_open = true, err_open = true;
  CompileOutput out;
  char buf[1 << 16];
  // Until the reply is whole, or the helper's stdout closes without one.
  for (bool whole = false; !whole;) {
    if (!out_open) {
      // It closed its stdout without a whole reply: it died, or is about to.
      const int status = helper.ReapBy(deadline);
      return Ended(status, limits, errors + helper.DrainStderr());
    }
    const int left = MillisLeft(deadline);
    if (left <= 0) {
      helper.Kill();
      helper.Reap();
      return WallTimeout(limits);
    }
    pollfd fds[4];
    nfds_t n = 0;
    int in_idx = -1, out_idx = -1, err_idx = -1, cancel_idx = -1;
    if (helper.in_) {
      in_idx = n;
      fds[n++] = {helper.in_.get(), POLLOUT, 0};
    }
    out_idx = n;
    fds[n++] = {helper.out_.get(), POLLIN, 0};
    if (err_open) {
      err_idx = n;
      fds[n++] = {helper.err_.get(), POLLIN, 0};
    }
    if (cancel_fd >= 0) {
      cancel_idx = n;
      fds[n++] = {cancel_fd, POLLIN, 0};
    }
    int pr = poll(fds, n, left);
    if (pr < 0 && errno != EINTR) {
      return Error(Code::kInternal, std::string("poll: ") + strerror(errno));
    }
    if (pr <= 0) continue;
    if (cancel_idx >= 0 && fds[cancel_idx].revents) {
      helper.Kill();
      helper.Reap();
      return Cancelled();
    }
    if (in_idx >= 0 && fds[in_idx].revents) {
      ssize_t w = write(helper.in_.get(), input.data() + written, input.size() - written);
      if (w > 0) written += w;
      if (w < 0 && errno != EAGAIN && errno != EINTR) helper.in_.Reset();  // helper gone
      if (written == input.size()) helper.in_.Reset();                   // EOF for the helper
    }
    if (err_idx >= 0 && fds[err_idx].revents) {
      ssize_t r = read(helper.err_.get(), buf, sizeof buf);
      if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) err_open = false;
      if (r > 0 && errors.size() < kMaxStderrBytes) errors.append(buf, r);  // the head
    }
    if (fds[out_idx].revents) {
      ssize_t r = read(helper.out_.get(), buf, sizeof buf);
      if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) out_open = false;
      if (r > 0) {
        reply.append(buf, r);
        Status decoded = DecodeSandboxReply(reply, &out, kMaxReplyBytes);
        if (decoded.code() == Code::kTooLarge) {
          helper.Kill();
          helper.Reap();
          return Error(Code::kResourceExhausted, decoded.message());
        }
        if (!decoded.ok() && decoded.code() != Code::kUnavailable) return decoded;
        whole = decoded.ok();
      }
    }
  }
  // The helper is exiting; its owner reaps it. Only a rejection of the
  // source is an outcome; anything else says nothing about the source and
  // must not be cached as if it did.
  if (!out.ok && out.code != Code::kCompileError && out.code != Code::kSandboxViolation) {
    return Error(out.code, out.log);
  }
  return out;
}

}  // namespace gpuq::compile
