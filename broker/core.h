// The broker's core: the state of one broker lifetime and the operations on
// a job's way through it, shared by the request handlers (handlers/), the
// worker protocol (worker_protocol.cc) and the loop (broker.cc).
//
// A job's way: a handler admits it (JobTable, counted against the bounds)
// and hands its row to the store thread; once the row has committed the
// client hears `accepted` and the job is queued; it is compiled for the
// architectures of the workers that could take it, dispatched to a worker
// with a free slot (its inputs read by the store thread first when they are
// not in memory), and ended by the worker's result, a failure, a cancel or
// its deadline. An ended job's result goes to the store thread; once it has
// committed the result is pushed to the connection that submitted the job
// (if that connection is still there) and the job leaves the table.
//
// Everything here runs on the broker loop thread, except what says
// otherwise. Nothing here blocks on the disk, a lock held by another thread
// for long, or a transfer.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>
#include <zmq.hpp>

#include "broker/broker.h"
#include "broker/compile/compile_service.h"
#include "broker/connections.h"
#include "broker/job_table.h"
#include "broker/tenants.h"
#include "broker/metrics.h"
#include "broker/regions.h"
#include "broker/sessions.h"
#include "broker/request_context.h"
#include "broker/store_thread.h"
#include "broker/worker_registry.h"
#include "schema/messages.h"
#include "util/clock.h"
#include "util/mutex.h"

namespace gpuq::broker {

using Frames = std::vector<zmq::message_t>;

// Why the loop asked the store thread to read (ReadOp::purpose).
enum ReadPurpose : int { kReadStatus = 1, kReadResult, kReadCancel, kReadDispatch, kReadUsage };

struct CompileDone {
  Digest key{};
  std::string arch;
  StatusOr<compile::EntryPtr> result = Status(Code::kInternal, "not run");
  compile::CompileInfo info;
};

class BrokerCore {
 public:
  BrokerCore(const BrokerOptions& options, const Clock* clock, zmq::socket_t& clients,
             zmq::socket_t& workers, std::unique_ptr<StoreThread> store,
             std::unique_ptr<compile::CompileService> compiler, uint64_t next_id,
             uint64_t epoch, std::function<void()> wake, TenantPolicies tenants);
  // A dispatched job leaves its GPU: its tenant's running count, and its
  // GPU time. An ended job's tenant is charged the time it held the GPU; a
  // requeued one's (its worker was lost: the time is not the job's doing,
  // and can be long) keeps the estimate its dispatch charged. Not
  // `stopped`: it still counts among its tenant's jobs on GPUs (an abandoned
  // attempt its worker still runs; the worker registry stops it later).
  void LeftGpu(Job& job, bool ended, bool stopped = true);
  // Applies new tenant policies (a reload of the tenants file).
  void SetTenantPolicies(TenantPolicies policies);
  // Stops the compile service and the store thread first: their last
  // callbacks land in this object.
  ~BrokerCore();

  const BrokerOptions& options() const { return opt_; }
  const Clock& clock() const { return *clock_; }
  ClientConnections& connections() { return connections_; }
  JobTable& jobs() { return jobs_; }
  TenantLimits& tenants() { return tenants_; }
  WorkerRegistry& workers() { return workers_; }
  compile::CompileService& compiler() { return *compiler_; }
  RegionTable& regions() { return regions_; }
  RegionServer& region_server() { return region_server_; }
  SessionServer& sessions() { return sessions_; }
  // Wakes the loop (from any thread).
  void Wake() { wake_(); }
  StatsSnapshot& counters() { return counters_; }
  const std::string& local_dir() const { return local_dir_; }
  // Clients on the ipc endpoint share this host (PROTOCOL.md, "Local buffers").
  bool LocalClients() const { return local_clients_; }

