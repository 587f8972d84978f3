#include "broker/job_store.h"

#include <algorithm>
#include <charconv>
#include <filesystem>

#include "broker/job_store_sql.h"
#include "schema/codec.h"
#include "schema/filename.h"

namespace gpuq::broker {
namespace {

using schema::JobState;

// Where a buffer row's bytes are (column in_file).
constexpr int64_t kInline = 0, kInFile = 1, kInLog = 2;

// The buffer queries. Columns, as JobStore::Buffers reads them: idx,
// in_file, length(data), seg, off, len, and (the "Bytes" ones) data.
// length() of a blob column does not read the blob.
constexpr char kInputRows[] =
    "SELECT idx, in_file, length(data), seg, off, len FROM job_inputs WHERE job_id = ?1 "
    "ORDER BY idx";
constexpr char kInputRowsBytes[] =
    "SELECT idx, in_file, length(data), seg, off, len, data FROM job_inputs WHERE job_id = ?1 "
    "ORDER BY idx";
constexpr char kOutputRowsBytes[] =
    "SELECT idx, in_file, length(data), seg, off, len, data FROM result_outputs "
    "WHERE job_id = ?1 ORDER BY idx";
constexpr char kInsertInput[] =
    "INSERT INTO job_inputs(job_id, idx, data, in_file, seg, off, len) "
    "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";
constexpr char kInsertOutput[] =
    "INSERT OR REPLACE INTO result_outputs(job_id, idx, data, in_file, seg, off, len) "
    "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";

std::string_view StateName(JobState s) { return schema::JobStateName(s); }

JobState StateFrom(const std::string& s) {
  for (JobState st : {JobState::kQueued, JobState::kDispatched, JobState::kDone,
                      JobState::kFailed, JobState::kCanceled, JobState::kExpired}) {
    if (schema::JobStateName(st) == s) return st;
  }
  return JobState::kFailed;
}

std::string PackU64s(std::initializer_list<uint64_t> v) {
  std::string s;
  for (uint64_t x : v) {
    for (int i = 0; i < 8; ++i) s.push_back(static_cast<char>(x >> (8 * i)));
  }
  return s;
}

uint64_t U64At(const std::string& s, size_t i) {
  uint64_t x = 0;
  if (s.size() < 8 * (i + 1)) return 0;
  for (int b = 0; b < 8; ++b) x |= uint64_t(uint8_t(s[8 * i + b])) << (8 * b);
  return x;
}

std::string PackTiming(const schema::Timing& t) {
  std::string s = PackU64s({t.queue_us, t.compile_us, t.load_us, t.h2d_us, t.kernel_us,
                            t.d2h_us, t.total_us, uint64_t{t.cache_hit}});
  for (uint64_t us : t.launch_us) s += PackU64s({us});
  return s;
}

schema::Timing UnpackTiming(const std::string& s) {
  schema::Timing t;
  t.queue_us = U64At(s, 0);
  t.compile_us = U64At(s, 1);
  t.load_us = U64At(s, 2);
  t.h2d_us = U64At(s, 3);
  t.kernel_us = U64At(s, 4);
  t.d2h_us = U64At(s, 5);
  t.total_us = U64At(s, 6);
  t.cache_hit = U64At(s, 7) != 0;
  for (size_t i = 8; 8 * (i + 1) <= s.size(); ++i) t.launch_us.push_back(U64At(s, i));
  return t;
}

std::string PackU32s(const std::vector<uint32_t>& v) {
  std::string s;
  for (uint32_t x : v) {
    for (int i = 0; i < 4; ++i) s.push_back(static_cast<char>(x >> (8 * i)));
  }
  return s;
}

std::vector<uint32_t> UnpackU32s(const std::string& s) {
  std::vector<uint32_t> v(s.size() / 4);
  for (size_t i = 0; i < v.size(); ++i) {
    for (int b = 0; b < 4; ++b) v[i] |= uint32_t(uint8_t(s[4 * i + b])) << (8 * b);
  }
  return v;
}

// meta `name` as a number; 0 when there is no such row.
StatusOr<uint64_t> MetaNumber(sql::Db& db, const std::string& name) {
  GPUQ_ASSIGN_OR_RETURN(sql::Stmt s, db.Prepare("SELECT value FROM meta WHERE name = ?1"));
  GPUQ_ASSIGN_OR_RETURN(bool row, s.Bind(1, name).Step());
  if (!row) return uint64_t{0};
  const std::string text = s.Text(0);
  uint64_t v = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || end != text.data() + text.size()) {
    return Error(Code::kInvalid, "meta '" + name + "' is not a number: '" + text + "'");
  }
  return v;
}

Status SetMeta(sql::Db& db, const std::string& name, uint64_t value) {
  GPUQ_ASSIGN_OR_RETURN(sql::Stmt s,
                        db.Prepare("INSERT OR REPLACE INTO meta(name, value) VALUES (?1, ?2)"));
  return s.Bind(1, name).Bind(2, std::to_string(value)).Run();
}

std::string BlobName(uint64_t id, char kind, uint64_t idx) {
  return schema::StoredBufferName(id, kind, idx);
}

// j<id>.<kind><idx> -> true and its parts.
bool ParseBlobName(const std::string& name, uint64_t* id, char* kind, uint64_t* idx) {
  schema::ParsedFileName p;
  if (!schema::ParseFileName(name, &p) ||
      (p.type != schema::FileType::kStoredInput && p.type != schema::FileType::kStoredOutput)) {
    return false;
  }
  *id = p.job;
  *kind = p.type == schema::FileType::kStoredInput ? 'i' : 'o';
  *idx = p.idx;
  return true;
}

}  // namespace

