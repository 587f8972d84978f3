// The broker's durable job store (schema/job_store.sql is its format). Owned
// by one thread at a time (the broker loop, or the store thread it hands
// batches to): not thread-safe.
//
// Writes are grouped: the owner calls Begin() before the first write of a
// batch and Commit() after the last, so that one fsync covers every submit
// and result of the batch. A job is acknowledged, and a result pushed, only
// after Commit() has returned Ok.
//
// Reads (Get, GetResult, GetResultMeta, LoadInputs) may be made inside a
// transaction or outside one; inside, they see the transaction's own writes,
// buffers not yet written to their log included.
//
// Failures. Every Status is one of: kIoError (a read or write of the store's
// files failed), kResourceExhausted (a write found no space: ENOSPC, EDQUOT,
// EFBIG or SQLITE_FULL; the message says "no space"), kUnavailable (another
// process holds the SQLite file), kInvalid (a caller's local file failed its
// checks; a store of an unknown format) or kInternal (a caller broke a
// contract stated here).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "broker/blob_dir.h"
#include "schema/messages.h"
#include "util/sqlite.h"

namespace gpuq::broker {

enum class Durability {
  kProcessCrash,  // survives a crash of the broker (SQLite WAL, synchronous=NORMAL)
  kPowerLoss,     // survives power loss too (synchronous=FULL: fsync per commit)
};

// Buffers of this size or more are files of the blob directory, not blobs;
// from kBlobLogMinBytes up they are appended to its log (schema/job_store.sql).
inline constexpr size_t kBlobFileMinBytes = 64 * 1024;
inline constexpr size_t kBlobLogMinBytes = 1024;

// Where one stored buffer's bytes are. Invariant: with a `path`, `bytes` is
// empty; with bytes, bytes.size() == size.
struct StoredBuffer {
  uint64_t size = 0;
  std::string path;   // non-empty: a file of the blob directory (full path) holds the bytes
  std::string bytes;  // otherwise the bytes, when the call says it reads them
};

struct StoredJob {
  uint64_t id = 0;  // assigned by the caller of Insert (see next_id())
  std::string tenant, key;
  uint32_t priority = schema::kDefaultPriority;
  schema::JobState state = schema::JobState::kQueued;
  uint32_t attempts = 0;
  bool suspect = false;
  int64_t accepted_ms = 0, deadline_ms = 0, finished_ms = 0;
  schema::JobSpec spec;
  // One per input, in payload index order. Filled by LoadUnfinished only:
  // size and (for files) path, never the bytes (LoadInputs reads those).
  std::vector<StoredBuffer> inputs;
};

struct StoredResult {
  uint64_t id = 0;
  schema::JobState state = schema::JobState::kDone;
  Code code = Code::kOk;
  std::string error, device;
  uint32_t attempts = 0;
  schema::Timing timing;
  // The argument index of each output, in stored order: output i is
  // argument outputs[i]. For Finish: the frames' outputs, then the files'.
  std::vector<uint32_t> outputs;
  // Filled by GetResult only: data[i] is output i (argument outputs[i]):
  // files by path and size (not read), the others with their bytes.
  std::vector<StoredBuffer> data;
  // For Finish: the job's tenant and input bytes, for its tenant's usage.
  std::string tenant;
  uint64_t input_bytes = 0;
};

// A tenant's usage over a time window (the usage table's rows summed).
using TenantUsage = schema::TenantUsage;

// What a restart resumes (LoadUnfinished).
struct ResumeSet {
  // Every job not yet ended, oldest first; each input checked (see
  // LoadUnfinished), its bytes not read.
  std::vector<StoredJob> jobs;
  // Jobs found damaged, now ended as failed (io_error) with `reason` in
  // their result's error text.
  struct Quarantined {
    uint64_t id = 0;
    std::string tenant;
    std::string reason;  // e.g. "input 1 (j7.i1): No such file or directory"
  };
  std::vector<Quarantined> quarantined;
};

class JobStore {
 public:
  // Opens or creates the store at `path` and its blob directory
  // `path`.blobs; migrates a store of format 1 or 2 to format 3; counts the
  // open in epoch() (committed before this returns); removes blob files and
  // log segments no row names (written by a transaction that never
  // committed). kInvalid for a store of an unknown format.
  static StatusOr<std::unique_ptr<JobStore>> Open(const std::string& path,
                                                 Durability durability,
                                                 uint64_t log_segment_bytes = 64u << 20);