  // ---- replies to clients
  // Sends now, if the request's connection is still there and takes it:
  // whether it went.
  // `counted`: its header frame counts against the connection's queued
  // replies (ClientConnections::QueuedFrames), as payload frames always do.
  bool Reply(const RequestContext& ctx, schema::ClientReply reply, Frames payload = {},
             bool counted = false);
  void ReplyError(const RequestContext& ctx, const Status& s, uint64_t retry_after_ms = 0,
                  uint64_t id = 0);
  // The same, saying whether it went (see Reply).
  bool SendError(const RequestContext& ctx, const Status& s, uint64_t retry_after_ms = 0,
                 uint64_t id = 0);
  // The same, counted as Reply's `counted` says.
  bool SendCountedError(const RequestContext& ctx, const Status& s);
  // Bytes a connection may still be sent before what it has not read passes
  // its bound (BrokerOptions::max_unread_bytes).
  uint64_t ReplyBudget(const ConnectionRef& c) const;

  // ---- the store
  // The batch the loop is gathering; handed to the store thread by Flush().
  Batch& batch() { return *batch_; }
  // Hands a read of job `id` for this request to the store's next batch;
  // OnRead answers it after the batches before it. The caller may set the
  // read's bounds on the returned op before the batch is handed over.
  ReadOp& ReadFor(const RequestContext& ctx, ReadOp::Kind kind, uint64_t id, ReadPurpose purpose);
  // Reads job `id`'s result, outputs included, for this request: one read
  // at a time per connection, each bounded by what the connection may still
  // leave unread once the reply before it is queued (the store would
  // otherwise read every fetch of a burst against the same free budget).
  // Up to kMaxWaitingFetches wait; past that, resource_exhausted.
  void FetchResult(const RequestContext& ctx, uint64_t id);
  static constexpr size_t kMaxWaitingFetches = 1024;
  // When the store cannot write (a failed commit): submits are refused until
  // a commit succeeds again. Ok otherwise.
  const Status& store_failure() const { return store_failure_; }
  // Hands the gathered batch to the store thread when it is idle.
  void Flush();
  // Takes the batches the store thread has done and acts on them.
  void OnBatchesDone();
  // Removes the files a client or worker named (after the current batch).
  void DropPeerFiles(const std::vector<schema::LocalFile>& files, std::string_view prefix);

  // ---- jobs
  uint64_t NextId() { return next_id_++; }
  // Where input `idx` of job `id` lives once the store has taken it as a file.
  std::string InputPath(uint64_t id, size_t idx) const { return store_->store().InputPath(id, idx); }
  // Takes a new job whose row is `insert` (not yet durable) and queues it:
  // it may run while the row commits; it is answered `accepted` once the row
  // has committed.
  void Admit(std::unique_ptr<Job> job, InsertOp insert);
  // Drops a job whose row did not commit, and every write gathered for it.
  void Forget(Job& job);
  // Ends a job: its result goes to the store, and to its client once
  // committed. `outputs`/`frames`/`files` as in a worker's result.
  void Finish(Job& job, schema::JobState state, Code code, std::string error,
              const schema::Timing& timing = {}, std::vector<uint32_t> outputs = {},
              Frames frames = {}, const std::string& device = "",
              std::vector<schema::LocalFile> files = {});
  // Region `region`, which job `id` names, has ended (`why`): the job fails
  // unless it is already running.
  void RegionEnded(uint64_t id, uint64_t region, const std::string& why);
  // Job `id` no longer touches its regions (it ended, or its worker answered
  // an abandoned attempt): regions waiting only for it are dropped.
  void ReleaseRegions(uint64_t id);
  // A job that ended while its attempt may still run on worker `worker`
  // (canceled, forgotten, or failed because the broker lost touch with it)
  // keeps its regions' ranges until that worker answers for it or is gone:
  // no other job may write them meanwhile.
  void HoldRegions(uint64_t id, const std::string& worker) { region_holds_[id] = worker; }
  // Worker `worker` answered for job `id`: a hold of its ranges ends.
  void Answered(uint64_t id, const std::string& worker);
  // Worker `worker` is gone (its process with it): every hold of its ends.
  void ReleaseHolds(const std::string& worker);
  // The region channel of the worker of `token` has closed: a worker lost
  // while its process may have lived on (silent, unreachable, past a time
  // limit) held its ranges until now, since the kernel closes the channel
  // only when that process, which maps the regions, is gone.
  void WorkerChannelClosed(const std::string& token);
  // Ends a job at a client's request; the reply comes after the commit.
  void Cancel(Job& job, const RequestContext& ctx);
  // Compiles `job` for `arch` unless it has been, or is being.
  void RequestCompile(Job& job, const std::string& arch);
  // Takes the compiles the compile service has finished.
  void OnCompilesDone();
  // Sends queued jobs to workers with free slots.
  void Dispatch();