StatusOr<std::unique_ptr<JobStore>> JobStore::Open(const std::string& path,
                                                  Durability durability,
                                                  uint64_t log_segment_bytes) {
  GPUQ_ASSIGN_OR_RETURN(sql::Db db, sql::Db::Open(path));
  GPUQ_RETURN_IF_ERROR(db.Exec(durability == Durability::kPowerLoss
                                   ? "PRAGMA synchronous=FULL"
                                   : "PRAGMA synchronous=NORMAL"));
  GPUQ_RETURN_IF_ERROR(db.Exec("PRAGMA wal_autocheckpoint=8192"));
  uint64_t epoch = 0, next_id = 1;
  {
    // Schema, migration, epoch and next id in one transaction: a store of
    // an unknown format is left as it was.
    sql::Transaction tx(&db);
    GPUQ_RETURN_IF_ERROR(tx.Begin());
    GPUQ_RETURN_IF_ERROR(db.Exec(kJobStoreSql));
    std::string format;
    {
      GPUQ_ASSIGN_OR_RETURN(sql::Stmt fmt,
                            db.Prepare("SELECT value FROM meta WHERE name='format'"));
      GPUQ_ASSIGN_OR_RETURN(bool row, fmt.Step());
      if (row) format = fmt.Text(0);
    }
    if (format == "1") {  // format 2 added the buffer files and the log
      GPUQ_RETURN_IF_ERROR(db.Exec(
          "ALTER TABLE job_inputs ADD COLUMN in_file INTEGER NOT NULL DEFAULT 0;"
          "ALTER TABLE job_inputs ADD COLUMN seg INTEGER;"
          "ALTER TABLE job_inputs ADD COLUMN off INTEGER;"
          "ALTER TABLE job_inputs ADD COLUMN len INTEGER;"
          "ALTER TABLE result_outputs ADD COLUMN in_file INTEGER NOT NULL DEFAULT 0;"
          "ALTER TABLE result_outputs ADD COLUMN seg INTEGER;"
          "ALTER TABLE result_outputs ADD COLUMN off INTEGER;"
          "ALTER TABLE result_outputs ADD COLUMN len INTEGER;"));
      format = "2";
    }
    if (format == "2") {
      // Format 3 added meta 'next_id' and 'epoch' (written below) and the
      // recorded len of inline and file rows (NULL in older rows). No
      // existing row changes.
      GPUQ_RETURN_IF_ERROR(db.Exec("UPDATE meta SET value = '3' WHERE name = 'format'"));
      format = "3";
    }
    if (format == "3") {
      // Format 4 added the usage table (made above, empty).
      GPUQ_RETURN_IF_ERROR(db.Exec("UPDATE meta SET value = '4' WHERE name = 'format'"));
      format = "4";
    }
    if (format != "4") {
      return Error(Code::kInvalid, path + " is a job store of an unknown format");
    }
    GPUQ_ASSIGN_OR_RETURN(uint64_t opened, MetaNumber(db, "epoch"));
    epoch = opened + 1;
    GPUQ_RETURN_IF_ERROR(SetMeta(db, "epoch", epoch));
    GPUQ_ASSIGN_OR_RETURN(next_id, MetaNumber(db, "next_id"));
    {
      GPUQ_ASSIGN_OR_RETURN(sql::Stmt max, db.Prepare("SELECT MAX(id) FROM jobs"));
      GPUQ_ASSIGN_OR_RETURN(bool row, max.Step());
      if (row && !max.IsNull(0)) next_id = std::max(next_id, uint64_t(max.Int(0)) + 1);
    }
    next_id = std::max<uint64_t>(next_id, 1);
    // Recorded now: a store migrated from format 2 whose last jobs are
    // purged before it inserts one must not issue their ids again.
    GPUQ_RETURN_IF_ERROR(SetMeta(db, "next_id", next_id));
    GPUQ_RETURN_IF_ERROR(tx.Commit());
  }
  std::error_code ec;
  const std::string blob_path = std::filesystem::absolute(path + ".blobs", ec).string();
  if (ec) return Error(Code::kIoError, path + ".blobs: " + ec.message());
  GPUQ_ASSIGN_OR_RETURN(BlobDir blobs, BlobDir::Open(blob_path));
  std::unique_ptr<JobStore> store(new JobStore(std::move(db), std::move(blobs), durability));
  store->epoch_ = epoch;
  store->next_id_ = store->committed_next_id_ = store->recorded_next_id_ = next_id;
  GPUQ_RETURN_IF_ERROR(store->RemoveOrphans());
  for (const char* table : {"job_inputs", "result_outputs"}) {
    const bool inputs = std::string_view(table) == "job_inputs";
    std::map<uint64_t, uint64_t> live;  // rows per log segment
    GPUQ_ASSIGN_OR_RETURN(sql::Stmt segs,
                          store->db_.Prepare(std::string("SELECT seg, COUNT(*) FROM ") + table +
                                             " WHERE in_file = 2 GROUP BY seg"));
    for (;;) {
      GPUQ_ASSIGN_OR_RETURN(bool row, segs.Step());
      if (!row) break;
      live[static_cast<uint64_t>(segs.Int(0))] = static_cast<uint64_t>(segs.Int(1));
    }
    GPUQ_ASSIGN_OR_RETURN(
        (inputs ? store->in_log_ : store->out_log_),
        BlobLog::Open(&store->blobs_,
                      std::string(inputs ? schema::kInputLogPrefix : schema::kOutputLogPrefix),
                      std::move(live),
                      log_segment_bytes));
  }
  return store;
}

