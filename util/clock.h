// Time as a seam (leveldb's Env): everything in the broker that depends on
// time (deadlines, heartbeats, run-time limits, retention, grace periods)
// asks a Clock, so that tests drive time instead of sleeping.
#pragma once

#include <chrono>
#include <cstdint>

namespace gpuq {

using MonoTime = std::chrono::steady_clock::time_point;

class Clock {
 public:
  virtual ~Clock() = default;
  // Monotonic time: for intervals and timers.
  virtual MonoTime Now() const = 0;
  // Wall-clock time in Unix milliseconds: for what is stored (acceptance,
  // deadlines, retention) and shown.
  virtual int64_t UnixMs() const = 0;

  // The system's clocks. Thread-safe; lives for the whole process.
  static const Clock* Real();
};

inline uint64_t MicrosBetween(MonoTime a, MonoTime b) {
  return b > a ? static_cast<uint64_t>(
                     std::chrono::duration_cast<std::chrono::microseconds>(b - a).count())
               : 0;
}

}  // namespace gpuq
