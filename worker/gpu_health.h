// A GPU's health from NVML (PROTOCOL.md, "GPU health"), loaded at run time
// (dlopen of libnvidia-ml.so.1) as the driver is: no gpuq program links it,
// and a machine without it has a worker that reports no health.
#pragma once

#include <cstdint>
#include <memory>
#include <set>
#include <string>

#include "gpuq/types.h"

namespace gpuq::worker {

// Xids that mean the GPU or its memory is failing: double-bit ECC (48), row
// remapping (63, 64), NVLink (74), fallen off the bus (79), high single-bit
// ECC rate (92), contained and uncontained memory errors (94, 95), GSP
// errors (119, 120), unrecovered ECC (140). A kernel's own fault raises 13,
// 31 or 43: those are the fault containment's business.
const std::set<uint32_t>& DrainingXids();
// "critical Xid 79 (GPU has fallen off the bus)"
std::string XidReason(uint32_t xid);

class GpuHealthMonitor {
 public:
  // The monitor of the GPU with this UUID ("GPU-..."), or null (with a log
  // line saying why) where NVML cannot be loaded or does not know it.
  // `inject_xid`: a test hook (gpuq-worker's GPUQ_TEST_INJECT_XID): the first
  // Sample() reports one critical Xid event of this number, as if NVML had.
  static std::unique_ptr<GpuHealthMonitor> Open(const std::string& uuid, uint32_t inject_xid = 0);
  ~GpuHealthMonitor();
  GpuHealthMonitor(const GpuHealthMonitor&) = delete;
  GpuHealthMonitor& operator=(const GpuHealthMonitor&) = delete;

  // Reads the GPU now and takes the Xid events NVML has queued (never
  // waits). Once `drain` is set it stays set. One thread at a time.
  schema::GpuHealth Sample();

 private:
  struct Nvml;
  GpuHealthMonitor() = default;
  std::unique_ptr<Nvml> nvml_;
  schema::GpuHealth last_;
  uint32_t inject_xid_ = 0;
};

}  // namespace gpuq::worker