Status JobStore::RemoveOrphans() {
  // Local clients' and workers' files that no message took (an hour is
  // longer than any of them takes between writing a file and sending it).
  blobs_.RemoveStale(std::string(schema::kClientFilePrefix), 3600);
  blobs_.RemoveStale(std::string(schema::kWorkerFilePrefix), 3600);
  GPUQ_ASSIGN_OR_RETURN(std::vector<std::string> names, blobs_.List());
  for (const std::string& name : names) {
    uint64_t id = 0, idx = 0;
    char kind = 0;
    if (!ParseBlobName(name, &id, &kind, &idx)) continue;  // not ours
    GPUQ_ASSIGN_OR_RETURN(
        sql::Stmt * s,
        Cached(kind == 'i'
                   ? "SELECT 1 FROM job_inputs WHERE job_id = ?1 AND idx = ?2 AND in_file = 1"
                   : "SELECT 1 FROM result_outputs WHERE job_id = ?1 AND idx = ?2 AND in_file = 1"));
    GPUQ_ASSIGN_OR_RETURN(
        bool named, s->Bind(1, static_cast<int64_t>(id)).Bind(2, static_cast<int64_t>(idx)).Step());
    s->Reset();
    if (!named) blobs_.Remove(name);
  }
  return Status::Ok();
}

Status JobStore::PutBuffer(const char* insert_sql, uint64_t id, size_t idx, char kind,
                           std::string_view data) {
  GPUQ_ASSIGN_OR_RETURN(sql::Stmt * s, Cached(insert_sql));
  s->Bind(1, static_cast<int64_t>(id)).Bind(2, static_cast<int64_t>(idx));
  if (data.size() >= kBlobFileMinBytes) {
    std::string name = BlobName(id, kind, idx);
    GPUQ_RETURN_IF_ERROR(blobs_.Write(name, data, durability_ == Durability::kPowerLoss));
    written_.push_back({std::move(name), {}});
    s->BindBlob(3, std::string_view()).Bind(4, kInFile).BindNull(5).BindNull(6);
  } else if (data.size() >= kBlobLogMinBytes) {
    const BlobLog::Ref ref = Log(kind).Append(data);
    s->BindBlob(3, std::string_view())
        .Bind(4, kInLog)
        .Bind(5, static_cast<int64_t>(ref.seg))
        .Bind(6, static_cast<int64_t>(ref.off));
  } else {
    s->BindBlob(3, data).Bind(4, kInline).BindNull(5).BindNull(6);
  }
  return s->Bind(7, static_cast<int64_t>(data.size())).Run();
}

Status JobStore::AdoptBuffer(const char* insert_sql, uint64_t id, size_t idx, char kind,
                             const std::string& name, uint64_t expected_size) {
  std::string to = BlobName(id, kind, idx);
  uint64_t size = 0;
  GPUQ_RETURN_IF_ERROR(blobs_.Adopt(name, to, &size, durability_ == Durability::kPowerLoss));
  if (expected_size != size) {
    blobs_.Remove(to);
    return Error(Code::kInvalid, "local file " + name + " changed size");
  }
  written_.push_back({std::move(to), name});
  GPUQ_ASSIGN_OR_RETURN(sql::Stmt * s, Cached(insert_sql));
  return s->Bind(1, static_cast<int64_t>(id))
      .Bind(2, static_cast<int64_t>(idx))
      .BindBlob(3, std::string_view())
      .Bind(4, kInFile)
      .BindNull(5)
      .BindNull(6)
      .Bind(7, static_cast<int64_t>(size))
      .Run();
}

void JobStore::Unwrite(const Written& w) const {
  if (w.from.empty()) return blobs_.Remove(w.name);
  blobs_.Unadopt(w.from, w.name);
}

std::string JobStore::InputPath(uint64_t id, size_t idx) const {
  return blobs_.path() + "/" + BlobName(id, 'i', idx);
}

std::string JobStore::OutputPath(uint64_t id, size_t idx) const {
  return blobs_.path() + "/" + BlobName(id, 'o', idx);
}