  // ---- workers (worker_protocol.cc)
  // A message from the worker socket: one message, or a batch of them.
  void OnWorkerFrames(Frames& frames);
  // Sends the jobs queued for each worker by this iteration: one message,
  // or a batch of several.
  void FlushWorkers();
  // `lives`: the worker's process is known to live on (it registered again
  // on the same connection), so no job it held is to blame.
  void WorkerLost(const std::string& id, const std::string& why, bool lives = false);
  // Requeues the jobs `w` held (`inflight`), or fails those it must: a
  // suspect alone on a worker that died is the culprit; past the attempt
  // limit a job fails. `lives`: as WorkerLost's.
  void Requeue(const Worker& w, const std::map<uint64_t, Worker::Held>& inflight,
               const std::string& why, bool lives);
  // A worker's health from its ready or heartbeat: drains its GPU when the
  // health says so (PROTOCOL.md, "GPU health").
  void OnHealth(Worker& w, const schema::GpuHealth& h);
  // A heartbeat's free memory, health and running jobs.
  void OnHeartbeat(Worker& w, const schema::WorkerMessage& m, MonoTime now);
  bool SendWorker(const std::string& id, const schema::BrokerMessage& m, Frames* payload = nullptr);

  // ---- timers
  // Every worker message sent before `t` has been taken: a worker's silence
  // is judged up to then, not up to the end of a long loop iteration.
  void WorkersDrained(MonoTime t) { workers_drained_ = t; }
  void Heartbeats();
  void EnforceLimits();
  void ExpireDeadlines();
  void FailUnmatched();
  void Purge();

  // ---- stats
  // What `ctx` may see: an operator, or anyone off CURVE, sees everything;
  // a tenant its own jobs.
  StatsSnapshot Snapshot(const RequestContext* ctx);
  std::vector<schema::WorkerView> WorkerViews() const;
  // With a spin: the store thread stays awake while `busy`.
  void SetStoreBusy(bool busy) { store_->SetBusy(busy); }
  // Whether any worker holds a job.
  bool AnyRunning() const {
    for (const auto& [id, w] : workers_.all()) {
      if (!w.inflight.empty()) return true;
    }
    return false;
  }
  // The kernel cache file's size, refreshed off the loop; `cache_changed`
  // asks for a refresh (a compile stored an entry).
  std::atomic<uint64_t> cache_entries{0}, cache_bytes{0};
  std::function<void()> cache_changed;
  uint64_t quarantined = 0;

