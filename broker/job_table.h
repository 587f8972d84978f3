// The jobs the broker holds in memory, and the bounds on them.
//
// A job is in the table from its acceptance (before its row commits) until
// its result has committed. Admission bounds are exact: every job not yet
// ended counts against them from the moment it is admitted, with every
// byte of its inputs (payload frames and local files alike), until it ends;
// an ended job whose result is still being written no longer counts.
//
// Owned by the broker loop thread: not thread-safe.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <queue>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>
#include <zmq.hpp>

#include "broker/compile/compile_service.h"
#include "broker/connections.h"
#include "broker/request_context.h"
#include "broker/scheduler.h"
#include "schema/messages.h"
#include "util/clock.h"

namespace gpuq::broker {

// The bytes of a spec's texts: every source, header (name and content) and
// option, of the job's kernel and of its other sources.
uint64_t SpecTextBytes(const schema::JobSpec& spec);

// One input buffer of a job, in payload-index order (frames, then files, as
// the submit named them).
struct JobInput {
  uint64_t size = 0;
  zmq::message_t bytes;  // held in memory (submitted in this lifetime, or loaded)
  bool in_memory = false;
  std::string path;  // a file of the local directory (full path); "" if none
};

struct Job {
  uint64_t id = 0;
  std::string tenant, key;
  ConnectionRef submitter;  // invalid for a job resumed after a restart
  uint32_t priority = schema::kDefaultPriority;
  int64_t accepted_ms = 0, deadline_ms = 0;  // Unix ms; deadline 0: none
  MonoTime accepted;
  // Never changed once admitted; shared with the store thread, which writes
  // it. files cleared: the files are among `inputs`.
  std::shared_ptr<const schema::JobSpec> spec;
  std::vector<JobInput> inputs;
  uint64_t input_bytes = 0;
  // What it holds of the broker while it is active, which the queue's byte
  // bounds count: its inputs, and its spec's texts (sources, headers,
  // options: up to megabytes each, held in memory until it ends).
  uint64_t held_bytes = 0;
  // Buffers in registered regions (broker/regions.h): it names some, and
  // some of those it writes (out, inout).
  bool regions = false, region_writes = false;

  schema::JobState state = schema::JobState::kQueued;
  bool durable = false;   // its row has committed
  bool loading = false;   // its inputs are being read for a dispatch
  uint32_t attempts = 0;  // dispatches so far
  // Dispatches the store has counted (committed). A job is dispatched again
  // only once the store counts every earlier dispatch but the last, so that
  // count + epoch after a restart is above every attempt number sent.
  uint32_t attempts_stored = 0;
  bool suspect = false;   // was in flight on a worker that was lost
  std::string worker;     // routing id while dispatched
  uint32_t attempt_no = 0;  // the dispatch's number on the wire (PROTOCOL.md)
  MonoTime dispatched;
  double charged_us = 0;  // the GPU time its dispatch charged its tenant (Scheduler)
  MonoTime last_matched;  // the last time a connected worker matched its placement

  // Compiles, by architecture: one module per source of the job (null while
  // it compiles), complete when none is null (Compiled). `compiling` holds
  // the architectures with a compile outstanding.
  std::map<std::string, std::vector<compile::EntryPtr>> modules;
  std::set<std::string> compiling;
  std::map<std::string, Status> compile_failed;
  uint64_t compile_us = 0;
  bool cache_hit = true;

  // Requests answered once the job's row has committed: submits that named
  // its key meanwhile, and cancels (which wait for the row they end).
  std::vector<RequestContext> also_accepted, pending_cancels;
  // Cancels answered once its result has committed.
  std::vector<RequestContext> cancel_replies;

  bool ended() const { return schema::IsTerminal(state); }
  bool Compiled(const std::string& arch) const {
    auto it = modules.find(arch);
    if (it == modules.end()) return false;
    for (const compile::EntryPtr& e : it->second) {
      if (!e) return false;
    }
    return true;
  }
};

class JobTable {
 public:
  struct Bounds {
    uint64_t jobs = 100000;
    uint64_t jobs_per_tenant = 20000;
    uint64_t bytes = 8ull << 30;
  };
  explicit JobTable(Bounds bounds) : bounds_(bounds) {}

  // kQueueFull, naming the bound, when admitting a job of `tenant` with
  // `bytes` of inputs would pass one: the table's, or the tenant's own
  // (`max_queued` in place of jobs_per_tenant when set, `max_queued_bytes`);
  // `retry_after_ms` gets a hint.
  Status CanAdmit(const std::string& tenant, uint64_t bytes, uint64_t* retry_after_ms,
                  uint64_t max_queued = 0, uint64_t max_queued_bytes = 0) const;
  // Takes the job (counted against the bounds until it ends).
  Job& Add(std::unique_ptr<Job> job);
  Job* Find(uint64_t id);
  // The active or ending job of `tenant` with idempotency key `key`.
  Job* FindByKey(const std::string& tenant, const std::string& key);

  // Queued for dispatch (scheduler order).
  void Queue(Job& job);
  // Queued again after an attempt was lost: the attempt did not start it
  // for good, so its deadline holds again (Expired() let it go while the
  // job was away on a worker).
  void Requeue(Job& job);
  // Out of the dispatch order (dispatched, canceled, expired, failed).
  void Unqueue(Job& job);
  Scheduler& scheduler() { return scheduler_; }

  // Records its terminal state; it stops counting against the bounds.
  void End(Job& job, schema::JobState state);
  // Drops the job (its result has committed, or its row never did).
  void Remove(uint64_t id);

  // Queued jobs whose deadline is at or before `now_ms`.
  std::vector<uint64_t> Expired(int64_t now_ms);
  // Entries of the deadline heap: at most about twice the jobs with a
  // deadline that have not ended (an ended job's entry is dropped when the
  // heap is rebuilt, not left until its deadline, up to 366 days on).
  size_t deadlines_held() const { return deadlines_.size(); }

  size_t size() const { return jobs_.size(); }
  uint64_t active() const { return active_; }
  uint64_t active_bytes() const { return active_bytes_; }
  uint64_t active_of(const std::string& tenant) const;
  template <typename F>
  void ForEach(F&& f) {
    for (auto& [id, job] : jobs_) f(*job);
  }

 private:
  void Release(Job& job);
  // Rebuilds the deadline heap from the jobs not ended once it holds more
  // than twice as many entries as they have.
  void CompactDeadlines();

  Bounds bounds_;
  std::unordered_map<uint64_t, std::unique_ptr<Job>> jobs_;
  std::map<std::pair<std::string, std::string>, uint64_t> keys_;
  Scheduler scheduler_;
  uint64_t active_ = 0, active_bytes_ = 0;
  std::map<std::string, uint64_t> active_by_tenant_;
  std::map<std::string, uint64_t> active_bytes_by_tenant_;
  using Deadline = std::pair<int64_t, uint64_t>;
  std::priority_queue<Deadline, std::vector<Deadline>, std::greater<>> deadlines_;
  uint64_t with_deadline_ = 0;  // jobs not ended that have a deadline
};

}  // namespace gpuq::broker
