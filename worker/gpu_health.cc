#include "worker/gpu_health.h"

#include <dlfcn.h>
#include <spdlog/spdlog.h>

#include <map>

namespace gpuq::worker {

namespace {

// The parts of NVML's C API used here (nvml.h, which the CUDA toolkit does
// not ship; these are stable across driver versions).
using nvmlReturn_t = int;
using nvmlDevice_t = struct nvmlDevice_st*;
using nvmlEventSet_t = struct nvmlEventSet_st*;
struct nvmlUtilization_t {
  unsigned int gpu, memory;
};
struct nvmlMemory_t {
  unsigned long long total, free, used;
};
// Version 2 leaves the driver's reserved memory out of `used`, as
// nvidia-smi does (version 1 counts it as used).
struct nvmlMemory_v2_t {
  unsigned int version;
  unsigned long long total, reserved, free, used;
};
constexpr unsigned int kMemoryV2 = sizeof(nvmlMemory_v2_t) | (2u << 24);
struct nvmlEventData_t {
  nvmlDevice_t device;
  unsigned long long eventType, eventData;
  unsigned int gpuInstanceId, computeInstanceId;
};
constexpr nvmlReturn_t kNvmlSuccess = 0;
constexpr int kTemperatureGpu = 0;
constexpr int kEccCorrected = 0, kEccUncorrected = 1, kVolatileEcc = 0;
constexpr unsigned long long kEventXidCritical = 0x8;

}  // namespace

struct GpuHealthMonitor::Nvml {
  void* lib = nullptr;
  nvmlReturn_t (*Init)() = nullptr;
  nvmlReturn_t (*Shutdown)() = nullptr;
  const char* (*ErrorString)(nvmlReturn_t) = nullptr;
  nvmlReturn_t (*GetHandleByUUID)(const char*, nvmlDevice_t*) = nullptr;
  nvmlReturn_t (*GetUtilizationRates)(nvmlDevice_t, nvmlUtilization_t*) = nullptr;
  nvmlReturn_t (*GetMemoryInfo)(nvmlDevice_t, nvmlMemory_t*) = nullptr;
  nvmlReturn_t (*GetMemoryInfoV2)(nvmlDevice_t, nvmlMemory_v2_t*) = nullptr;  // may be absent
  nvmlReturn_t (*GetTemperature)(nvmlDevice_t, int, unsigned int*) = nullptr;
  nvmlReturn_t (*GetPowerUsage)(nvmlDevice_t, unsigned int*) = nullptr;
  nvmlReturn_t (*GetTotalEccErrors)(nvmlDevice_t, int, int, unsigned long long*) = nullptr;
  nvmlReturn_t (*EventSetCreate)(nvmlEventSet_t*) = nullptr;
  nvmlReturn_t (*RegisterEvents)(nvmlDevice_t, unsigned long long, nvmlEventSet_t) = nullptr;
  nvmlReturn_t (*EventSetWait)(nvmlEventSet_t, nvmlEventData_t*, unsigned int) = nullptr;
  nvmlReturn_t (*EventSetFree)(nvmlEventSet_t) = nullptr;
  bool initialized = false;
  nvmlDevice_t device = nullptr;
  nvmlEventSet_t events = nullptr;  // null where Xid events cannot be had