Status JobStore::ForgetBuffers(const char* select_sql, int64_t arg, char kind) {
  GPUQ_ASSIGN_OR_RETURN(sql::Stmt * s, Cached(select_sql));
  s->Bind(1, arg);
  for (;;) {
    // Columns: job_id, idx, in_file, seg.
    GPUQ_ASSIGN_OR_RETURN(bool row, s->Step());
    if (!row) break;
    if (s->Int(2) == kInFile) {
      to_unlink_.push_back(
          BlobName(static_cast<uint64_t>(s->Int(0)), kind, static_cast<uint64_t>(s->Int(1))));
    } else if (s->Int(2) == kInLog) {
      Log(kind).Release(static_cast<uint64_t>(s->Int(3)));
    }
  }
  return Status::Ok();
}

Status JobStore::Buffers(const char* select_sql, uint64_t id, char kind, bool read,
                         std::vector<StoredBuffer>* out, std::string* damage) {
  GPUQ_ASSIGN_OR_RETURN(sql::Stmt * s, Cached(select_sql));
  s->Bind(1, static_cast<int64_t>(id));
  const std::string what = kind == 'i' ? "input " : "output ";
  for (;;) {
    GPUQ_ASSIGN_OR_RETURN(bool row, s->Step());
    if (!row) break;
    const auto idx = static_cast<uint64_t>(s->Int(0));
    if (idx != out->size()) {
      *damage = what + std::to_string(out->size()) + ": no row";
      return Status::Ok();
    }
    const std::optional<uint64_t> len =
        s->IsNull(5) ? std::nullopt : std::optional<uint64_t>(static_cast<uint64_t>(s->Int(5)));
    StoredBuffer b;
    std::string where;  // where the bytes are, for a damage report
    Status check = Status::Ok();
    auto holds = [&](uint64_t size) {
      return Error(Code::kIoError,
                   "holds " + std::to_string(size) + " bytes, not " + std::to_string(*len));
    };
    switch (s->Int(1)) {
      case kInline:
        where = "inline";
        b.size = static_cast<uint64_t>(s->Int(2));
        if (len && *len != b.size) {
          check = holds(b.size);
        } else if (read) {
          b.bytes = s->Blob(6);
        }
        break;
      case kInFile: {
        where = BlobName(id, kind, idx);
        StatusOr<uint64_t> size = blobs_.Size(where);
        if (!size.ok()) {
          check = size.status();
        } else if (len && *len != *size) {
          check = holds(*size);
        } else {
          b.size = *size;
          b.path = blobs_.path() + "/" + where;
        }
        break;
      }
      case kInLog: {
        const BlobLog::Ref ref{static_cast<uint64_t>(s->Int(3)),
                               static_cast<uint64_t>(s->Int(4)), len.value_or(0)};
        where = Log(kind).Name(ref.seg) + " bytes " + std::to_string(ref.off) + "+" +
                std::to_string(ref.len);
        b.size = ref.len;
        check = Log(kind).Check(ref);
        if (check.ok() && read) {
          StatusOr<std::string> bytes = Log(kind).Read(ref);
          if (bytes.ok()) {
            b.bytes = std::move(*bytes);
          } else {
            check = bytes.status();
          }
        }
        break;
      }
      default:
        where = "in_file " + std::to_string(s->Int(1));
        check = Error(Code::kIoError, "unknown place");
    }
    if (!check.ok()) {
      *damage = what + std::to_string(idx) + " (" + where + "): " + check.message();
      return Status::Ok();
    }
    out->push_back(std::move(b));
  }
  return Status::Ok();
}

StatusOr<sql::Stmt*> JobStore::Cached(const char* sql) { return statements_.Get(db_, sql); }

Status JobStore::Failed(Status s) {
  if (!s.ok() && failure_.ok()) failure_ = s;
  return s;
}

Status JobStore::Begin() {
  if (in_tx_) return Error(Code::kInternal, "Begin inside a transaction");
  if (db_.in_transaction()) {
    // The rollback of a failed transaction did not complete (SQLite keeps
    // an I/O error's state until it does): it is retried first.
    statements_.ResetAll();
    GPUQ_RETURN_IF_ERROR(db_.Exec("ROLLBACK"));
  }
  GPUQ_RETURN_IF_ERROR(db_.Exec("BEGIN IMMEDIATE"));
  in_tx_ = true;
  return Status::Ok();
}

Status JobStore::Commit() {
  if (!in_tx_) return Error(Code::kInternal, "Commit outside a transaction");
  Status s = failure_;
  if (!s.ok()) s = s.WithContext("transaction rolled back, as a write in it failed");
  // The high-water mark of ids, once per transaction that purged jobs. Only
  // a purge deletes jobs rows, so only a purge can take the largest issued
  // id out of MAX(jobs.id): a transaction that only inserts leaves it there,
  // and writing the mark then would cost it a page (two WAL frames).
  const bool record_next_id = purged_ && next_id_ != recorded_next_id_;
  if (s.ok() && !usage_.empty()) s = WriteUsage();
  if (s.ok() && record_next_id) {
    StatusOr<sql::Stmt*> meta =
        Cached("INSERT OR REPLACE INTO meta(name, value) VALUES ('next_id', ?1)");
    s = meta.ok() ? (*meta)->Bind(1, std::to_string(next_id_)).Run() : meta.status();
  }
  // The rows name files that must exist after a power loss: their data is
  // synced as written, their directory entries here.
  const bool power = durability_ == Durability::kPowerLoss;
  if (s.ok() && power && !written_.empty()) s = blobs_.SyncDir();
  if (s.ok()) s = in_log_->Flush(power);
  if (s.ok()) s = out_log_->Flush(power);
  if (s.ok()) s = db_.Exec("COMMIT");
  if (!s.ok()) {
    Abort();
    return s;
  }
  for (const std::string& name : to_unlink_) blobs_.Remove(name);
  in_log_->Committed();
  out_log_->Committed();
  committed_next_id_ = next_id_;
  if (record_next_id) recorded_next_id_ = next_id_;
  purged_ = false;
  written_.clear();
  to_unlink_.clear();
  in_tx_ = false;
  return Status::Ok();
}

