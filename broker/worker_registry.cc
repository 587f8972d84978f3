#include "broker/worker_registry.h"

#include <algorithm>
#include <set>

namespace gpuq::broker {

bool ModuleSet::Touch(const std::string& key) {
  auto it = index_.find(key);
  if (it != index_.end()) {
    order_.splice(order_.begin(), order_, it->second);
    return true;
  }
  if (capacity_ == 0) return false;
  order_.push_front(key);
  index_[key] = order_.begin();
  if (order_.size() > capacity_) {
    index_.erase(order_.back());
    order_.pop_back();
  }
  return false;
}

StatusOr<Worker*> WorkerRegistry::Ready(const std::string& id, const schema::WorkerMessage& ready,
                                        bool local, MonoTime now,
                                        const std::function<bool(const std::string&)>& can_target) {
  if (ready.slots == 0) {
    return Error(Code::kInvalid, "a worker needs at least one slot (ready said slots: 0)");
  }
  const std::string arch = ready.device.Arch();
  if (!can_target(arch)) {
    return Error(Code::kInvalid, "this broker's compiler cannot build kernels for " + arch +
                                     " (" + ready.device.name + ")");
  }
  Worker& w = workers_[id];
  w = Worker();
  w.id = id;
  w.name = ready.worker;
  w.device = ready.device;
  w.arch = arch;
  w.slots = w.credits = ready.slots;
  w.modules = ModuleSet(ready.module_slots);
  w.last_seen = now;
  w.last_progress = now;
  w.local = local;
  w.health = ready.health;
  w.token = ready.token;
  if (!w.token.empty()) by_token_[w.token] = id;
  ArchsChanged();
  return &w;
}

Worker* WorkerRegistry::Find(const std::string& id) {
  auto it = workers_.find(id);
  return it == workers_.end() ? nullptr : &it->second;
}

Worker* WorkerRegistry::FindByToken(const std::string& token) {
  auto it = by_token_.find(token);
  return it == by_token_.end() ? nullptr : Find(it->second);
}

Worker WorkerRegistry::Remove(const std::string& id) {
  auto it = workers_.find(id);
  if (it == workers_.end()) return Worker();
  Worker w = std::move(it->second);
  workers_.erase(it);
  auto t = by_token_.find(w.token);
  if (t != by_token_.end() && t->second == id) by_token_.erase(t);
  ArchsChanged();
  return w;
}

void WorkerRegistry::Dispatched(Worker& w, uint64_t job, uint32_t attempt, bool suspect) {
  Worker::Held& held = w.inflight[job] = Worker::Held();
  held.attempt = attempt;
  --w.credits;
  if (suspect) w.exclusive = true;
}

WorkerRegistry::ResultFor WorkerRegistry::TakeResult(
    Worker& w, uint64_t job, uint32_t attempt, std::optional<std::string>* counted_tenant) {
  auto it = w.inflight.find(job);
  if (it == w.inflight.end() || it->second.attempt != attempt) return ResultFor::kStale;
  const bool abandoned = it->second.abandoned;
  if (counted_tenant && it->second.tenant_counted) *counted_tenant = it->second.tenant;
  w.inflight.erase(it);
  w.credits = std::min(w.slots, w.credits + 1);
  w.exclusive = false;
  return abandoned ? ResultFor::kAbandoned : ResultFor::kCurrent;
}

void WorkerRegistry::Abandon(Worker& w, uint64_t job, std::optional<std::string> tenant) {
  auto it = w.inflight.find(job);
  if (it == w.inflight.end()) return;
  it->second.abandoned = true;
  if (tenant) {
    it->second.tenant_counted = true;
    it->second.tenant = std::move(*tenant);
  }
}

std::vector<std::string> WorkerRegistry::SilentSince(MonoTime before) const {
  std::vector<std::string> out;
  for (const auto& [id, w] : workers_) {
    if (w.last_seen < before) out.push_back(id);
  }
  return out;
}

void WorkerRegistry::ArchsChanged() {
  std::set<std::string> archs;
  for (const auto& [id, w] : workers_) archs.insert(w.arch);
  archs_.assign(archs.begin(), archs.end());
}

}  // namespace gpuq::broker