  // How many times this store has been opened, this open included (1 for a
  // new store): strictly increasing across restarts.
  uint64_t epoch() const { return epoch_; }
  // The smallest job id that no job of this store has had: at Open,
  // max(meta 'next_id', largest id + 1, 1); then past every id inserted by a
  // committed transaction or by the open one. An Insert that fails takes no
  // id, and a transaction that fails gives back the ids it took (next_id()
  // returns to its value at Begin()): no commit kept them, so none was
  // acknowledged.
  uint64_t next_id() const { return next_id_; }

  // Starts a transaction. The caller must not be in one.
  Status Begin();
  // Commits the transaction: its rows and the buffers it wrote; when it
  // purged jobs, next_id() too (meta 'next_id': once, here, and only then,
  // as only a purge can take the largest issued id out of the table). Then
  // unlinks the blob files of rows it deleted.
  //
  // On failure (or when a write inside the transaction failed, whatever it
  // returned then) nothing of the transaction is kept: the SQLite
  // transaction is rolled back, files it wrote are removed, log bytes it
  // appended are cut off (never named or read later), next_id() is what it
  // was at Begin(), and in_transaction() is false. The Status has the first
  // failure's code: kResourceExhausted when space ran out (retry once there
  // is room), else kIoError (or kUnavailable: another process holds the
  // SQLite file). The store stays usable: a later Begin() may succeed, and
  // the same jobs may be inserted again under the same ids (from their
  // frames: local files the transaction adopted are gone with it).
  Status Commit();
  bool in_transaction() const { return in_tx_; }

  // Inside a transaction. Adds job `job.id` with its inputs: `inputs` (index
  // 0 up), then `files`, files of the blob directory (named by a local
  // client), which become the job's own (renamed) and are synced with power
  // durability. The caller assigns ids increasing from next_id(): an id
  // below next_id() is kInternal (and writes nothing).
  //
  // A failure of a file in `files` (kInvalid: the client's doing) leaves
  // nothing of this job and the transaction intact; any other failure makes
  // the whole transaction fail at Commit().
  Status Insert(const StoredJob& job, const std::vector<std::string_view>& inputs,
                const std::vector<schema::LocalFile>& files = {});
  // The same, with the job's spec apart from `job` (whose own is not read).
  Status InsertWithSpec(const StoredJob& job, const schema::JobSpec& spec,
                const std::vector<std::string_view>& inputs,
                const std::vector<schema::LocalFile>& files = {});
  StatusOr<std::optional<uint64_t>> FindByKey(const std::string& tenant, const std::string& key);
  Status SetAttempts(uint64_t id, uint32_t attempts, bool suspect);
  // Records a terminal state and its result, and drops the job's inputs
  // (`inputs`: how many it had, 0 saves looking). Output i of `outputs`, then
  // of `files`, is argument result.outputs[i] (result.data is not read).
  // `files`: files of the blob directory (written by a local worker) that
  // become the result's own.
  Status Finish(const StoredResult& result, const std::vector<std::string_view>& outputs,
                int64_t finished_ms, size_t inputs = SIZE_MAX,
                const std::vector<schema::LocalFile>& files = {});

  // The blob directory (absolute): the local directory of PROTOCOL.md's
  // "Local buffers". Where input `idx` of job `id` and output `idx` of its
  // result live when they are files.
  const std::string& blob_dir() const { return blobs_.path(); }
  // How many commits made the blob directory durable (--durability power).
  uint64_t dir_syncs() const { return blobs_.dir_syncs(); }
  std::string InputPath(uint64_t id, size_t idx) const;
  std::string OutputPath(uint64_t id, size_t idx) const;

  // Outside a transaction. Every job not yet ended, oldest first: after a
  // restart each is queued again (a job dispatched when the broker stopped
  // is lost with its worker connection). Each input is checked without
  // reading its bytes: a file exists, is a regular file and has its
  // recorded size; a log segment holds the input's range; an inline row
  // holds its recorded length. The spec is decoded against the inputs'
  // sizes. A job that fails a check is quarantined: ended (committed here)
  // as failed with io_error, its error naming what is damaged, finished at
  // `now_ms`, and listed in ResumeSet::quarantined. Fails only when the
  // store itself cannot be read or written.
  StatusOr<ResumeSet> LoadUnfinished(const schema::Limits& limits, int64_t now_ms);
  // The inputs of job `id`, in index order (none for an unknown or ended
  // job): files by path and size (checked, not read), the others with their
  // bytes. kIoError naming the input when one is damaged.
  StatusOr<std::vector<StoredBuffer>> LoadInputs(uint64_t id);
  // A job's row (without inputs, and of its spec only `local_out`), or
  // nullopt.
  StatusOr<std::optional<StoredJob>> Get(uint64_t id);
  // A job's result with its outputs (see StoredResult::data), or nullopt.
  // kIoError naming the output when one is damaged.
  StatusOr<std::optional<StoredResult>> GetResult(uint64_t id);
  // A job's result without its outputs (`data` empty; `outputs` filled), or
  // nullopt: one row read, no buffer looked at.
  StatusOr<std::optional<StoredResult>> GetResultMeta(uint64_t id);
  // Usage by tenant (`tenant` alone, or every tenant when empty) of the jobs
  // that ended in [since_ms, until_ms), to the hour: the hours that overlap
  // the window count whole. Sorted by tenant.
  StatusOr<std::vector<TenantUsage>> GetUsage(const std::string& tenant, int64_t since_ms,
                                              int64_t until_ms);
  // Inside a transaction. Removes jobs that ended before `before_ms`, with
  // their results. Their ids stay issued.
  StatusOr<uint64_t> PurgeFinished(int64_t before_ms);
  StatusOr<uint64_t> CountJobs();