void JobStore::Abort() {
  // A statement stopped after a row keeps a read open, and SQLite leaves
  // the error state of a failed write only once no statement is active.
  statements_.ResetAll();
  // SQLite may have rolled back already (a failed COMMIT can); should the
  // rollback fail, Begin() retries it.
  if (db_.in_transaction()) (void)db_.Exec("ROLLBACK");
  for (const Written& w : written_) Unwrite(w);
  in_log_->Aborted();
  out_log_->Aborted();
  next_id_ = committed_next_id_;
  purged_ = false;
  usage_.clear();
  written_.clear();
  to_unlink_.clear();
  failure_ = Status::Ok();
  in_tx_ = false;
}

Status JobStore::Insert(const StoredJob& job, const std::vector<std::string_view>& inputs,
                        const std::vector<schema::LocalFile>& files) {
  return InsertWithSpec(job, job.spec, inputs, files);
}

Status JobStore::InsertWithSpec(const StoredJob& job, const schema::JobSpec& spec,
                        const std::vector<std::string_view>& inputs,
                        const std::vector<schema::LocalFile>& files) {
  if (!in_tx_) return Error(Code::kInternal, "Insert outside a transaction");
  if (job.id < next_id_) {
    return Error(Code::kInternal, "job id " + std::to_string(job.id) +
                                      " was issued before (the next unissued is " +
                                      std::to_string(next_id_) + ")");
  }
  if (files.empty()) {
    // Only the store itself can fail here: then the whole group fails.
    GPUQ_RETURN_IF_ERROR(Failed(InsertRows(job, spec, inputs, files)));
    next_id_ = job.id + 1;
    return Status::Ok();
  }
  // A failure part way (a local file that fails its checks, a client's
  // doing) must leave nothing of the job in the group's transaction: no row,
  // no file it wrote or renamed, no log bytes counted.
  const size_t written = written_.size();
  const BlobLog::Mark logged = in_log_->mark();
  GPUQ_RETURN_IF_ERROR(Failed(db_.Exec("SAVEPOINT job_insert")));
  Status s = InsertRows(job, spec, inputs, files);
  if (!s.ok()) {
    (void)Failed(db_.Exec("ROLLBACK TO job_insert"));
    for (size_t i = written; i < written_.size(); ++i) Unwrite(written_[i]);
    written_.resize(written);
    in_log_->RollbackTo(logged);
  }
  GPUQ_RETURN_IF_ERROR(Failed(db_.Exec("RELEASE job_insert")));
  if (s.ok()) next_id_ = job.id + 1;
  return s;
}

Status JobStore::InsertRows(const StoredJob& job, const schema::JobSpec& spec,
                            const std::vector<std::string_view>& inputs,
                            const std::vector<schema::LocalFile>& files) {
  GPUQ_ASSIGN_OR_RETURN(
      sql::Stmt * s,
      Cached("INSERT INTO jobs(id, tenant, client_key, priority, state, attempts, suspect, "
             "accepted_ms, deadline_ms, spec, client) "
             "VALUES (?1, ?2, ?3, ?4, 'queued', 0, 0, ?5, ?6, ?7, x'')"));
  s->Bind(1, static_cast<int64_t>(job.id)).Bind(2, job.tenant);
  if (job.key.empty()) {
    s->BindNull(3);
  } else {
    s->Bind(3, job.key);
  }
  s->Bind(4, int64_t{job.priority})
      .Bind(5, job.accepted_ms)
      .Bind(6, job.deadline_ms)
      .BindBlob(7, schema::EncodeJobSpec(spec));
  GPUQ_RETURN_IF_ERROR(s->Run());
  for (size_t i = 0; i < inputs.size(); ++i) {
    GPUQ_RETURN_IF_ERROR(PutBuffer(kInsertInput, job.id, i, 'i', inputs[i]));
  }
  for (size_t i = 0; i < files.size(); ++i) {
    GPUQ_RETURN_IF_ERROR(AdoptBuffer(kInsertInput, job.id, inputs.size() + i, 'i',
                                     files[i].name, files[i].size));
  }
  return Status::Ok();
}