 private:
  // Builds the reply or push of a result whose outputs are `stored` (one
  // per output, in stored order) for a job with `local_out`.
  void SendResult(const ConnectionRef& conn, uint64_t rid, schema::ClientReply header,
                  std::vector<std::pair<uint32_t, JobInput>> outputs, bool local_out);
  void OnInserted(InsertOp& op);
  void OnFinished(FinishOp& op, const Status& commit);
  void OnRead(ReadOp& r);
  // Asks the store for job `id`'s result, read against what the
  // connection may still be sent (ReplyBudget).
  void ReadResult(const RequestContext& ctx, uint64_t id);
  // The connection's result read has been answered: its next one goes.
  void NextFetch(const ConnectionRef& conn);
  void OnDispatchInputs(ReadOp& r);
  bool Eligible(Job& job, const Worker& w);
  bool Matches(const Job& job, const Worker& w) const;
  void SendJob(Worker& w, Job& job);
  void SendLoaded(Worker& w, Job& job);
  void OnWorkerMessage(Frames& frames);
  void OnWorkerResult(Worker& w, schema::WorkerMessage& m, Frames& frames);
  void QueueToWorker(const std::string& id, const schema::BrokerMessage& m, Frames payload);
  // Fails `job` for compile reasons if no architecture it could run on is
  // left (every matching worker's architecture failed to compile it).
  void CheckCompileViable(Job& job);
  // The compile of the job's source `source` for `arch`: with the name
  // expressions of every launch that uses it.
  static compile::CompileRequest CompileRequestOf(const Job& job, uint32_t source,
                                                  const std::string& arch);
  // The first kernel that the job's launches from `source` name and
  // `module` lacks; empty when it has them all.
  static std::string MissingKernel(const Job& job, uint32_t source,
                                   const compile::CacheEntry& module);

  const BrokerOptions& opt_;
  const Clock* clock_;
  zmq::socket_t& client_sock_;
  zmq::socket_t& worker_sock_;
  std::unique_ptr<StoreThread> store_;
  std::unique_ptr<compile::CompileService> compiler_;
  std::function<void()> wake_;
  std::string local_dir_;
  bool local_clients_ = false;
  uint64_t next_id_;
  uint64_t epoch_;

  ClientConnections connections_;
  JobTable jobs_;
  TenantLimits tenants_;
  WorkerRegistry workers_;
  RegionTable regions_;
  RegionServer region_server_{*this};
  SessionServer sessions_{*this};
  // Result fetches by connection serial (FetchResult): the one the store
  // reads, and those that wait for it.
  struct Fetches {
    std::deque<std::pair<RequestContext, uint64_t>> waiting;
  };
  std::unordered_map<uint64_t, Fetches> fetches_;
  std::map<uint64_t, std::string> region_holds_;  // job -> the worker that may still run it
  // Lost workers whose holds wait for their region channel to close: token
  // -> the ids they were known by.
  std::map<std::string, std::set<std::string>> holds_until_closed_;
  std::unique_ptr<Batch> batch_ = std::make_unique<Batch>();
  // Jobs to send to each worker at the end of this iteration, in order.
  struct Outbox {
    std::vector<std::string> headers;
    std::vector<Frames> payloads;
  };
  std::map<std::string, Outbox> outboxes_;
  Status store_failure_;
  MonoTime retry_writes_at_{};  // after a failed commit: when to try again
  std::vector<FinishOp> unwritten_;  // results whose commit failed, to retry
  std::vector<AttemptsOp> uncounted_;  // attempt counts whose commit failed, to retry

  // Compiles finishing on the compile service's threads.
  Mutex compile_mu_;
  std::vector<CompileDone> compiled_ GUARDED_BY(compile_mu_);
  // Jobs (id, source index) waiting for a compile, by key and architecture.
  std::map<std::pair<Digest, std::string>, std::vector<std::pair<uint64_t, uint32_t>>>
      waiting_compile_;
  struct KernelMemo {
    schema::KernelSpec kernel;
    Digest key{};
    bool valid = false;
  };
  std::map<std::string, KernelMemo> last_kernel_;  // by architecture

  StatsSnapshot counters_;
  Histogram* compile_latency_ = nullptr;
  // A done job's counter and phase histograms in counters_, found at the
  // first (map nodes stay put): a job's end looks nothing up by name.
  uint64_t* done_count_ = nullptr;
  struct {
    Histogram *queue = nullptr, *load = nullptr, *h2d = nullptr, *kernel = nullptr,
              *d2h = nullptr, *total = nullptr;
  } done_latency_;
  MonoTime workers_drained_;
  MonoTime started_;
};

}  // namespace gpuq::broker