 private:
  JobStore(sql::Db db, BlobDir blobs, Durability durability)
      : db_(std::move(db)), blobs_(std::move(blobs)), durability_(durability) {}
  StatusOr<sql::Stmt*> Cached(const char* sql);
  Status RemoveOrphans();
  // Records the first failed write of the transaction (Commit() then fails
  // with it) and returns `s`.
  Status Failed(Status s);
  // Undoes the open transaction (see Commit()).
  void Abort();
  Status InsertRows(const StoredJob& job, const schema::JobSpec& spec,
                    const std::vector<std::string_view>& inputs,
                    const std::vector<schema::LocalFile>& files);
  Status FinishRows(const StoredResult& result, const std::vector<std::string_view>& outputs,
                    int64_t finished_ms, size_t inputs,
                    const std::vector<schema::LocalFile>& files);
  // Writes one buffer's row into `table`, or its file and a row naming it.
  Status PutBuffer(const char* insert_sql, uint64_t id, size_t idx, char kind,
                   std::string_view data);
  // Makes the file `name` of the blob directory buffer `idx` of job `id`;
  // kInvalid (and the file removed) unless it is a plain file of that size.
  Status AdoptBuffer(const char* insert_sql, uint64_t id, size_t idx, char kind,
                     const std::string& name, uint64_t expected_size);
  // The buffers of a query's rows (job_id, idx, in_file, seg), about to be
  // deleted: their files to unlink after the commit, their log bytes released.
  Status ForgetBuffers(const char* select_sql, int64_t arg, char kind);
  // Appends to `out` the buffers of job `id` of kind 'i' (inputs) or 'o'
  // (outputs), from a query of their rows (kInputRows and the like in
  // job_store.cc), in index order; each checked (see LoadUnfinished), and
  // with `read` the bytes of those not in files read. A damaged buffer
  // stops the list and sets `damage` to a sentence naming it ("input 1
  // (j7.i1): No such file or directory"); an error only when the rows
  // cannot be read.
  Status Buffers(const char* select_sql, uint64_t id, char kind, bool read,
                 std::vector<StoredBuffer>* out, std::string* damage);

  sql::Db db_;
  BlobDir blobs_;
  std::unique_ptr<BlobLog> in_log_, out_log_;
  BlobLog& Log(char kind) { return kind == 'i' ? *in_log_ : *out_log_; }
  Durability durability_;
  sql::StatementCache statements_;
  uint64_t epoch_ = 0;
  uint64_t next_id_ = 1;
  uint64_t committed_next_id_ = 1;  // next_id_ as of the last commit
  // Invariant: every id a committed transaction inserted is below
  // max(recorded_next_id_ (meta 'next_id'), MAX(jobs.id) + 1), both as
  // committed.
  uint64_t recorded_next_id_ = 1;
  Status WriteUsage();
  bool purged_ = false;  // the open transaction deleted jobs rows
  // The open transaction's usage (Finish), by tenant and hour: one upsert
  // each at Commit, not one per result.
  std::map<std::pair<std::string, int64_t>, schema::TenantUsage> usage_;
  bool in_tx_ = false;
  Status failure_;  // the first failed write of the open transaction: it must not commit
  // Files of the open transaction: written by it, or a peer's file it
  // adopted (`from`, its peer's name, to which an abort gives it back, so
  // that a retried write finds it again).
  struct Written {
    std::string name, from;
  };
  std::vector<Written> written_;
  void Unwrite(const Written& w) const;
  std::vector<std::string> to_unlink_;    // files whose rows it deletes
};

}  // namespace gpuq::broker