StatusOr<std::optional<uint64_t>> JobStore::FindByKey(const std::string& tenant,
                                                      const std::string& key) {
  GPUQ_ASSIGN_OR_RETURN(sql::Stmt * s,
                        Cached("SELECT id FROM jobs WHERE tenant = ?1 AND client_key = ?2"));
  GPUQ_ASSIGN_OR_RETURN(bool row, s->Bind(1, tenant).Bind(2, key).Step());
  if (!row) return std::optional<uint64_t>();
  return std::optional<uint64_t>(static_cast<uint64_t>(s->Int(0)));
}

Status JobStore::SetAttempts(uint64_t id, uint32_t attempts, bool suspect) {
  StatusOr<sql::Stmt*> s = Cached("UPDATE jobs SET attempts = ?1, suspect = ?2 WHERE id = ?3");
  if (!s.ok()) return Failed(s.status());
  return Failed((*s)->Bind(1, int64_t{attempts})
                    .Bind(2, int64_t{suspect})
                    .Bind(3, static_cast<int64_t>(id))
                    .Run());
}

Status JobStore::Finish(const StoredResult& r, const std::vector<std::string_view>& outputs,
                        int64_t finished_ms, size_t inputs,
                        const std::vector<schema::LocalFile>& files) {
  return Failed(FinishRows(r, outputs, finished_ms, inputs, files));
}

Status JobStore::FinishRows(const StoredResult& r, const std::vector<std::string_view>& outputs,
                            int64_t finished_ms, size_t inputs,
                            const std::vector<schema::LocalFile>& files) {
  const auto id = static_cast<int64_t>(r.id);
  GPUQ_ASSIGN_OR_RETURN(
      sql::Stmt * u,
      Cached("UPDATE jobs SET state = ?1, attempts = ?2, finished_ms = ?3 WHERE id = ?4"));
  GPUQ_RETURN_IF_ERROR(u->Bind(1, StateName(r.state))
                           .Bind(2, int64_t{r.attempts})
                           .Bind(3, finished_ms)
                           .Bind(4, id)
                           .Run());
  if (inputs > 0) {
    GPUQ_RETURN_IF_ERROR(ForgetBuffers(
        "SELECT job_id, idx, in_file, seg FROM job_inputs WHERE job_id = ?1 AND in_file <> 0", id,
        'i'));
    GPUQ_ASSIGN_OR_RETURN(sql::Stmt * d, Cached("DELETE FROM job_inputs WHERE job_id = ?1"));
    GPUQ_RETURN_IF_ERROR(d->Bind(1, id).Run());
  }
  GPUQ_ASSIGN_OR_RETURN(
      sql::Stmt * res,
      Cached("INSERT INTO results(job_id, code, error, device, timing, outputs) "
             "VALUES (?1, ?2, ?3, ?4, ?5, ?6)"));
  GPUQ_RETURN_IF_ERROR(res->Bind(1, id)
                           .Bind(2, CodeName(r.code))
                           .Bind(3, r.error)
                           .Bind(4, r.device)
                           .BindBlob(5, PackTiming(r.timing))
                           .BindBlob(6, PackU32s(r.outputs))
                           .Run());
  for (size_t i = 0; i < outputs.size(); ++i) {
    GPUQ_RETURN_IF_ERROR(PutBuffer(kInsertOutput, r.id, i, 'o', outputs[i]));
  }
  uint64_t bytes_out = 0;
  for (size_t i = 0; i < files.size(); ++i) {
    GPUQ_RETURN_IF_ERROR(AdoptBuffer(kInsertOutput, r.id, outputs.size() + i, 'o',
                                     files[i].name, files[i].size));
    bytes_out += files[i].size;
  }
  for (std::string_view o : outputs) bytes_out += o.size();
  // The tenant's usage, written with the transaction (Commit).
  schema::TenantUsage& use = usage_[{r.tenant, finished_ms / 3600000}];
  use.done += r.state == JobState::kDone;
  use.failed += r.state == JobState::kFailed;
  use.canceled += r.state == JobState::kCanceled;
  use.expired += r.state == JobState::kExpired;
  use.gpu_us += r.timing.total_us - std::min(r.timing.total_us, r.timing.queue_us);
  use.kernel_us += r.timing.kernel_us;
  use.bytes_in += r.input_bytes;
  use.bytes_out += bytes_out;
  return Status::Ok();
}

Status JobStore::WriteUsage() {
  static constexpr char kUpsert[] =
      "INSERT INTO usage(tenant, hour, done, failed, canceled, expired, gpu_us, "
      "kernel_us, bytes_in, bytes_out) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) "
      "ON CONFLICT(tenant, hour) DO UPDATE SET done = done + excluded.done, "
      "failed = failed + excluded.failed, canceled = canceled + excluded.canceled, "
      "expired = expired + excluded.expired, gpu_us = gpu_us + excluded.gpu_us, "
      "kernel_us = kernel_us + excluded.kernel_us, "
      "bytes_in = bytes_in + excluded.bytes_in, bytes_out = bytes_out + excluded.bytes_out";
  const auto clamp = [](uint64_t v) { return static_cast<int64_t>(std::min<uint64_t>(v, INT64_MAX)); };
  for (const auto& [key, u] : usage_) {
    // Cached() resets the statement: one fetch per row.
    GPUQ_ASSIGN_OR_RETURN(sql::Stmt * use, Cached(kUpsert));
    GPUQ_RETURN_IF_ERROR(use->Bind(1, key.first)
                             .Bind(2, key.second)
                             .Bind(3, clamp(u.done))
                             .Bind(4, clamp(u.failed))
                             .Bind(5, clamp(u.canceled))
                             .Bind(6, clamp(u.expired))
                             .Bind(7, clamp(u.gpu_us))
                             .Bind(8, clamp(u.kernel_us))
                             .Bind(9, clamp(u.bytes_in))
                             .Bind(10, clamp(u.bytes_out))
                             .Run());
  }
  usage_.clear();
  return Status::Ok();
}

