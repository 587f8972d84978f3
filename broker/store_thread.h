// The job store on a thread of its own: the broker loop hands it batches of
// writes (one transaction each: group commit) and reads, and learns when
// each batch is durable; the loop itself never waits on the disk.
//
// A batch runs in order: its writes in one transaction (inserts, results,
// attempt counts, a purge), the commit, then its reads, which therefore see
// every write of this batch and of the batches before it. One batch is in
// the thread at a time; the loop gathers the next meanwhile.
//
// Threads: Submit, TakeDone and Idle are called by the loop thread; the
// store is touched only by the store thread. `wake` is called on the store
// thread after a batch is done (it writes the loop's eventfd).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>
#include <zmq.hpp>

#include "broker/connections.h"
#include "broker/job_store.h"
#include "util/clock.h"
#include "util/mutex.h"

namespace gpuq::broker {

struct InsertOp {
  StoredJob row;                         // row.id assigned by the loop; row.spec unused
  std::shared_ptr<const schema::JobSpec> spec;  // the job's, shared with it
  std::vector<zmq::message_t> frames;    // the inputs sent as frames (shared with the job)
  std::vector<schema::LocalFile> files;  // then the client's local files (plain names)
  // Store thread: the outcome. `existing`: the key named an earlier job of
  // the tenant; nothing was inserted.
  Status status;
  std::optional<uint64_t> existing;
  // Loop: who to answer.
  ConnectionRef conn;
  uint64_t rid = 0;
};

struct FinishOp {
  StoredResult result;
  std::vector<zmq::message_t> frames;    // output frames (result.outputs first)
  std::vector<schema::LocalFile> files;  // then a local worker's files (plain names)
  size_t inputs = SIZE_MAX;              // how many inputs the job had
  int64_t finished_ms = 0;
};

struct AttemptsOp {
  uint64_t id = 0;
  uint32_t attempts = 0;
  bool suspect = false;
};

struct ReadOp {
  enum class Kind {
    kStatus,  // the job's row and its result without outputs
    kResult,  // the job's row and its result with outputs
    kInputs,  // the job's inputs
    kUsage,   // usage by tenant (usage_tenant, since_ms, until_ms)
  };
  Kind kind = Kind::kStatus;
  uint64_t id = 0;
  // kResult: output files are read into their bytes unless the client
  // shares this host (`client_local`) and the job asked for local outputs;
  // kInputs: input files are read when `read_files` (for a worker that
  // cannot reach the local directory). At most `max_bytes` in all are read:
  // over it, kResourceExhausted.
  bool client_local = false;
  bool read_files = false;
  uint64_t max_bytes = UINT64_MAX;
  // Store thread: the outcome.
  Status status;
  std::optional<StoredJob> job;        // kStatus, kResult (without inputs)
  std::optional<StoredResult> result;  // kStatus (no data), kResult
  std::vector<StoredBuffer> inputs;    // kInputs
  std::vector<schema::TenantUsage> usage;  // kUsage
  std::string usage_tenant;            // kUsage: "" every tenant
  int64_t since_ms = 0, until_ms = 0;  // kUsage: the window (until 0: open)
  // Loop: who asked, and why.
  ConnectionRef conn;
  uint64_t rid = 0;
  std::string tenant;  // the asker's bound tenant ("" off CURVE)
  bool operator_ = false;
  int purpose = 0;  // the loop's own tag (which request this answers)
  // kInputs: the dispatch they are for.
  std::string worker;
  uint32_t attempt = 0;
};

struct Batch {
  std::vector<InsertOp> inserts;
  std::vector<FinishOp> finishes;
  std::vector<AttemptsOp> attempts;
  int64_t purge_before_ms = 0;  // 0: no purge
  std::vector<ReadOp> reads;
  // Files of the local directory to remove after the commit (what refused
  // submits and stale results named).
  std::vector<std::string> unlink;
  // Loop: what to do once the batch is done (on the loop thread), such as
  // answering a refused submit after its files are gone.
  std::vector<std::function<void()>> on_done;
  // Store thread: the commit's outcome, and what the purge removed.
  Status status;
  uint64_t purged = 0;
  // Loop: when it was handed to the store thread.
  MonoTime submitted{};
  bool empty() const {
    return inserts.empty() && finishes.empty() && attempts.empty() && purge_before_ms == 0 &&
           reads.empty() && unlink.empty() && on_done.empty();
  }
  bool has_writes() const {
    return !inserts.empty() || !finishes.empty() || !attempts.empty() || purge_before_ms != 0;
  }
};

class StoreThread {
 public:
  // `spin`: after a batch, the thread polls for the next one without
  // sleeping for this long (a batch that comes within it costs no wake-up).
  StoreThread(std::unique_ptr<JobStore> store, std::function<void()> wake,
              std::chrono::microseconds spin = {});
  // Runs what was submitted, then stops.
  ~StoreThread();
  StoreThread(const StoreThread&) = delete;
  StoreThread& operator=(const StoreThread&) = delete;

  // The blob directory (immutable, any thread).
  const JobStore& store() const { return *store_; }

  // Hands a batch to the thread. Only when Idle().
  void Submit(std::unique_ptr<Batch> batch) LOCKS_EXCLUDED(mu_);
  // Whether no batch is in the thread (submitted and not yet taken back).
  bool Idle() const { return in_flight_ == 0; }
  // The batches done since the last call, in order.
  std::vector<std::unique_ptr<Batch>> TakeDone() LOCKS_EXCLUDED(mu_);
  // With a spin: while `busy` (jobs run on workers), the thread polls for
  // the next batch without sleeping however long it waits, so that a
  // result's commit starts the moment it is handed over.
  void SetBusy(bool busy) { busy_.store(busy, std::memory_order_relaxed); }

 private:
  void Loop();
  void Run(Batch& b);
  void RunRead(ReadOp& r);

  std::unique_ptr<JobStore> store_;
  const std::function<void()> wake_;
  const std::chrono::microseconds spin_;
  std::atomic<bool> has_work_{false};
  std::atomic<bool> busy_{false};
  size_t in_flight_ = 0;  // loop thread only
  Mutex mu_;
  CondVar cv_{&mu_};
  std::vector<std::unique_ptr<Batch>> todo_ GUARDED_BY(mu_);
  std::vector<std::unique_ptr<Batch>> done_ GUARDED_BY(mu_);
  bool stop_ GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace gpuq::broker
