#include "util/sqlite.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

namespace gpuq::sql {

namespace {

// The errno behind an I/O error of `db`. sqlite3_system_errno() reads errno
// after the fact and has often lost it by then; SQLite's unix VFS keeps the
// errno of a file's last failed call on that file: the database file's, or
// its WAL's (or rollback journal's).
int IoErrno(sqlite3* db) {
  int err = sqlite3_system_errno(db);
  if (err != 0) return err;
  if (sqlite3_file_control(db, "main", SQLITE_FCNTL_LAST_ERRNO, &err) == SQLITE_OK && err != 0) {
    return err;
  }
  sqlite3_file* journal = nullptr;
  if (sqlite3_file_control(db, "main", SQLITE_FCNTL_JOURNAL_POINTER, &journal) == SQLITE_OK &&
      journal != nullptr && journal->pMethods != nullptr &&
      journal->pMethods->xFileControl(journal, SQLITE_FCNTL_LAST_ERRNO, &err) == SQLITE_OK) {
    return err;
  }
  return 0;
}

}  // namespace

Status ErrorFrom(sqlite3* db, int rc, std::string_view what) {
  std::string msg(what);
  msg += ": ";
  msg += sqlite3_errstr(rc);
  if (db && sqlite3_errcode(db) == rc &&
      std::string_view(sqlite3_errmsg(db)) != sqlite3_errstr(rc)) {
    msg += " (";
    msg += sqlite3_errmsg(db);
    msg += ")";
  }
  const int primary = rc & 0xff;
  if (primary == SQLITE_BUSY || primary == SQLITE_LOCKED) {
    return Status(Code::kUnavailable, std::move(msg));
  }
  const int err = db && primary == SQLITE_IOERR ? IoErrno(db) : 0;
  if (primary == SQLITE_FULL || err == ENOSPC || err == EDQUOT || err == EFBIG) {
    if (err != 0) {
      msg += ": ";
      msg += std::strerror(err);
    }
    return Status(Code::kResourceExhausted, "no space: " + msg);
  }
  return Status(Code::kIoError, std::move(msg));
}

Stmt& Stmt::Reset() {
  sqlite3_reset(stmt_.get());
  sqlite3_clear_bindings(stmt_.get());
  bind_rc_ = SQLITE_OK;
  return *this;
}

Stmt& Stmt::Bind(int i, int64_t v) {
  int rc = sqlite3_bind_int64(stmt_.get(), i, v);
  if (bind_rc_ == SQLITE_OK) bind_rc_ = rc;
  return *this;
}

Stmt& Stmt::Bind(int i, std::string_view text) {
  int rc = sqlite3_bind_text64(stmt_.get(), i, text.data(), text.size(),
                               SQLITE_TRANSIENT, SQLITE_UTF8);
  if (bind_rc_ == SQLITE_OK) bind_rc_ = rc;
  return *this;
}

Stmt& Stmt::BindBlob(int i, std::string_view bytes) {
  return BindBlob(i, bytes.data(), bytes.size());
}

Stmt& Stmt::BindBlob(int i, const void* data, size_t size) {
  // A zero-length blob must not bind as NULL.
  static const char kEmpty = 0;
  int rc = sqlite3_bind_blob64(stmt_.get(), i, size ? data : &kEmpty, size,
                               SQLITE_TRANSIENT);
  if (bind_rc_ == SQLITE_OK) bind_rc_ = rc;
  return *this;
}

Stmt& Stmt::BindNull(int i) {
  int rc = sqlite3_bind_null(stmt_.get(), i);
  if (bind_rc_ == SQLITE_OK) bind_rc_ = rc;
  return *this;
}

StatusOr<bool> Stmt::Step() {
  if (bind_rc_ != SQLITE_OK) return ErrorFrom(db_, bind_rc_, "bind");
  int rc = sqlite3_step(stmt_.get());
  if (rc == SQLITE_ROW) return true;
  if (rc == SQLITE_DONE) return false;
  return ErrorFrom(db_, rc, sqlite3_sql(stmt_.get()));
}

Status Stmt::Run() {
  auto r = Step();
  if (!r.ok()) return r.status();
  return Status::Ok();
}

std::string Stmt::Text(int col) const {
  auto* p = sqlite3_column_text(stmt_.get(), col);
  int n = sqlite3_column_bytes(stmt_.get(), col);
  return p ? std::string(reinterpret_cast<const char*>(p), n) : std::string();
}

std::string Stmt::Blob(int col) const {
  auto* p = sqlite3_column_blob(stmt_.get(), col);
  int n = sqlite3_column_bytes(stmt_.get(), col);
  return p ? std::string(static_cast<const char*>(p), n) : std::string();
}

StatusOr<Db> Db::Open(const std::string& path, int busy_timeout_ms) {
  sqlite3* raw = nullptr;
  int rc = sqlite3_open_v2(
      path.c_str(), &raw,
      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, nullptr);
  Db db;
  db.db_.reset(raw);  // owned even when open failed
  if (rc != SQLITE_OK) return ErrorFrom(raw, rc, "open " + path);
  sqlite3_busy_timeout(raw, busy_timeout_ms);
  // Switching a new file to WAL takes an exclusive lock without calling the
  // busy handler, so two processes opening one new file can see SQLITE_BUSY
  // here: retry within the busy timeout.
  const auto give_up =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(busy_timeout_ms);
  for (auto nap = std::chrono::milliseconds(1);; nap = std::min(nap * 2, std::chrono::milliseconds(50))) {
    Status s = db.Exec("PRAGMA journal_mode=WAL");
    if (s.ok()) break;
    if (s.code() != Code::kUnavailable || std::chrono::steady_clock::now() > give_up) return s;
    std::this_thread::sleep_for(nap);
  }
  GPUQ_RETURN_IF_ERROR(db.Exec("PRAGMA foreign_keys=ON"));
  return db;
}

Status Db::Exec(std::string_view sql) {
  std::string s(sql);
  char* err = nullptr;
  int rc = sqlite3_exec(db_.get(), s.c_str(), nullptr, nullptr, &err);
  std::unique_ptr<char, decltype(&sqlite3_free)> owned(err, sqlite3_free);
  if (rc != SQLITE_OK) {
    // Named by its statement (the start of a long script), with SQLite's
    // message after it.
    return ErrorFrom(db_.get(), rc, s.size() <= 80 ? s : s.substr(0, 80) + "...");
  }
  return Status::Ok();
}

StatusOr<Stmt> Db::Prepare(std::string_view sql) {
  sqlite3_stmt* s = nullptr;
  int rc = sqlite3_prepare_v3(db_.get(), sql.data(), static_cast<int>(sql.size()),
                              SQLITE_PREPARE_PERSISTENT, &s, nullptr);
  if (rc != SQLITE_OK) return ErrorFrom(db_.get(), rc, sql);
  return Stmt(db_.get(), s);
}

StatusOr<Stmt*> StatementCache::Get(Db& db, const char* sql) {
  auto it = statements_.find(sql);
  if (it == statements_.end()) {
    GPUQ_ASSIGN_OR_RETURN(Stmt s, db.Prepare(sql));
    it = statements_.emplace(sql, std::move(s)).first;
  }
  it->second.Reset();
  return &it->second;
}

void StatementCache::ResetAll() {
  for (auto& [sql, stmt] : statements_) stmt.Reset();
}

Transaction::~Transaction() {
  if (open_) (void)db_->Exec("ROLLBACK");
}

Status Transaction::Begin() {
  GPUQ_RETURN_IF_ERROR(db_->Exec("BEGIN IMMEDIATE"));
  open_ = true;
  return Status::Ok();
}

Status Transaction::Commit() {
  GPUQ_RETURN_IF_ERROR(db_->Exec("COMMIT"));
  open_ = false;
  return Status::Ok();
}

}  // namespace gpuq::sql