StatusOr<std::vector<TenantUsage>> JobStore::GetUsage(const std::string& tenant,
                                                      int64_t since_ms, int64_t until_ms) {
  GPUQ_ASSIGN_OR_RETURN(
      sql::Stmt * s,
      Cached("SELECT tenant, SUM(done), SUM(failed), SUM(canceled), SUM(expired), SUM(gpu_us), "
             "SUM(kernel_us), SUM(bytes_in), SUM(bytes_out) FROM usage "
             "WHERE (?1 = '' OR tenant = ?1) AND hour >= ?2 AND hour < ?3 "
             "GROUP BY tenant ORDER BY tenant"));
  const int64_t first = std::max<int64_t>(0, since_ms) / 3600000;
  const int64_t end = until_ms <= 0 ? INT64_MAX : (until_ms + 3599999) / 3600000;
  s->Bind(1, tenant).Bind(2, first).Bind(3, end);  // a failure shows at Step()
  std::vector<TenantUsage> out;
  for (;;) {
    GPUQ_ASSIGN_OR_RETURN(bool row, s->Step());
    if (!row) break;
    TenantUsage u;
    u.tenant = s->Text(0);
    u.done = static_cast<uint64_t>(s->Int(1));
    u.failed = static_cast<uint64_t>(s->Int(2));
    u.canceled = static_cast<uint64_t>(s->Int(3));
    u.expired = static_cast<uint64_t>(s->Int(4));
    u.gpu_us = static_cast<uint64_t>(s->Int(5));
    u.kernel_us = static_cast<uint64_t>(s->Int(6));
    u.bytes_in = static_cast<uint64_t>(s->Int(7));
    u.bytes_out = static_cast<uint64_t>(s->Int(8));
    out.push_back(std::move(u));
  }
  return out;
}

StatusOr<ResumeSet> JobStore::LoadUnfinished(const schema::Limits& limits, int64_t now_ms) {
  if (in_tx_) return Error(Code::kInternal, "LoadUnfinished inside a transaction");
  GPUQ_ASSIGN_OR_RETURN(
      sql::Stmt * s,
      Cached("SELECT id, tenant, client_key, priority, attempts, suspect, accepted_ms, "
             "deadline_ms, spec FROM jobs WHERE state = 'queued' ORDER BY id"));
  std::vector<StoredJob> jobs;
  for (;;) {
    GPUQ_ASSIGN_OR_RETURN(bool row, s->Step());
    if (!row) break;
    StoredJob j;
    j.id = static_cast<uint64_t>(s->Int(0));
    j.tenant = s->Text(1);
    j.key = s->IsNull(2) ? "" : s->Text(2);
    j.priority = static_cast<uint32_t>(s->Int(3));
    j.attempts = static_cast<uint32_t>(s->Int(4));
    j.suspect = s->Int(5) != 0;
    j.accepted_ms = s->Int(6);
    j.deadline_ms = s->Int(7);
    j.spec.kernel.source = s->Blob(8);  // decoded below, with the inputs' sizes
    jobs.push_back(std::move(j));
  }
  ResumeSet set;
  std::vector<uint32_t> quarantined_attempts;
  for (StoredJob& j : jobs) {
    std::string damage;
    GPUQ_RETURN_IF_ERROR(Buffers(kInputRows, j.id, 'i', /*read=*/false, &j.inputs, &damage));
    if (damage.empty()) {
      std::vector<uint64_t> sizes;
      for (const StoredBuffer& b : j.inputs) sizes.push_back(b.size);
      const std::string spec = std::move(j.spec.kernel.source);
      j.spec = schema::JobSpec();
      Status decoded = schema::DecodeJobSpec(spec, sizes, limits, &j.spec);
      if (!decoded.ok()) damage = "spec: " + decoded.ToString();
    }
    if (damage.empty()) {
      set.jobs.push_back(std::move(j));
    } else {
      set.quarantined.push_back({j.id, std::move(j.tenant), std::move(damage)});
      quarantined_attempts.push_back(j.attempts);
    }
  }
  if (set.quarantined.empty()) return set;
  GPUQ_RETURN_IF_ERROR(Begin());
  for (size_t i = 0; i < set.quarantined.size(); ++i) {
    StoredResult r;
    r.id = set.quarantined[i].id;
    r.state = JobState::kFailed;
    r.code = Code::kIoError;
    r.error = "damaged in the job store: " + set.quarantined[i].reason;
    r.attempts = quarantined_attempts[i];
    r.tenant = set.quarantined[i].tenant;
    if (Status f = Finish(r, {}, now_ms); !f.ok()) break;  // Commit() reports it
  }
  GPUQ_RETURN_IF_ERROR(Commit());
  return set;
}

