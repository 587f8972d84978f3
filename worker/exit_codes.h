// gpuq-worker's exit codes, shared with its supervisor.
#pragma once

namespace gpuq::worker {

inline constexpr int kExitNoDriver = 10;  // no CUDA driver: do not restart
inline constexpr int kExitNoDevice = 11;  // no such GPU: do not restart
inline constexpr int kExitFault = 12;     // sticky CUDA error: restart
inline constexpr int kExitTimeout = 13;   // a job ran past its limit: restart

}  // namespace gpuq::worker
