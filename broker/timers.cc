// What the broker does as time passes (BrokerCore, core.h): deadlines,
// placements no worker matches, run-time limits, retention. Time is the
// broker's Clock, which tests drive.
#include "broker/core.h"

namespace gpuq::broker {

using schema::JobState;

// ---------------------------------------------------------------- timers

void BrokerCore::ExpireDeadlines() {
  for (uint64_t id : jobs_.Expired(clock_->UnixMs())) {
    // Once: a requeued job may be named twice (JobTable::Requeue).
    if (Job* job = jobs_.Find(id); job && job->state == JobState::kQueued) {
      Finish(*job, JobState::kExpired, Code::kExpired, "not started by its deadline");
    }
  }
}

void BrokerCore::FailUnmatched() {
  const auto now = clock_->Now();
  std::vector<uint64_t> unmatched;
  jobs_.ForEach([&](Job& job) {
    if (job.state != JobState::kQueued) return;
    bool matched = false;
    for (const auto& [id, w] : workers_.all()) {
      if (Matches(job, w)) {
        matched = true;
        break;
      }
    }
    if (matched) {
      job.last_matched = now;
      CheckCompileViable(job);
    } else if (now - job.last_matched > opt_.unmatched_grace) {
      unmatched.push_back(job.id);
    }
  });
  for (uint64_t id : unmatched) {
    Job* job = jobs_.Find(id);
    if (!job || job->state != JobState::kQueued) continue;
    const schema::Placement& p = job->spec->placement;
    std::string wants;
    if (!p.arch.empty()) wants += " arch " + p.arch;
    if (!p.gpu.empty()) wants += " gpu " + p.gpu;
    if (p.min_free_bytes) wants += " min_free " + std::to_string(p.min_free_bytes);
    Finish(*job, JobState::kFailed, Code::kUnavailable,
           "no connected worker matched its placement (" +
               (wants.empty() ? std::string("no workers") : wants.substr(1)) + ") for " +
               std::to_string(opt_.unmatched_grace.count()) + " ms");
  }
}

void BrokerCore::EnforceLimits() {
  const auto now = clock_->Now();
  const auto grace = opt_.heartbeat * opt_.heartbeat_misses;
  struct Over {
    std::string worker;
    uint64_t job;
    bool waiting;  // held by a worker that had not begun it
  };
  std::vector<Over> over;
  auto limit_of = [](const Job& job) { return std::chrono::milliseconds(job.spec->time_limit_ms); };
  for (auto& [wid, w] : workers_.all()) {
    // A worker that names the jobs it has begun (PROTOCOL.md, "Worker
    // lifecycle"): a begun job's limit counts from the heartbeat that first
    // named it; a job it holds but has not begun waits behind the others,
    // and the worker must begin or end some job at least once in the
    // longest limit it holds. Other workers: from the dispatch.
    std::chrono::milliseconds longest{0};
    if (w.reports_running) {
      for (const auto& [jid, held] : w.inflight) {
        if (const Job* job = jobs_.Find(jid); job && job->worker == wid) {
          longest = std::max(longest, limit_of(*job));
        }
      }
    }
    for (const auto& [jid, held] : w.inflight) {
      Job* job = jobs_.Find(jid);
      if (!job || job->state != JobState::kDispatched || job->worker != wid || job->loading) {
        continue;
      }
      const bool waiting = w.reports_running && !held.started;
      const bool past =
          !w.reports_running ? now - job->dispatched > limit_of(*job) + grace
          : !waiting         ? now - *held.started > limit_of(*job) + grace
                             : now - std::max(job->dispatched, w.last_progress) > longest + grace;
      if (past) over.push_back({wid, jid, waiting});
    }
  }
  for (const auto& [wid, jid, waiting] : over) {
    Job* job = jobs_.Find(jid);
    Worker* w = workers_.Find(wid);
    if (!job || !w || job->state != JobState::kDispatched) continue;
    const std::string name = w->name;
    schema::BrokerMessage bye;
    bye.op = schema::BrokerOp::kDisconnect;
    if (waiting) {
      // Nothing ran past a limit: the worker stopped beginning and ending
      // jobs. A loss like any other (its jobs are requeued).
      bye.error = "the worker began and ended no job for longer than the limits of its jobs";
      SendWorker(wid, bye);
      WorkerLost(wid, "it held job " + std::to_string(jid) +
                          " without beginning it, and began and ended no other job, for longer "
                          "than the limits of its jobs");
      continue;
    }
    workers_.TakeResult(*w, jid, job->attempt_no);
    Finish(*job, JobState::kFailed, Code::kTimeout,
           "ran past its limit of " + std::to_string(job->spec->time_limit_ms) + " ms on " +
               name + ", which did not end it");
    bye.error = "a job ran past its run-time limit and the worker did not end it";
    SendWorker(wid, bye);
    WorkerLost(wid, "it kept job " + std::to_string(jid) + " past its run-time limit");
  }
}

void BrokerCore::Purge() {
  batch_->purge_before_ms =
      clock_->UnixMs() - static_cast<int64_t>(opt_.retention.count()) * 1000;
}

}  // namespace gpuq::broker
