// Owning wrappers for SQLite handles and the one macro that turns a SQLite
// return code into a Status. Not thread-safe: a Db and its statements belong
// to one thread at a time (SQLite is opened with SQLITE_OPEN_NOMUTEX).
#pragma once

#include <sqlite3.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>

#include "util/status.h"

namespace gpuq::sql {

struct DbCloser {
  void operator()(sqlite3* db) const { sqlite3_close_v2(db); }
};
struct StmtFinalizer {
  void operator()(sqlite3_stmt* s) const { sqlite3_finalize(s); }
};
using DbPtr = std::unique_ptr<sqlite3, DbCloser>;

// The Status of SQLite return code `rc` from `what`: kUnavailable for
// SQLITE_BUSY and SQLITE_LOCKED; kResourceExhausted (message "no space ...")
// for SQLITE_FULL and for an I/O error whose system errno is ENOSPC, EDQUOT
// or EFBIG; kIoError otherwise.
Status ErrorFrom(sqlite3* db, int rc, std::string_view what);

// A prepared statement. Reset() before each reuse; bind indices are 1-based.
class Stmt {
 public:
  Stmt() = default;
  Stmt(sqlite3* db, sqlite3_stmt* s) : db_(db), stmt_(s) {}

  sqlite3_stmt* get() const { return stmt_.get(); }
  explicit operator bool() const { return stmt_ != nullptr; }

  Stmt& Reset();
  Stmt& Bind(int i, int64_t v);
  Stmt& Bind(int i, std::string_view text);
  Stmt& BindBlob(int i, std::string_view bytes);
  Stmt& BindBlob(int i, const void* data, size_t size);
  Stmt& BindNull(int i);

  // SQLITE_ROW -> true, SQLITE_DONE -> false, anything else -> error.
  StatusOr<bool> Step();
  // Steps once, expecting SQLITE_DONE.
  Status Run();

  int64_t Int(int col) const { return sqlite3_column_int64(stmt_.get(), col); }
  std::string Text(int col) const;
  std::string Blob(int col) const;
  bool IsNull(int col) const {
    return sqlite3_column_type(stmt_.get(), col) == SQLITE_NULL;
  }

 private:
  sqlite3* db_ = nullptr;
  std::unique_ptr<sqlite3_stmt, StmtFinalizer> stmt_;
  int bind_rc_ = SQLITE_OK;  // first bind failure, reported by Step()
};

class Db {
 public:
  // Opens (creating if needed) a database file in WAL mode with a busy
  // timeout, so that several processes may share it.
  static StatusOr<Db> Open(const std::string& path, int busy_timeout_ms = 10000);

  sqlite3* get() const { return db_.get(); }
  Status Exec(std::string_view sql);
  StatusOr<Stmt> Prepare(std::string_view sql);
  int64_t Changes() const { return sqlite3_changes64(db_.get()); }
  // Whether a transaction is open (BEGIN without its COMMIT or ROLLBACK).
  bool in_transaction() const { return sqlite3_get_autocommit(db_.get()) == 0; }

 private:
  DbPtr db_;
};

// Prepared statements kept for the life of a connection, keyed by the
// address of their SQL text (a string literal). Get() resets the statement;
// the pointer stays valid as more are added.
class StatementCache {
 public:
  StatusOr<Stmt*> Get(Db& db, const char* sql);
  // Resets every statement: none holds a read open (as one left after a
  // row does), which a rollback after an I/O error needs to clear SQLite's
  // error state.
  void ResetAll();

 private:
  std::map<const char*, Stmt> statements_;
};

// Runs BEGIN IMMEDIATE on construction and ROLLBACK on destruction unless
// Commit() succeeded. Nothing is rolled back by hand on an error path.
class Transaction {
 public:
  explicit Transaction(Db* db) : db_(db) {}
  ~Transaction();
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;
  Status Begin();
  Status Commit();

 private:
  Db* db_;
  bool open_ = false;
};

}  // namespace gpuq::sql

#define GPUQ_SQLITE_CHECK(db, expr, what)                          \
  do {                                                              \
    int _gpuq_rc = (expr);                                          \
    if (_gpuq_rc != SQLITE_OK)                                      \
      return ::gpuq::sql::ErrorFrom((db), _gpuq_rc, (what));        \
  } while (0)
