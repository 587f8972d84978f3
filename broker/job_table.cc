#include "broker/job_table.h"

namespace gpuq::broker {

uint64_t SpecTextBytes(const schema::JobSpec& spec) {
  uint64_t n = 0;
  auto add = [&n](const schema::KernelSpec& k) {
    n += k.source.size() + k.entry.size();
    for (const auto& h : k.headers) n += h.name.size() + h.content.size();
    for (const auto& o : k.options) n += o.size();
  };
  add(spec.kernel);
  for (const schema::KernelSpec& k : spec.sources) add(k);
  return n;
}

Status JobTable::CanAdmit(const std::string& tenant, uint64_t bytes, uint64_t* retry_after_ms,
                          uint64_t max_queued, uint64_t max_queued_bytes) const {
  if (active_ + 1 > bounds_.jobs) {
    *retry_after_ms = 100;
    return Error(Code::kQueueFull, "the broker holds " + std::to_string(bounds_.jobs) +
                                       " jobs, its limit");
  }
  const uint64_t per_tenant = max_queued ? max_queued : bounds_.jobs_per_tenant;
  if (active_of(tenant) + 1 > per_tenant) {
    *retry_after_ms = 250;
    return Error(Code::kQueueFull, "tenant " + tenant + " has " + std::to_string(per_tenant) +
                                       " jobs queued or running, its limit");
  }
  if (max_queued_bytes) {
    auto held = active_bytes_by_tenant_.find(tenant);
    const uint64_t has = held == active_bytes_by_tenant_.end() ? 0 : held->second;
    if (bytes > max_queued_bytes - std::min(max_queued_bytes, has)) {
      *retry_after_ms = 250;
      return Error(Code::kQueueFull, "tenant " + tenant + "'s queued jobs' bytes (inputs, sources) would pass its limit of " +
                                         std::to_string(max_queued_bytes) + " bytes (" +
                                         std::to_string(has) + " held, " +
                                         std::to_string(bytes) + " more asked)");
    }
  }
  if (bytes > bounds_.bytes - std::min(bounds_.bytes, active_bytes_)) {
    *retry_after_ms = 250;
    return Error(Code::kQueueFull,
                 "the bytes of queued jobs (inputs, sources) would pass their limit of " +
                     std::to_string(bounds_.bytes) + " bytes (" +
                     std::to_string(active_bytes_) + " held, " + std::to_string(bytes) +
                     " more asked)");
  }
  return Status::Ok();
}

Job& JobTable::Add(std::unique_ptr<Job> job) {
  Job& j = *job;
  ++active_;
  ++active_by_tenant_[j.tenant];
  active_bytes_ += j.held_bytes;
  if (j.held_bytes) active_bytes_by_tenant_[j.tenant] += j.held_bytes;
  if (!j.key.empty()) keys_[{j.tenant, j.key}] = j.id;
  if (j.deadline_ms) {
    deadlines_.push({j.deadline_ms, j.id});
    ++with_deadline_;
  }
  jobs_[j.id] = std::move(job);
  return j;
}

Job* JobTable::Find(uint64_t id) {
  auto it = jobs_.find(id);
  return it == jobs_.end() ? nullptr : it->second.get();
}

Job* JobTable::FindByKey(const std::string& tenant, const std::string& key) {
  auto it = keys_.find({tenant, key});
  return it == keys_.end() ? nullptr : Find(it->second);
}

void JobTable::Queue(Job& job) {
  job.state = schema::JobState::kQueued;
  job.worker.clear();
  scheduler_.Push(job.id, job.tenant, job.priority);
}

void JobTable::Requeue(Job& job) {
  Queue(job);
  // A job whose first entry is still there is named twice by Expired()
  // (its caller ends it once); CompactDeadlines() drops what is left.
  if (job.deadline_ms) deadlines_.push({job.deadline_ms, job.id});
}

void JobTable::Unqueue(Job& job) { scheduler_.Remove(job.id); }

void JobTable::End(Job& job, schema::JobState state) {
  const bool was_active = !job.ended();
  if (was_active) Release(job);
  scheduler_.Remove(job.id);
  job.state = state;
  if (was_active) CompactDeadlines();
}

void JobTable::Release(Job& job) {
  --active_;
  if (job.deadline_ms) with_deadline_ -= std::min<uint64_t>(with_deadline_, 1);
  active_bytes_ -= std::min(active_bytes_, job.held_bytes);
  auto t = active_by_tenant_.find(job.tenant);
  if (t != active_by_tenant_.end() && --t->second == 0) active_by_tenant_.erase(t);
  auto b = active_bytes_by_tenant_.find(job.tenant);
  if (b != active_bytes_by_tenant_.end()) {
    b->second -= std::min(b->second, job.held_bytes);
    if (b->second == 0) active_bytes_by_tenant_.erase(b);
  }
}

void JobTable::Remove(uint64_t id) {
  auto it = jobs_.find(id);
  if (it == jobs_.end()) return;
  Job& job = *it->second;
  if (!job.ended()) Release(job);
  scheduler_.Remove(id);
  if (!job.key.empty()) {
    auto k = keys_.find({job.tenant, job.key});
    if (k != keys_.end() && k->second == id) keys_.erase(k);
  }
  jobs_.erase(it);
  CompactDeadlines();
}

void JobTable::CompactDeadlines() {
  constexpr size_t kSmall = 1024;  // below this, never worth a pass
  if (deadlines_.size() <= kSmall || deadlines_.size() <= 2 * with_deadline_) return;
  std::vector<Deadline> live;
  live.reserve(with_deadline_);
  for (const auto& [id, job] : jobs_) {
    if (job->deadline_ms && !job->ended()) live.emplace_back(job->deadline_ms, id);
  }
  deadlines_ = decltype(deadlines_)(std::greater<>(), std::move(live));
}

std::vector<uint64_t> JobTable::Expired(int64_t now_ms) {
  std::vector<uint64_t> out, later;
  while (!deadlines_.empty() && deadlines_.top().first <= now_ms) {
    const uint64_t id = deadlines_.top().second;
    deadlines_.pop();
    Job* j = Find(id);
    if (!j || j->state != schema::JobState::kQueued) continue;
    // A job whose row has not committed yet expires once it has.
    (j->durable ? out : later).push_back(id);
  }
  for (uint64_t id : later) deadlines_.push({now_ms + 1, id});
  return out;
}

uint64_t JobTable::active_of(const std::string& tenant) const {
  auto it = active_by_tenant_.find(tenant);
  return it == active_by_tenant_.end() ? 0 : it->second;
}

}  // namespace gpuq::broker
