// The regions a worker is handed on the region channel (PROTOCOL.md,
// "Regions"): each mapped and page-locked once, so that every copy between it
// and the GPU is a DMA at full speed, and kept until the broker drops it.
//
// A thread of its own keeps the channel (connected before the worker's
// ready, again after the broker closed it) and does the mapping and
// locking: locking takes milliseconds per 64 MiB, and neither the protocol
// thread nor an executor should wait for a region it does not use.
// Executors take a region with Get() and hold it for the job: a region the
// broker drops while a job uses it is released when that job lets go.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include "util/fd.h"
#include "util/mutex.h"
#include "util/sealed_memfd.h"
#include "worker/cuda_driver.h"

namespace gpuq::worker {

class WorkerRegions {
 public:
  struct Region {
    uint64_t id = 0;
    Mapping map;
    bool pinned = false;   // page-locked (else copies run at pageable speed)
    uint64_t pin_us = 0;   // what the locking cost
    const CudaDriver* cu = nullptr;
    ~Region();  // unlocks: on a thread with the worker's context current
  };

  // `token`: the worker's, which the broker knows from its ready.
  WorkerRegions(std::shared_ptr<const CudaDriver> cu, CUcontext ctx, std::string local_dir,
                std::string token);
  ~WorkerRegions();
  WorkerRegions(const WorkerRegions&) = delete;
  WorkerRegions& operator=(const WorkerRegions&) = delete;

  // Connects the channel (so that the broker knows it before the ready that
  // follows) and starts the thread.
  void Start();
  // Region `id`, waiting up to `wait` for it to be handed over and locked;
  // null if it was not.
  std::shared_ptr<const Region> Get(uint64_t id, std::chrono::milliseconds wait);

 private:
  void Loop();
  void Connect();
  // Takes what the channel has; false when the broker closed it.
  bool Read();

  std::shared_ptr<const CudaDriver> cu_;
  CUcontext ctx_;
  std::string local_dir_, token_;
  UniqueFd chan_;  // the thread's, once started
  UniqueFd stop_fd_;
  std::atomic<bool> stop_{false};
  std::thread thread_;

  Mutex mu_;
  CondVar changed_{&mu_};
  std::map<uint64_t, std::shared_ptr<const Region>> regions_ GUARDED_BY(mu_);
};

}  // namespace gpuq::worker
