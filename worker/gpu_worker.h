// gpuq-worker's core: one process serves one GPU. The main thread speaks the
// worker protocol (and never calls into CUDA, so heartbeats go on while a
// kernel runs); executor threads, one CUDA stream each, run the jobs.
//
// Faults: after a sticky CUDA error nothing in this process can use the GPU
// again, so the worker reports (the job, when it was alone; else a
// disconnect that makes every job in flight a suspect) and exits for its
// supervisor to restart it. A job past its run-time limit cannot be stopped
// from inside the process either: the worker reports its timeout and exits.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "schema/messages.h"
#include "worker/cuda_driver.h"
#include "worker/exit_codes.h"

namespace gpuq::worker {

struct WorkerOptions {
  std::string broker;  // the broker's worker endpoint
  int device = 0;
  uint32_t slots = 16;     // jobs held at once (credits)
  uint32_t streams = 4;    // executor threads, one stream each
  uint32_t module_slots = 256;
  // Device memory a module may take when it loads (its variables and
  // code), and a kernel's local memory over every resident thread
  // (ModuleBounds); over either, its jobs fail resource_exhausted. 0: none.
  uint64_t module_bytes = ModuleBounds{}.module_bytes;
  uint64_t local_bytes = ModuleBounds{}.local_bytes;
  // CUDA graphs of jobs of several launches kept per stream (LRU).
  uint32_t graph_slots = 64;
  // Page-locked host memory kept for outputs' device-to-host copies.
  size_t pinned_bytes = 512u << 20;
  std::chrono::milliseconds heartbeat{500};
  // After a message or a job, the protocol thread and one executor poll
  // without sleeping for this long before they block: a job or result that
  // comes within it costs no thread wake-up. 0: always block.
  std::chrono::microseconds spin{0};
  // The broker's local directory (its store's blob directory), when this
  // worker runs on the broker's host: inputs are read from and large
  // outputs written to its files instead of crossing the socket.
  std::string local_dir;
  // CURVE: the broker's public key and this worker's key pair (Z85).
  std::string server_key, public_key, secret_key;
};

// Reads the device's properties (the `ready` message's device map).
StatusOr<schema::DeviceInfo> QueryDevice(const CudaDriver& cu, int ordinal);

// Checks a launch of `fn` against the device's limits (block, grid, shared
// memory) and the kernel's (threads per block); opts the kernel in to more
// than 48 KiB of dynamic shared memory when it asks for it.
// `fn_max_threads`: the kernel's threads-per-block limit when the caller
// knows it (asked of the driver otherwise).
Status CheckLaunchLimits(const CudaDriver& cu, const schema::DeviceInfo& device,
                         const schema::LaunchSpec& launch, CUfunction fn,
                         int fn_max_threads = -1);

// Checks a launch's arguments against the kernel's parameters (`params`:
// their sizes, from ParamSizes; null where the driver cannot say): as many,
// and each of the parameter's size (a scalar's type; 8 bytes for a buffer).
// cuLaunchKernel reads one pointer per parameter the kernel declares, and
// that parameter's bytes behind it: fewer or narrower arguments made it read
// past what the launch gave (a crash of the process, or garbage passed).
Status CheckArgs(const std::vector<size_t>* params, const std::vector<schema::Arg>& args);

class GpuWorker {
 public:
  static StatusOr<std::unique_ptr<GpuWorker>> Create(
      WorkerOptions options, std::shared_ptr<const CudaDriver> driver);
  ~GpuWorker();
  // Serves until told to stop (SIGTERM) or until a fault ends the process's
  // use of the GPU; returns the process exit code.
  int Run();
  static void RequestStop();

 private:
  class Impl;
  explicit GpuWorker(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace gpuq::worker
