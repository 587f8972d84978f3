// The order in which queued jobs are dispatched: strict priority (9 first);
// within a priority, round robin over tenants, so that one tenant's flood
// does not starve another's jobs; within a tenant, first in first out. Owned
// by the broker loop thread: not thread-safe.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <unordered_map>

namespace gpuq::broker {

class Scheduler {
 public:
  void Push(uint64_t id, const std::string& tenant, uint32_t priority);
  // Removes a queued job (canceled, expired). Returns false if not queued.
  bool Remove(uint64_t id);
  // The next job, in the order above, for which `eligible` holds; jobs that
  // are not eligible keep their place. At most `max_scan` jobs are looked at
  // per tenant and priority, which bounds the cost of one call.
  std::optional<uint64_t> Pop(const std::function<bool(uint64_t)>& eligible,
                              size_t max_scan = 64);

  size_t size() const { return where_.size(); }
  size_t TenantSize(const std::string& tenant) const;
  std::map<uint32_t, uint64_t> SizeByPriority() const;
  // One tenant's queued jobs by priority.
  std::map<uint32_t, uint64_t> SizeByPriority(const std::string& tenant) const;
  std::map<std::string, uint64_t> SizeByTenant() const;

 private:
  struct Level {
    std::map<std::string, std::deque<uint64_t>> tenants;
    std::string last_served;  // round-robin cursor
  };
  struct Place {
    std::string tenant;
    uint32_t priority;
  };
  std::map<uint32_t, Level, std::greater<>> levels_;
  std::unordered_map<uint64_t, Place> where_;
  std::unordered_map<std::string, size_t> tenant_sizes_;
};

}  // namespace gpuq::broker
