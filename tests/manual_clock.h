// A clock the test drives (util/clock.h): time moves only when Advance() is
// called. Thread-safe.
#pragma once

#include <atomic>

#include "util/clock.h"

namespace gpuq::testing {

class ManualClock final : public Clock {
 public:
  MonoTime Now() const override { return MonoTime(std::chrono::microseconds(us_.load())); }
  int64_t UnixMs() const override { return kEpochMs + us_.load() / 1000; }
  template <typename Duration>
  void Advance(Duration d) {
    us_ += std::chrono::duration_cast<std::chrono::microseconds>(d).count();
  }

 private:
  static constexpr int64_t kEpochMs = 1'790'000'000'000;  // late 2026
  std::atomic<int64_t> us_{1'000'000};
};

}  // namespace gpuq::testing
