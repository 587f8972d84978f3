#include "worker/regions.h"

#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>

#include <vector>

#include "schema/region_channel.h"

namespace gpuq::worker {

using Clock = std::chrono::steady_clock;

WorkerRegions::Region::~Region() {
  if (pinned && cu) (void)cu->cuMemHostUnregister(map.data());
}

WorkerRegions::WorkerRegions(std::shared_ptr<const CudaDriver> cu, CUcontext ctx,
                             std::string local_dir, std::string token)
    : cu_(std::move(cu)),
      ctx_(ctx),
      local_dir_(std::move(local_dir)),
      token_(std::move(token)),
      stop_fd_(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {}

WorkerRegions::~WorkerRegions() {
  stop_.store(true);
  if (stop_fd_.valid()) {
    const uint64_t one = 1;
    (void)!write(stop_fd_.get(), &one, sizeof one);
  }
  if (thread_.joinable()) thread_.join();
}

void WorkerRegions::Start() {
  Connect();
  thread_ = std::thread([this] { Loop(); });
}

void WorkerRegions::Connect() {
  auto c = schema::ConnectRegionChannel(local_dir_, token_);
  if (c.ok()) {
    chan_ = std::move(*c);
  } else {
    spdlog::debug("region channel: {}", c.status().ToString());
  }
}

std::shared_ptr<const WorkerRegions::Region> WorkerRegions::Get(uint64_t id,
                                                                std::chrono::milliseconds wait) {
  const auto until = Clock::now() + wait;
  MutexLock lock(&mu_);
  for (;;) {
    auto it = regions_.find(id);
    if (it != regions_.end()) return it->second;
    if (!changed_.WaitUntil(until)) return nullptr;
  }
}

void WorkerRegions::Loop() {
  if (cu_->cuCtxSetCurrent(ctx_) != CUDA_SUCCESS) return;
  while (!stop_.load()) {
    if (!chan_.valid()) {
      pollfd p{stop_fd_.get(), POLLIN, 0};
      (void)poll(&p, 1, 200);
      if (!stop_.load()) Connect();
      continue;
    }
    pollfd p[2] = {{chan_.get(), POLLIN, 0}, {stop_fd_.get(), POLLIN, 0}};
    (void)poll(p, 2, 1000);
    if (p[0].revents && !Read()) {
      // The broker went away (or restarted): its regions went with it.
      spdlog::info("region channel closed by the broker; its regions are released");
      chan_.Reset();
      std::map<uint64_t, std::shared_ptr<const Region>> gone;
      {
        MutexLock lock(&mu_);
        gone.swap(regions_);
      }
    }
  }
  std::map<uint64_t, std::shared_ptr<const Region>> gone;
  MutexLock lock(&mu_);
  gone.swap(regions_);
}

bool WorkerRegions::Read() {
  for (;;) {
    schema::RegionMessage m;
    UniqueFd fd;
    auto got = schema::ReadRegionMessage(chan_.get(), /*dontwait=*/true, &m, &fd);
    if (!got.ok()) return false;
    if (!*got) return true;
    if (m.op == schema::RegionOp::kDrop) {
      std::shared_ptr<const Region> gone;  // released after the lock
      MutexLock lock(&mu_);
      auto it = regions_.find(m.region);
      if (it != regions_.end()) {
        gone = std::move(it->second);
        regions_.erase(it);
      }
      continue;
    }
    if (m.op != schema::RegionOp::kRegion || !fd.valid()) continue;
    auto map = Mapping::Map(fd.get(), m.size);
    if (!map.ok()) {
      spdlog::error("region {} not mapped: {}", m.region, map.status().ToString());
      continue;
    }
    auto r = std::make_shared<Region>();
    r->id = m.region;
    r->map = std::move(*map);
    r->cu = cu_.get();
    const auto t0 = Clock::now();
    // Portable: every context of the process may copy from it at full speed.
    const CUresult e = cu_->cuMemHostRegister(r->map.data(), r->map.size(),
                                              CU_MEMHOSTREGISTER_PORTABLE);
    r->pin_us = static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - t0).count());
    r->pinned = e == CUDA_SUCCESS;
    if (r->pinned) {
      spdlog::info("region {}: {} bytes mapped and page-locked in {:.1f} ms", m.region, m.size,
                   static_cast<double>(r->pin_us) / 1000.0);
    } else {
      spdlog::warn("region {}: {} bytes mapped but not page-locked ({}); its copies run at "
                   "pageable speed",
                   m.region, m.size, cu_->Describe(e));
    }
    MutexLock lock(&mu_);
    regions_[m.region] = std::move(r);
    changed_.SignalAll();
  }
}

}  // namespace gpuq::worker
