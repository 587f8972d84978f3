#include "broker/compile/helper_pool.h"

#include <poll.h>

#include <algorithm>

namespace gpuq::compile {
namespace {

using Clock = std::chrono::steady_clock;

// How long to wait before starting helpers again after `failures` in a row.
std::chrono::milliseconds Backoff(int failures) {
  return std::min(std::chrono::milliseconds(100 << std::min(failures, 7)),
                  std::chrono::milliseconds(10000));
}

// A helper that has not said it is ready after this long is dropped.
constexpr auto kStartLimit = std::chrono::seconds(60);

}  // namespace

HelperPool::HelperPool(const SandboxedCompiler* compiler, size_t warm)
    : compiler_(compiler), warm_(warm) {
  if (warm_ > 0) starter_ = std::thread([this] { StarterLoop(); });
}

HelperPool::~HelperPool() {
  {
    MutexLock lock(&mu_);
    stop_ = true;
    changed_.SignalAll();
  }
  if (starter_.joinable()) starter_.join();
}

StatusOr<Helper> HelperPool::Take() {
  std::string arch;
  {
    MutexLock lock(&mu_);
    for (;;) {
      while (!waiting_.empty()) {
        Helper h = std::move(waiting_.front());
        waiting_.pop_front();
        changed_.SignalAll();  // the starter thread replaces it
        if (h.Waiting()) {
          ++counts_.warm;
          ++at_work_;
          return h;
        }
        // It died while it waited (killed from outside): dropped and reaped.
      }
      // A helper begun earlier is ready sooner than one begun now.
      if (stop_ || starting_ <= takers_waiting_) break;
      ++takers_waiting_;
      changed_.Wait();
      --takers_waiting_;
    }
    ++counts_.cold;
    ++at_work_;
    arch = warm_arch_;
  }
  StatusOr<Helper> started = compiler_->Start(arch);
  if (!started.ok()) {
    MutexLock lock(&mu_);
    --at_work_;
  }
  return started;
}

void HelperPool::NoteArch(const std::string& arch) {
  MutexLock lock(&mu_);
  warm_arch_ = arch;
}

void HelperPool::Retire(Helper spent) {
  {
    MutexLock lock(&mu_);
    if (at_work_ > 0) --at_work_;
    if (warm_ > 0) {
      retired_.push_back(std::move(spent));
      changed_.SignalAll();
      return;
    }
  }
  // No starter thread to reap it: `spent` is reaped on the way out.
}

HelperPool::Counts HelperPool::counts() {
  MutexLock lock(&mu_);
  return counts_;
}

bool HelperPool::WaitUntilWarm(std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  MutexLock lock(&mu_);
  while (waiting_.size() < warm_) {
    if (!changed_.WaitUntil(deadline)) return waiting_.size() >= warm_;
  }
  return true;
}

std::vector<pid_t> HelperPool::WaitingPids() {
  MutexLock lock(&mu_);
  std::vector<pid_t> pids;
  for (const Helper& h : waiting_) pids.push_back(h.pid());
  return pids;
}

void HelperPool::StarterLoop() {
  // Helpers begun and not yet ready; only this thread touches them.
  std::vector<Helper> starting;
  std::vector<Clock::time_point> begun;
  Clock::time_point next_start = Clock::now();
  int failures = 0;
  for (;;) {
    size_t need = 0;
    std::vector<Helper> spent;
    std::string arch;
    {
      MutexLock lock(&mu_);
      starting_ = starting.size();
      changed_.SignalAll();
      // Replacements wait while a helper is at work, unless none is left.
      auto may_start = [&]() EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return waiting_.size() + starting.size() < warm_ && Clock::now() >= next_start &&
               (at_work_ == 0 || waiting_.empty());
      };
      while (!stop_ && starting.empty() && retired_.empty() && !may_start()) {
        if (waiting_.size() < warm_ && Clock::now() < next_start) {
          changed_.WaitUntil(next_start);
        } else {
          changed_.Wait();
        }
      }
      spent.swap(retired_);
      if (stop_) break;
      if (may_start()) {
        need = warm_ - waiting_.size() - starting.size();
        // Counted as starting already, so that Take() waits for them rather
        // than start helpers of its own while these are spawned.
        starting_ = starting.size() + need;
      }
      arch = warm_arch_;
    }
    spent.clear();  // reaped here, outside the lock
    for (size_t i = 0; i < need; ++i) {
      StatusOr<Helper> h = compiler_->Start(arch);
      if (!h.ok()) {
        next_start = Clock::now() + Backoff(++failures);
        break;
      }
      starting.push_back(std::move(*h));
      begun.push_back(Clock::now());
    }
    if (starting.empty()) continue;
    {
      MutexLock lock(&mu_);
      starting_ = starting.size();
    }
    // Watch them for a while; the loop comes back to start more, to see a
    // helper taken, or to stop.
    std::vector<pollfd> fds;
    for (const Helper& h : starting) fds.push_back({h.out_.get(), POLLIN, 0});
    if (poll(fds.data(), fds.size(), 50) < 0) continue;
    for (size_t i = starting.size(); i-- > 0;) {
      const bool spoke = fds[i].revents != 0;
      if (!spoke && Clock::now() - begun[i] < kStartLimit) continue;
      Helper h = std::move(starting[i]);
      starting.erase(starting.begin() + static_cast<std::ptrdiff_t>(i));
      begun.erase(begun.begin() + static_cast<std::ptrdiff_t>(i));
      if (spoke && h.WaitReady(Clock::now()).ok()) {
        failures = 0;
        MutexLock lock(&mu_);
        waiting_.push_back(std::move(h));
        changed_.SignalAll();
      } else {
        next_start = Clock::now() + Backoff(++failures);
      }
    }
  }
  // Stopping: the helpers still starting are killed and reaped here.
}

}  // namespace gpuq::compile
