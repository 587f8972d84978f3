#include "broker/scheduler.h"

#include <algorithm>
#include <vector>

namespace gpuq::broker {

void Scheduler::Push(uint64_t id, const std::string& tenant, uint32_t priority) {
  if (!where_.emplace(id, Place{tenant, priority}).second) return;
  if (!tenant_sizes_.count(tenant)) {
    // Back from idle: no credit for the time it had nothing queued.
    Share& share = shares_[tenant];
    share.vtime = std::max(share.vtime, MinBackloggedVtime());
  }
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
  if (--tenant_sizes_[it->second.tenant] == 0) {
    tenant_sizes_.erase(it->second.tenant);
    // Shares of tenants with nothing queued are forgotten once there are
    // many (tenant names on the ipc endpoint are the caller's word); one
    // that comes back starts level with the backlogged anyway.
    if (shares_.size() > kMaxIdleShares) shares_.erase(it->second.tenant);
  }
  if (level.tenants.empty()) levels_.erase(it->second.priority);
  where_.erase(it);
  return true;
}

std::optional<uint64_t> Scheduler::Pop(const std::function<bool(uint64_t)>& eligible,
                                       size_t max_scan,
                                       const std::function<bool(const std::string&)>& tenant_ok) {
  std::vector<std::pair<double, TenantQueue>>& order = order_;
  for (auto& [priority, level] : levels_) {
    // Tenants by virtual time; ties in round-robin order after the cursor.
    order.clear();
    auto start = level.tenants.upper_bound(level.last_served);
    auto it = start;
    for (size_t visited = 0; visited < level.tenants.size(); ++visited, ++it) {
      if (it == level.tenants.end()) it = level.tenants.begin();
      if (tenant_ok && !tenant_ok(it->first)) continue;
      auto share = shares_.find(it->first);
      order.emplace_back(share == shares_.end() ? 0.0 : share->second.vtime, it);
    }
    if (order.size() > 1) {
      std::stable_sort(order.begin(), order.end(),
                       [](const auto& a, const auto& b) { return a.first < b.first; });
    }
    for (const auto& [vtime, tq] : order) {
      const std::string* name = &tq->first;
      std::deque<uint64_t>& q = tq->second;
      const size_t scan = std::min(max_scan, q.size());
      for (size_t i = 0; i < scan; ++i) {
        const uint64_t id = q[i];
        if (!eligible(id)) continue;
        const std::string tenant = *name;
        level.last_served = tenant;
        Share& share = shares_[tenant];
        last_charge_ = share.estimate;
        share.charged += share.estimate;
        share.vtime += share.estimate / Weight(tenant);
        Remove(id);  // may erase `level`: return at once
        return id;
      }
    }
  }
  return std::nullopt;
}

void Scheduler::Settle(const std::string& tenant, double charged, double actual) {
  Share& share = shares_[tenant];
  share.charged += actual - charged;
  share.vtime += (actual - charged) / Weight(tenant);
  // A mean over about the last 16 jobs.
  share.estimate += (std::max(actual, 1.0) - share.estimate) / 16.0;
}

double Scheduler::ChargedTo(const std::string& tenant) const {
  auto it = shares_.find(tenant);
  return it == shares_.end() ? 0.0 : it->second.charged;
}

double Scheduler::Weight(const std::string& tenant) const {
  const double w = weight_ ? weight_(tenant) : 1.0;
  return w > 0 ? w : 1.0;
}

double Scheduler::MinBackloggedVtime() const {
  double least = 0;
  bool any = false;
  for (const auto& [tenant, n] : tenant_sizes_) {
    auto it = shares_.find(tenant);
    const double v = it == shares_.end() ? 0.0 : it->second.vtime;
    if (!any || v < least) least = v;
    any = true;
  }
  return least;
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

std::map<std::string, uint64_t> Scheduler::SizeByTenant(size_t most) const {
  if (tenant_sizes_.size() <= most) return {tenant_sizes_.begin(), tenant_sizes_.end()};
  // Chosen without copying a name (linear time); only the chosen are copied.
  std::vector<std::pair<uint64_t, const std::string*>> by_size;
  by_size.reserve(tenant_sizes_.size());
  for (const auto& [tenant, n] : tenant_sizes_) by_size.emplace_back(n, &tenant);
  const auto cut = by_size.begin() + static_cast<std::ptrdiff_t>(most);
  std::nth_element(by_size.begin(), cut, by_size.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });
  std::map<std::string, uint64_t> out;
  for (auto it = by_size.begin(); it != cut; ++it) out[*it->second] += it->first;
  uint64_t rest = 0;
  for (auto it = cut; it != by_size.end(); ++it) rest += it->first;
  out["other"] += rest;
  return out;
}

}  // namespace gpuq::broker
