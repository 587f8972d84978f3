// gpuq-session: a session process (worker/session_host.h), started by gpuqd
// for one tenant's sessions on one GPU of its host.
#include <spdlog/spdlog.h>

#include "worker/cuda_session_device.h"
#include "worker/exit_codes.h"
#include "worker/session_host.h"

int main(int argc, char** argv) {
  using namespace gpuq::worker;
  return SessionProcessMain(argc, argv, [](const std::string& uuid,
                                           std::chrono::microseconds spin,
                                           const ModuleBounds& bounds)
                                            -> gpuq::StatusOr<std::unique_ptr<SessionDevice>> {
    auto cu = LoadCudaDriver();
    if (!cu.ok()) return cu.status();
    return OpenCudaSessionDevice(*cu, uuid, spin, bounds);
  });
}
