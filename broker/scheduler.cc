#include "broker/scheduler.h"

#include <algorithm>

namespace gpuq::broker {

void Scheduler::Push(uint64_t id, const std::string& tenant, uint32_t priority) {
  if (!where_.emplace(id, Place{tenant, priority}).second) return;
  levels_[priority].tenants[tenant].push_back(id);
  ++tenant_sizes_[tenant];
}

bool Scheduler::Remove(uint64_t id) {
  auto it = where_.find(id);
  if (it == where_.end()) return false;
  Level& level = levels_[it->second.priority];
  auto t = level.tenants.find(it->second.tenant);
  if (t != level.tenants.end()) {
    auto pos = std::find(t->second.begin(), t->second.end(), id);
    if (pos != t->second.end()) t->second.erase(pos);
    if (t->second.empty()) level.tenants.erase(t);
  }
  if (--tenant_sizes_[it->second.tenant] == 0) tenant_sizes_.erase(it->second.tenant);
  if (level.tenants.empty()) levels_.erase(it->second.priority);
  where_.erase(it);
  return true;
}

std::optional<uint64_t> Scheduler::Pop(const std::function<bool(uint64_t)>& eligible,
                                       size_t max_scan) {
  for (auto& [priority, level] : levels_) {
    // Tenants after the cursor first, then from the start: round robin.
    auto start = level.tenants.upper_bound(level.last_served);
    const size_t n = level.tenants.size();
    auto it = start;
    for (size_t visited = 0; visited < n; ++visited, ++it) {
      if (it == level.tenants.end()) it = level.tenants.begin();
      std::deque<uint64_t>& q = it->second;
      const size_t scan = std::min(max_scan, q.size());
      for (size_t i = 0; i < scan; ++i) {
        const uint64_t id = q[i];
        if (!eligible(id)) continue;
        level.last_served = it->first;
        Remove(id);  // may erase `level`: return at once
        return id;
      }
    }
  }
  return std::nullopt;
}

size_t Scheduler::TenantSize(const std::string& tenant) const {
  auto it = tenant_sizes_.find(tenant);
  return it == tenant_sizes_.end() ? 0 : it->second;
}

std::map<uint32_t, uint64_t> Scheduler::SizeByPriority() const {
  std::map<uint32_t, uint64_t> out;
  for (const auto& [p, level] : levels_) {
    for (const auto& [t, q] : level.tenants) out[p] += q.size();
  }
  return out;
}

std::map<uint32_t, uint64_t> Scheduler::SizeByPriority(const std::string& tenant) const {
  std::map<uint32_t, uint64_t> out;
  for (const auto& [p, level] : levels_) {
    auto t = level.tenants.find(tenant);
    if (t != level.tenants.end()) out[p] = t->second.size();
  }
  return out;
}

std::map<std::string, uint64_t> Scheduler::SizeByTenant() const {
  return {tenant_sizes_.begin(), tenant_sizes_.end()};
}

}  // namespace gpuq::broker