StatusOr<std::vector<StoredBuffer>> JobStore::LoadInputs(uint64_t id) {
  std::vector<StoredBuffer> inputs;
  std::string damage;
  GPUQ_RETURN_IF_ERROR(Buffers(kInputRowsBytes, id, 'i', /*read=*/true, &inputs, &damage));
  if (!damage.empty()) return Error(Code::kIoError, "job " + std::to_string(id) + ": " + damage);
  return inputs;
}

StatusOr<std::optional<StoredJob>> JobStore::Get(uint64_t id) {
  GPUQ_ASSIGN_OR_RETURN(
      sql::Stmt * s,
      Cached("SELECT tenant, client_key, priority, state, attempts, suspect, accepted_ms, "
             "deadline_ms, finished_ms, spec FROM jobs WHERE id = ?1"));
  GPUQ_ASSIGN_OR_RETURN(bool row, s->Bind(1, static_cast<int64_t>(id)).Step());
  if (!row) return std::optional<StoredJob>();
  StoredJob j;
  j.id = id;
  j.tenant = s->Text(0);
  j.key = s->IsNull(1) ? "" : s->Text(1);
  j.priority = static_cast<uint32_t>(s->Int(2));
  j.state = StateFrom(s->Text(3));
  j.attempts = static_cast<uint32_t>(s->Int(4));
  j.suspect = s->Int(5) != 0;
  j.accepted_ms = s->Int(6);
  j.deadline_ms = s->Int(7);
  j.finished_ms = s->IsNull(8) ? 0 : s->Int(8);
  // Of the spec, only what readers of an ended job need (its bytes are not
  // decoded whole).
  j.spec.local_out = schema::PeekBool(s->Blob(9), "local_out").value_or(false);
  return std::optional<StoredJob>(std::move(j));
}

StatusOr<std::optional<StoredResult>> JobStore::GetResultMeta(uint64_t id) {
  GPUQ_ASSIGN_OR_RETURN(
      sql::Stmt * s,
      Cached("SELECT j.state, j.attempts, r.code, r.error, r.device, r.timing, r.outputs "
             "FROM results r JOIN jobs j ON j.id = r.job_id WHERE r.job_id = ?1"));
  GPUQ_ASSIGN_OR_RETURN(bool row, s->Bind(1, static_cast<int64_t>(id)).Step());
  if (!row) return std::optional<StoredResult>();
  StoredResult r;
  r.id = id;
  r.state = StateFrom(s->Text(0));
  r.attempts = static_cast<uint32_t>(s->Int(1));
  r.code = CodeFromName(s->Text(2)).value_or(Code::kInternal);
  r.error = s->Text(3);
  r.device = s->Text(4);
  r.timing = UnpackTiming(s->Blob(5));
  r.outputs = UnpackU32s(s->Blob(6));
  return std::optional<StoredResult>(std::move(r));
}

StatusOr<std::optional<StoredResult>> JobStore::GetResult(uint64_t id) {
  GPUQ_ASSIGN_OR_RETURN(std::optional<StoredResult> found, GetResultMeta(id));
  if (!found) return std::optional<StoredResult>();
  StoredResult r = std::move(*found);
  std::string damage;
  GPUQ_RETURN_IF_ERROR(Buffers(kOutputRowsBytes, id, 'o', /*read=*/true, &r.data, &damage));
  if (damage.empty() && r.data.size() != r.outputs.size()) {
    damage = "output " + std::to_string(r.data.size()) + ": no row";
  }
  if (!damage.empty()) return Error(Code::kIoError, "job " + std::to_string(id) + ": " + damage);
  return std::optional<StoredResult>(std::move(r));
}

StatusOr<uint64_t> JobStore::PurgeFinished(int64_t before_ms) {
  GPUQ_RETURN_IF_ERROR(Failed(ForgetBuffers(
      "SELECT o.job_id, o.idx, o.in_file, o.seg FROM result_outputs o JOIN jobs j "
      "ON j.id = o.job_id WHERE o.in_file <> 0 AND j.finished_ms IS NOT NULL "
      "AND j.finished_ms < ?1",
      before_ms, 'o')));
  StatusOr<sql::Stmt*> s =
      Cached("DELETE FROM jobs WHERE finished_ms IS NOT NULL AND finished_ms < ?1");
  if (!s.ok()) return Failed(s.status());
  GPUQ_RETURN_IF_ERROR(Failed((*s)->Bind(1, before_ms).Run()));
  const auto purged = static_cast<uint64_t>(db_.Changes());
  if (purged > 0) purged_ = true;
  return purged;
}

StatusOr<uint64_t> JobStore::CountJobs() {
  GPUQ_ASSIGN_OR_RETURN(sql::Stmt * s, Cached("SELECT COUNT(*) FROM jobs"));
  GPUQ_ASSIGN_OR_RETURN(bool row, s->Step());
  return row ? static_cast<uint64_t>(s->Int(0)) : 0;
}

}  // namespace gpuq::broker
