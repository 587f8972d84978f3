// The broker's durable job store (schema/job_store.sql). Owned by the broker
// loop thread: not thread-safe.
//
// Writes are grouped: the loop calls Begin() before the first write of an
// iteration and Commit() after the last, so that one fsync covers every
// submit and result of that iteration. A job is acknowledged, and a result
// pushed, only after Commit() has returned.
#pragma once

#include <cstdint>
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

struct StoredJob {
  uint64_t id = 0;
  std::string tenant, key;
  std::string client;  // routing id of the submitting connection
  uint32_t priority = schema::kDefaultPriority;
  schema::JobState state = schema::JobState::kQueued;
  uint32_t attempts = 0;
  bool suspect = false;
  int64_t accepted_ms = 0, deadline_ms = 0, finished_ms = 0;
  schema::JobSpec spec;
  std::vector<std::string> inputs;  // payload frames
};

struct StoredResult {
  uint64_t id = 0;
  schema::JobState state = schema::JobState::kDone;
  Code code = Code::kOk;
  std::string error, device;
  uint32_t attempts = 0;
  schema::Timing timing;
  std::vector<uint32_t> outputs;
  std::vector<std::string> data;  // one per output
};

class JobStore {
 public:
  // Opens or creates the store at `path` and its blob directory
  // `path`.blobs; migrates a format-1 store; removes blob files no row
  // names (written by a transaction that never committed).
  static StatusOr<std::unique_ptr<JobStore>> Open(const std::string& path,
                                                 Durability durability,
                                                 uint64_t log_segment_bytes = 64u << 20);

  Status Begin();
  // Commits; then unlinks the blob files of rows the transaction deleted.
  // On failure rolls back and unlinks the files it wrote.
  Status Commit();
  bool in_transaction() const { return in_tx_; }

  // Inside a transaction. Returns the new job's id. `files` are inputs that
  // follow `inputs`: files of the blob directory (named by a local client),
  // which become the job's own (renamed) and are synced with power
  // durability.
  StatusOr<uint64_t> Insert(const StoredJob& job, const std::vector<std::string_view>& inputs,
                            const std::vector<schema::LocalFile>& files = {});
  StatusOr<std::optional<uint64_t>> FindByKey(const std::string& tenant, const std::string& key);
  Status SetAttempts(uint64_t id, uint32_t attempts, bool suspect);
  // Records a terminal state and its result, and drops the job's inputs
  // (`inputs`: how many it had, 0 saves looking).
  // `files`: outputs after `outputs`, files of the blob directory (written
  // by a local worker) that become the result's own.
  Status Finish(const StoredResult& result, const std::vector<std::string_view>& outputs,
                int64_t finished_ms, size_t inputs = SIZE_MAX,
                const std::vector<schema::LocalFile>& files = {});

  // The blob directory (absolute): the local directory of PROTOCOL.md's
  // "Local buffers". Where input `idx` of job `id` and output `idx` of its
  // result live when they are files.
  const std::string& blob_dir() const { return blobs_.path(); }
  std::string InputPath(uint64_t id, size_t idx) const;
  std::string OutputPath(uint64_t id, size_t idx) const;

  // Outside a transaction.
  // Every job not yet ended, oldest first, with its inputs: after a restart
  // each is queued again (a job dispatched when the broker stopped is lost
  // with its worker connection).
  StatusOr<std::vector<StoredJob>> LoadUnfinished(const schema::Limits& limits);
  // A job's row (without inputs), or nullopt.
  StatusOr<std::optional<StoredJob>> Get(uint64_t id);
  StatusOr<std::optional<StoredResult>> GetResult(uint64_t id);
  // Removes jobs that ended before `before_ms`, with their results.
  StatusOr<uint64_t> PurgeFinished(int64_t before_ms);
  StatusOr<uint64_t> CountJobs();

 private:
  JobStore(sql::Db db, BlobDir blobs, Durability durability)
      : db_(std::move(db)), blobs_(std::move(blobs)), durability_(durability) {}
  StatusOr<sql::Stmt*> Cached(const char* sql);
  Status RemoveOrphans();
  StatusOr<uint64_t> InsertRows(const StoredJob& job, const std::vector<std::string_view>& inputs,
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
  StatusOr<std::string> GetBuffer(const sql::Stmt& s, uint64_t id, char kind);

  sql::Db db_;
  BlobDir blobs_;
  std::unique_ptr<BlobLog> in_log_, out_log_;
  BlobLog& Log(char kind) { return kind == 'i' ? *in_log_ : *out_log_; }
  Durability durability_;
  sql::StatementCache statements_;
  bool in_tx_ = false;
  bool failed_ = false;  // a write of the open transaction failed: it must not commit
  std::vector<std::string> written_;      // files of the open transaction
  std::vector<std::string> to_unlink_;    // files whose rows it deletes
};

}  // namespace gpuq::broker