  std::string Error(nvmlReturn_t r) const {
    return ErrorString ? ErrorString(r) : "NVML error " + std::to_string(r);
  }
  ~Nvml() {
    if (events) EventSetFree(events);
    if (initialized) Shutdown();
    if (lib) dlclose(lib);
  }
};

const std::set<uint32_t>& DrainingXids() {
  static const std::set<uint32_t> xids = {48, 63, 64, 74, 79, 92, 94, 95, 119, 120, 140};
  return xids;
}

std::string XidReason(uint32_t xid) {
  static const std::map<uint32_t, const char*> what = {
      {48, "double-bit ECC error"},
      {63, "ECC page retirement or row remapping"},
      {64, "ECC page retirement or row remapping failure"},
      {74, "NVLink error"},
      {79, "GPU has fallen off the bus"},
      {92, "high single-bit ECC error rate"},
      {94, "contained memory error"},
      {95, "uncontained memory error"},
      {119, "GSP RPC timeout"},
      {120, "GSP error"},
      {140, "unrecovered ECC error"},
  };
  auto it = what.find(xid);
  return "critical Xid " + std::to_string(xid) +
         (it == what.end() ? std::string() : std::string(" (") + it->second + ")");
}

std::unique_ptr<GpuHealthMonitor> GpuHealthMonitor::Open(const std::string& uuid,
                                                         uint32_t inject_xid) {
  auto n = std::make_unique<Nvml>();
  n->lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!n->lib) {
    spdlog::info("no GPU health: NVML (libnvidia-ml.so.1) is not on this machine");
    return nullptr;
  }
  bool all = true;
  auto load = [&](auto& fn, const char* name) {
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(n->lib, name));
    all = all && fn != nullptr;
  };
  load(n->Init, "nvmlInit_v2");
  load(n->Shutdown, "nvmlShutdown");
  load(n->ErrorString, "nvmlErrorString");
  load(n->GetHandleByUUID, "nvmlDeviceGetHandleByUUID");
  load(n->GetUtilizationRates, "nvmlDeviceGetUtilizationRates");
  load(n->GetMemoryInfo, "nvmlDeviceGetMemoryInfo");
  load(n->GetTemperature, "nvmlDeviceGetTemperature");
  load(n->GetPowerUsage, "nvmlDeviceGetPowerUsage");
  load(n->GetTotalEccErrors, "nvmlDeviceGetTotalEccErrors");
  load(n->EventSetCreate, "nvmlEventSetCreate");
  load(n->RegisterEvents, "nvmlDeviceRegisterEvents");
  load(n->EventSetWait, "nvmlEventSetWait_v2");
  load(n->EventSetFree, "nvmlEventSetFree");
  if (!all) {
    spdlog::warn("no GPU health: this NVML lacks a function gpuq needs");
    return nullptr;
  }
  n->GetMemoryInfoV2 = reinterpret_cast<decltype(n->GetMemoryInfoV2)>(
      dlsym(n->lib, "nvmlDeviceGetMemoryInfo_v2"));
  if (nvmlReturn_t r = n->Init(); r != kNvmlSuccess) {
    spdlog::warn("no GPU health: NVML does not initialize: {}", n->Error(r));
    return nullptr;
  }
  n->initialized = true;
  if (nvmlReturn_t r = n->GetHandleByUUID(uuid.c_str(), &n->device); r != kNvmlSuccess) {
    spdlog::warn("no GPU health: NVML does not know {}: {}", uuid, n->Error(r));
    return nullptr;
  }
  nvmlEventSet_t set = nullptr;
  if (nvmlReturn_t r = n->EventSetCreate(&set); r != kNvmlSuccess) {
    spdlog::warn("GPU health without Xid events: {}", n->Error(r));
  } else if (nvmlReturn_t r2 = n->RegisterEvents(n->device, kEventXidCritical, set);
             r2 != kNvmlSuccess) {
    spdlog::warn("GPU health without Xid events: {}", n->Error(r2));
    n->EventSetFree(set);
  } else {
    n->events = set;
  }
  std::unique_ptr<GpuHealthMonitor> m(new GpuHealthMonitor());
  m->nvml_ = std::move(n);
  m->inject_xid_ = inject_xid;
  return m;
}

GpuHealthMonitor::~GpuHealthMonitor() = default;

schema::GpuHealth GpuHealthMonitor::Sample() {
  const Nvml& n = *nvml_;
  schema::GpuHealth h = last_;
  h.known = true;
  // A reading NVML does not support (power on some boards, ECC where it is
  // off) keeps its last value, 0 at first.
  nvmlUtilization_t util{};
  if (n.GetUtilizationRates(n.device, &util) == kNvmlSuccess) h.util_pct = std::min(util.gpu, 100u);
  nvmlMemory_v2_t mem2{};
  mem2.version = kMemoryV2;
  nvmlMemory_t mem{};
  if (n.GetMemoryInfoV2 && n.GetMemoryInfoV2(n.device, &mem2) == kNvmlSuccess) {
    h.mem_used_bytes = mem2.used;
  } else if (n.GetMemoryInfo(n.device, &mem) == kNvmlSuccess) {
    h.mem_used_bytes = mem.used;
  }
  unsigned int temp = 0, power = 0;
  if (n.GetTemperature(n.device, kTemperatureGpu, &temp) == kNvmlSuccess) {
    h.temp_c = std::min(temp, 1000u);
  }
  if (n.GetPowerUsage(n.device, &power) == kNvmlSuccess) h.power_mw = power;
  unsigned long long ecc = 0;
  if (n.GetTotalEccErrors(n.device, kEccCorrected, kVolatileEcc, &ecc) == kNvmlSuccess) {
    h.ecc_corrected = ecc;
  }
  if (n.GetTotalEccErrors(n.device, kEccUncorrected, kVolatileEcc, &ecc) == kNvmlSuccess) {
    h.ecc_uncorrected = ecc;
  }
  auto on_xid = [&](uint32_t xid) {
    ++h.xid_events;
    h.last_xid = xid;
    spdlog::warn("GPU event: {}", XidReason(xid));
    if (h.drain.empty() && DrainingXids().count(xid)) h.drain = XidReason(xid);
  };
  if (inject_xid_) {
    on_xid(inject_xid_);
    inject_xid_ = 0;
  }
  if (n.events) {
    for (int i = 0; i < 64; ++i) {
      nvmlEventData_t e{};
      if (n.EventSetWait(n.events, &e, 0) != kNvmlSuccess) break;  // none queued (timeout)
      if (e.eventType & kEventXidCritical) on_xid(static_cast<uint32_t>(e.eventData));
    }
  }
  if (h.drain.empty() && h.ecc_uncorrected > 0) {
    h.drain = std::to_string(h.ecc_uncorrected) + " uncorrectable ECC errors";
  }
  last_ = h;
  return h;
}

}  // namespace gpuq::worker
