// The session device of a GPU (worker/session_device.h), on the CUDA driver
// API: the device's primary context, a non-blocking stream per session,
// memory from the stream-ordered pool, events as marks.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "worker/cuda_driver.h"
#include "worker/session_device.h"

namespace gpuq::worker {

// The GPU whose UUID is `uuid` ("GPU-..."). `spin`: a wait polls for this
// long before it sleeps (0: it sleeps at once, on a blocking-sync event).
// `bounds`: what a module and a kernel may take (its resident threads are
// the device's).
StatusOr<std::unique_ptr<SessionDevice>> OpenCudaSessionDevice(
    std::shared_ptr<const CudaDriver> cu, const std::string& uuid, std::chrono::microseconds spin,
    const ModuleBounds& bounds);

}  // namespace gpuq::worker
