// The order in which queued jobs are dispatched: strict priority (9 first);
// within a priority, weighted fair share of GPU time between tenants; within
// a tenant, first in first out. Owned by the broker loop thread: not
// thread-safe.
//
// Fair share: each tenant has a virtual time, the GPU time charged to it
// divided by its weight; the backlogged tenant with the least goes next
// (ties: round robin). A dispatch charges the tenant's estimate of a job's
// GPU time (the mean of its recent jobs) at once, so that many dispatches
// in a row divide fairly too; Settle() puts the true time in its place when
// the job leaves its GPU. A tenant that was idle starts at the least
// virtual time among the backlogged, so idling banks no credit. With equal
// weights and like jobs this is round robin.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace gpuq::broker {

class Scheduler {
 public:
  void Push(uint64_t id, const std::string& tenant, uint32_t priority);
  // Removes a queued job (canceled, expired). Returns false if not queued.
  bool Remove(uint64_t id);
  // The next job, in the order above, for which `eligible` holds; jobs that
  // are not eligible keep their place. At most `max_scan` jobs are looked at
  // per tenant and priority, which bounds the cost of one call.
  // `tenant_ok` (when set) skips a tenant's jobs altogether (one at its
  // concurrency limit). The job's charge is Charged() until the next Pop.
  std::optional<uint64_t> Pop(const std::function<bool(uint64_t)>& eligible,
                              size_t max_scan = 64,
                              const std::function<bool(const std::string&)>& tenant_ok = {});
  // What the last Pop charged its tenant (µs of GPU time, before weight).
  double Charged() const { return last_charge_; }
  // A job of `tenant` charged `charged` µs has held its GPU `actual` µs.
  void Settle(const std::string& tenant, double charged, double actual);
  // Weights by tenant (> 0); 1 for all when unset.
  void SetWeights(std::function<double(const std::string&)> weight) {
    weight_ = std::move(weight);
  }
  // GPU time charged to `tenant` so far, µs (for tests and stats).
  double ChargedTo(const std::string& tenant) const;

  size_t size() const { return where_.size(); }
  size_t TenantSize(const std::string& tenant) const;
  std::map<uint32_t, uint64_t> SizeByPriority() const;
  // One tenant's queued jobs by priority.
  std::map<uint32_t, uint64_t> SizeByPriority(const std::string& tenant) const;
  // Jobs queued by tenant: the `most` tenants with the most, the rest summed
  // as "other" (tenant names on the ipc endpoint are the caller's word: a
  // stats reply, and the loop that makes it, stay bounded however many).
  std::map<std::string, uint64_t> SizeByTenant(size_t most) const;

 private:
  struct Level {
    std::map<std::string, std::deque<uint64_t>> tenants;
    std::string last_served;  // round-robin cursor, for ties
  };
  struct Share {
    double vtime = 0;           // charged GPU time / weight
    double charged = 0;         // charged GPU time, µs
    double estimate = 1000;     // a job's GPU time, µs (moving mean)
  };
  double Weight(const std::string& tenant) const;
  double MinBackloggedVtime() const;
  struct Place {
    std::string tenant;
    uint32_t priority;
  };
  std::map<uint32_t, Level, std::greater<>> levels_;
  std::unordered_map<uint64_t, Place> where_;
  std::unordered_map<std::string, size_t> tenant_sizes_;
  std::unordered_map<std::string, Share> shares_;
  std::function<double(const std::string&)> weight_;
  double last_charge_ = 0;
  using TenantQueue = std::map<std::string, std::deque<uint64_t>>::iterator;
  std::vector<std::pair<double, TenantQueue>> order_;  // Pop's, kept for its capacity
  static constexpr size_t kMaxIdleShares = 4096;
};

}  // namespace gpuq::broker
