#include "broker/compile/kernel_cache.h"

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <sstream>

#include "broker/compile/kernel_cache_sql.h"

namespace gpuq::compile {
namespace {

std::string_view AsBytes(const Digest& d) {
  return std::string_view(reinterpret_cast<const char*>(d.data()), d.size());
}

std::string EncodeLowered(const std::vector<LoweredName>& names) {
  std::string s;
  for (const auto& n : names) s += n.expression + '\t' + n.lowered + '\n';
  return s;
}

std::vector<LoweredName> DecodeLowered(const std::string& s) {
  std::vector<LoweredName> out;
  std::istringstream in(s);
  std::string line;
  while (std::getline(in, line)) {
    auto tab = line.find('\t');
    if (tab != std::string::npos) out.push_back({line.substr(0, tab), line.substr(tab + 1)});
  }
  return out;
}

std::string Hostname() {
  char buf[256] = {};
  gethostname(buf, sizeof buf - 1);
  return buf;
}

bool ProcessAlive(int64_t pid) {
  return pid > 0 && (kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM);
}

// The columns each table of schema/kernel_cache.sql must have.
constexpr std::pair<const char*, const char*> kTables[] = {
    {"meta", "name, value"},
    {"kernels",
     "key, arch, nvrtc_version, ok, code, ptx, cubin, lowered, log, compile_us, created_ms, "
     "last_used_ms, hits, bytes"},
    {"compiling", "key, pid, host, started_ms"},
    {"counters", "name, value"},
};

bool IsDamage(int rc) {
  rc &= 0xff;
  return rc == SQLITE_CORRUPT || rc == SQLITE_NOTADB;
}

// Why the file at `path` is not a sound kernel cache; empty when it is one,
// or is missing or empty (the schema will be created), or cannot be judged
// here (it cannot be opened, or is locked): Open() then reports what it finds.
std::string Diagnose(const std::string& path, bool verify) {
  sqlite3* raw = nullptr;
  int rc = sqlite3_open_v2(path.c_str(), &raw, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX,
                           nullptr);
  sql::DbPtr db(raw);  // owned even when open failed
  if (rc != SQLITE_OK) return "";
  sqlite3_busy_timeout(raw, 10000);
  // Runs `query` to its end; returns its first text cell in `*first`.
  auto run = [&](const std::string& query, std::string* first) -> int {
    sqlite3_stmt* st = nullptr;
    int prc = sqlite3_prepare_v2(raw, query.c_str(), -1, &st, nullptr);
    std::unique_ptr<sqlite3_stmt, sql::StmtFinalizer> stmt(st);
    if (prc != SQLITE_OK) return prc;
    for (bool row0 = true;; row0 = false) {
      int src = sqlite3_step(st);
      if (src == SQLITE_DONE) return SQLITE_OK;
      if (src != SQLITE_ROW) return src;
      if (row0 && first) {
        const auto* text = sqlite3_column_text(st, 0);
        *first = text ? reinterpret_cast<const char*>(text) : "";
      }
    }
  };
  // Reading the schema reads the header and the first page: a file that is
  // not SQLite fails here, and so does a truncated one (SQLite compares the
  // page count in its header with the file's size).
  rc = run("SELECT count(*) FROM sqlite_master", nullptr);
  if (IsDamage(rc)) return sqlite3_errstr(rc);
  if (rc != SQLITE_OK) return "";
  if (verify) {
    std::string verdict;
    rc = run("PRAGMA quick_check", &verdict);
    if (IsDamage(rc)) return sqlite3_errstr(rc);
    if (rc == SQLITE_OK && verdict != "ok") return "quick_check: " + verdict.substr(0, 200);
  }
  for (const auto& [table, columns] : kTables) {
    std::string present;
    rc = run(std::string("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '") +
                 table + "'",
             &present);
    if (IsDamage(rc)) return sqlite3_errstr(rc);
    if (rc != SQLITE_OK || present != "1") continue;
    rc = run(std::string("SELECT ") + columns + " FROM " + table + " LIMIT 0", nullptr);
    if (IsDamage(rc)) return sqlite3_errstr(rc);
    if (rc != SQLITE_OK) {
      return std::string("table ") + table + " is not of this format (" + sqlite3_errmsg(raw) +
             ")";
    }
  }
  return "";
}

struct FileId {
  dev_t dev = 0;
  ino_t ino = 0;
  bool operator==(const FileId&) const = default;
};

std::optional<FileId> IdOf(const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) return std::nullopt;
  return FileId{st.st_dev, st.st_ino};
}

// Moves `path` (and its -wal and -shm, so that a fresh file is not joined to
// them) to PATH.damaged-<Unix seconds>, or -<seconds>-N when that is taken.
// Returns the new name.
StatusOr<std::string> MoveAside(const std::string& path) {
  const std::string stem =
      path + ".damaged-" +
      std::to_string(std::chrono::duration_cast<std::chrono::seconds>(
                         std::chrono::system_clock::now().time_since_epoch())
                         .count());
  std::string target = stem;
  for (int n = 1; access(target.c_str(), F_OK) == 0; ++n) {
    target = stem + "-" + std::to_string(n);
  }
  if (rename(path.c_str(), target.c_str()) != 0) {
    return Error(Code::kIoError, "cannot move the damaged kernel cache " + path + " to " +
                                     target + ": " + strerror(errno));
  }
  for (const char* suffix : {"-wal", "-shm"}) {
    const std::string from = path + suffix;
    if (rename(from.c_str(), (target + suffix).c_str()) != 0 && errno != ENOENT) {
      // A stale WAL beside a fresh file would be replayed into it.
      if (unlink(from.c_str()) != 0 && errno != ENOENT) {
        return Error(Code::kIoError, "cannot move " + from + " aside: " + strerror(errno));
      }
    }
  }
  return target;
}

}  // namespace

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string CacheEntry::Symbol(const std::string& entry) const {
  for (const auto& l : lowered) {
    if (l.expression == entry) return l.lowered;
  }
  return entry;
}

bool CacheEntry::HasKernel(const std::string& symbol) const {
  const std::string needle = ".entry " + symbol + "(";
  return ptx.find(needle) != std::string::npos;
}

StatusOr<std::unique_ptr<KernelCache>> KernelCache::Open(const std::string& path,
                                                        CacheOptions options) {
  std::string set_aside;
  // Several processes may find one damaged file at once; a process moves it
  // only if it is still the file it judged, so that it never moves the fresh
  // cache another process has just started there.
  for (int attempt = 0; attempt < 3; ++attempt) {
    const std::optional<FileId> judged = IdOf(path);
    if (!judged) break;
    const std::string damage = Diagnose(path, options.verify_on_open);
    if (damage.empty()) break;
    if (IdOf(path) != judged) continue;
    GPUQ_ASSIGN_OR_RETURN(std::string moved, MoveAside(path));
    set_aside = "kernel cache " + path + " was damaged (" + damage + "); moved it to " + moved +
                " and started a fresh cache";
  }
  GPUQ_ASSIGN_OR_RETURN(auto cache, OpenSound(path, options));
  cache->set_aside_ = std::move(set_aside);
  return cache;
}

StatusOr<std::unique_ptr<KernelCache>> KernelCache::OpenSound(const std::string& path,
                                                             const CacheOptions& options) {
  GPUQ_ASSIGN_OR_RETURN(sql::Db db, sql::Db::Open(path));
  // A cache needs consistency, not durability of its last writes: in WAL
  // mode NORMAL never corrupts the file, and a power loss can only forget the
  // latest entries and touches. FULL would fsync on every lookup's touch.
  GPUQ_RETURN_IF_ERROR(db.Exec("PRAGMA synchronous=NORMAL"));
  // The schema is idempotent (IF NOT EXISTS / OR IGNORE), so several
  // processes may open a new file at once.
  {
    sql::Transaction tx(&db);
    GPUQ_RETURN_IF_ERROR(tx.Begin());
    GPUQ_RETURN_IF_ERROR(db.Exec(kKernelCacheSql));
    GPUQ_RETURN_IF_ERROR(tx.Commit());
  }
  GPUQ_ASSIGN_OR_RETURN(sql::Stmt fmt, db.Prepare("SELECT value FROM meta WHERE name='format'"));
  GPUQ_ASSIGN_OR_RETURN(bool row, fmt.Step());
  if (!row || fmt.Text(0) != "1") {
    return Error(Code::kInvalid, path + " is a kernel cache of an unknown format");
  }
  return std::unique_ptr<KernelCache>(new KernelCache(path, options, std::move(db)));
}

KernelCache::~KernelCache() {
  MutexLock lock(&mu_);
  if (pending_hits_.empty() && pending_misses_ == 0) return;
  sql::Transaction tx(&db_);
  if (tx.Begin().ok() && FlushLocked().ok()) (void)tx.Commit();
}

StatusOr<sql::Stmt*> KernelCache::Cached(const char* sql) { return statements_.Get(db_, sql); }

Status KernelCache::CountLocked(const char* counter, int64_t delta) {
  GPUQ_ASSIGN_OR_RETURN(sql::Stmt * s,
                        Cached("UPDATE counters SET value = value + ?1 WHERE name = ?2"));
  return s->Bind(1, delta).Bind(2, counter).Run();
}

Status KernelCache::FlushLocked() {
  uint64_t hits = 0;
  for (const auto& [key, n] : pending_hits_) {
    GPUQ_ASSIGN_OR_RETURN(
        sql::Stmt * u, Cached("UPDATE kernels SET last_used_ms = MAX(last_used_ms, ?1), "
                              "hits = hits + ?2 WHERE key = ?3"));
    GPUQ_RETURN_IF_ERROR(
        u->Bind(1, NowMs()).Bind(2, static_cast<int64_t>(n)).BindBlob(3, AsBytes(key)).Run());
    hits += n;
  }
  if (hits) GPUQ_RETURN_IF_ERROR(CountLocked("hits", static_cast<int64_t>(hits)));
  if (pending_misses_) {
    GPUQ_RETURN_IF_ERROR(CountLocked("misses", static_cast<int64_t>(pending_misses_)));
  }
  pending_hits_.clear();
  pending_misses_ = 0;
  return Status::Ok();
}

StatusOr<std::optional<CacheEntry>> KernelCache::Lookup(const Digest& key) {
  MutexLock lock(&mu_);
  GPUQ_ASSIGN_OR_RETURN(
      sql::Stmt * s,
      Cached("SELECT arch, nvrtc_version, ok, code, ptx, cubin, lowered, log, "
             "compile_us, created_ms, last_used_ms, hits FROM kernels WHERE key = ?1"));
  s->BindBlob(1, AsBytes(key));
  GPUQ_ASSIGN_OR_RETURN(bool row, s->Step());
  if (!row) {
    ++pending_misses_;
    return std::optional<CacheEntry>();
  }
  CacheEntry e;
  e.key = key;
  e.arch = s->Text(0);
  e.nvrtc_version = s->Text(1);
  e.ok = s->Int(2) != 0;
  e.code = CodeFromName(s->Text(3)).value_or(Code::kInternal);
  e.ptx = s->Blob(4);
  e.cubin = s->Blob(5);
  e.lowered = DecodeLowered(s->Text(6));
  e.log = s->Text(7);
  e.compile_us = static_cast<uint64_t>(s->Int(8));
  e.created_ms = s->Int(9);
  const int64_t last_used = s->Int(10);
  e.hits = static_cast<uint64_t>(s->Int(11)) + 1;
  e.last_used_ms = NowMs();
  s->Reset();  // ends the read before any write below
  ++pending_hits_[key];
  if (e.last_used_ms - last_used >= options_.touch_interval.count()) {
    sql::Transaction tx(&db_);
    GPUQ_RETURN_IF_ERROR(tx.Begin());
    GPUQ_RETURN_IF_ERROR(FlushLocked());
    GPUQ_RETURN_IF_ERROR(tx.Commit());
  }
  return std::optional<CacheEntry>(std::move(e));
}

Status KernelCache::Touch(const Digest& key, uint64_t hits) {
  MutexLock lock(&mu_);
  pending_hits_[key] += hits;
  sql::Transaction tx(&db_);
  GPUQ_RETURN_IF_ERROR(tx.Begin());
  GPUQ_RETURN_IF_ERROR(FlushLocked());
  return tx.Commit();
}

Status KernelCache::Insert(const CacheEntry& e) {
  MutexLock lock(&mu_);
  sql::Transaction tx(&db_);
  GPUQ_RETURN_IF_ERROR(tx.Begin());
  GPUQ_ASSIGN_OR_RETURN(
      sql::Stmt s,
      db_.Prepare("INSERT OR REPLACE INTO kernels(key, arch, nvrtc_version, ok, code, ptx, "
                  "cubin, lowered, log, compile_us, created_ms, last_used_ms, hits, bytes) "
                  "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"));
  const int64_t now = NowMs();
  s.BindBlob(1, AsBytes(e.key))
      .Bind(2, e.arch)
      .Bind(3, e.nvrtc_version)
      .Bind(4, int64_t{e.ok})
      .Bind(5, CodeName(e.code))
      .BindBlob(6, e.ptx)
      .BindBlob(7, e.cubin)
      .Bind(8, EncodeLowered(e.lowered))
      .Bind(9, e.log)
      .Bind(10, static_cast<int64_t>(e.compile_us))
      .Bind(11, e.created_ms ? e.created_ms : now)
      .Bind(12, now)
      .Bind(13, static_cast<int64_t>(e.hits))
      .Bind(14, static_cast<int64_t>(e.Bytes()));
  GPUQ_RETURN_IF_ERROR(s.Run());
  GPUQ_RETURN_IF_ERROR(FlushLocked());
  uint64_t removed = 0;
  GPUQ_RETURN_IF_ERROR(EvictLocked(options_.max_bytes, &e.key, &removed));
  return tx.Commit();
}

Status KernelCache::EvictLocked(uint64_t max_bytes, const Digest* keep, uint64_t* removed) {
  GPUQ_ASSIGN_OR_RETURN(sql::Stmt total,
                        db_.Prepare("SELECT COALESCE(SUM(bytes), 0) FROM kernels"));
  GPUQ_ASSIGN_OR_RETURN(bool row, total.Step());
  int64_t bytes = row ? total.Int(0) : 0;
  if (bytes <= static_cast<int64_t>(max_bytes)) return Status::Ok();
  GPUQ_ASSIGN_OR_RETURN(sql::Stmt oldest,
                        db_.Prepare("SELECT key, bytes FROM kernels WHERE key != ?1 "
                                    "ORDER BY last_used_ms ASC"));
  GPUQ_ASSIGN_OR_RETURN(sql::Stmt del, db_.Prepare("DELETE FROM kernels WHERE key = ?1"));
  static const Digest kNone{};
  oldest.BindBlob(1, AsBytes(keep ? *keep : kNone));
  std::vector<std::pair<std::string, int64_t>> victims;
  for (;;) {
    GPUQ_ASSIGN_OR_RETURN(bool more, oldest.Step());
    if (!more || bytes <= static_cast<int64_t>(max_bytes)) break;
    victims.emplace_back(oldest.Blob(0), oldest.Int(1));
    bytes -= oldest.Int(1);
  }
  oldest.Reset();
  for (const auto& [k, b] : victims) {
    GPUQ_RETURN_IF_ERROR(del.Reset().BindBlob(1, k).Run());
  }
  *removed += victims.size();
  if (!victims.empty()) {
    GPUQ_RETURN_IF_ERROR(CountLocked("evictions", static_cast<int64_t>(victims.size())));
  }
  return Status::Ok();
}

StatusOr<KernelCache::Claim> KernelCache::TryClaim(const Digest& key,
                                                   std::chrono::milliseconds stale_after) {
  MutexLock lock(&mu_);
  sql::Transaction tx(&db_);
  GPUQ_RETURN_IF_ERROR(tx.Begin());
  GPUQ_ASSIGN_OR_RETURN(sql::Stmt present, db_.Prepare("SELECT 1 FROM kernels WHERE key = ?1"));
  GPUQ_ASSIGN_OR_RETURN(bool have, present.BindBlob(1, AsBytes(key)).Step());
  if (have) return Claim::kPresent;  // the transaction rolls back: nothing written
  GPUQ_ASSIGN_OR_RETURN(
      sql::Stmt owner, db_.Prepare("SELECT pid, host, started_ms FROM compiling WHERE key = ?1"));
  GPUQ_ASSIGN_OR_RETURN(bool busy, owner.BindBlob(1, AsBytes(key)).Step());
  const std::string host = Hostname();
  const int64_t now = NowMs();
  if (busy) {
    const bool same_host = owner.Text(1) == host;
    const bool fresh = now - owner.Int(2) < stale_after.count();
    const bool alive = !same_host || ProcessAlive(owner.Int(0));
    if (fresh && alive && !(same_host && owner.Int(0) == getpid())) return Claim::kBusy;
  }
  GPUQ_ASSIGN_OR_RETURN(
      sql::Stmt claim,
      db_.Prepare("INSERT OR REPLACE INTO compiling(key, pid, host, started_ms) "
                  "VALUES (?1, ?2, ?3, ?4)"));
  GPUQ_RETURN_IF_ERROR(claim.BindBlob(1, AsBytes(key))
                           .Bind(2, int64_t{getpid()})
                           .Bind(3, host)
                           .Bind(4, now)
                           .Run());
  GPUQ_RETURN_IF_ERROR(tx.Commit());
  return Claim::kOwned;
}

Status KernelCache::Release(const Digest& key) {
  MutexLock lock(&mu_);
  GPUQ_ASSIGN_OR_RETURN(sql::Stmt s, db_.Prepare("DELETE FROM compiling WHERE key = ?1"));
  return s.BindBlob(1, AsBytes(key)).Run();
}

StatusOr<CacheStats> KernelCache::Stats() {
  MutexLock lock(&mu_);
  if (!pending_hits_.empty() || pending_misses_) {
    sql::Transaction tx(&db_);
    GPUQ_RETURN_IF_ERROR(tx.Begin());
    GPUQ_RETURN_IF_ERROR(FlushLocked());
    GPUQ_RETURN_IF_ERROR(tx.Commit());
  }
  CacheStats st;
  st.max_bytes = options_.max_bytes;
  GPUQ_ASSIGN_OR_RETURN(
      sql::Stmt s, db_.Prepare("SELECT COUNT(*), COALESCE(SUM(ok = 0), 0), "
                               "COALESCE(SUM(bytes), 0) FROM kernels"));
  GPUQ_ASSIGN_OR_RETURN(bool row, s.Step());
  if (row) {
    st.entries = static_cast<uint64_t>(s.Int(0));
    st.failed_entries = static_cast<uint64_t>(s.Int(1));
    st.bytes = static_cast<uint64_t>(s.Int(2));
  }
  GPUQ_ASSIGN_OR_RETURN(sql::Stmt c, db_.Prepare("SELECT name, value FROM counters"));
  for (;;) {
    GPUQ_ASSIGN_OR_RETURN(bool more, c.Step());
    if (!more) break;
    const std::string name = c.Text(0);
    const auto v = static_cast<uint64_t>(c.Int(1));
    if (name == "hits") st.hits = v;
    if (name == "misses") st.misses = v;
    if (name == "evictions") st.evictions = v;
  }
  return st;
}

StatusOr<std::vector<CacheEntry>> KernelCache::List() {
  MutexLock lock(&mu_);
  GPUQ_ASSIGN_OR_RETURN(
      sql::Stmt s,
      db_.Prepare("SELECT key, arch, nvrtc_version, ok, code, lowered, compile_us, "
                  "created_ms, last_used_ms, hits, length(ptx), length(cubin), log "
                  "FROM kernels ORDER BY last_used_ms DESC"));
  std::vector<CacheEntry> out;
  for (;;) {
    GPUQ_ASSIGN_OR_RETURN(bool more, s.Step());
    if (!more) break;
    CacheEntry e;
    std::string k = s.Blob(0);
    if (k.size() == e.key.size()) std::copy(k.begin(), k.end(), e.key.begin());
    e.arch = s.Text(1);
    e.nvrtc_version = s.Text(2);
    e.ok = s.Int(3) != 0;
    e.code = CodeFromName(s.Text(4)).value_or(Code::kInternal);
    e.lowered = DecodeLowered(s.Text(5));
    e.compile_us = static_cast<uint64_t>(s.Int(6));
    e.created_ms = s.Int(7);
    e.last_used_ms = s.Int(8);
    e.hits = static_cast<uint64_t>(s.Int(9));
    // Sizes only: List() does not carry the blobs.
    e.ptx.assign(static_cast<size_t>(s.Int(10)), '\0');
    e.cubin.assign(static_cast<size_t>(s.Int(11)), '\0');
    e.log = s.Text(12);
    out.push_back(std::move(e));
  }
  return out;
}

StatusOr<uint64_t> KernelCache::Prune(uint64_t max_bytes,
                                      std::optional<int64_t> unused_before_ms,
                                      bool failed_only) {
  MutexLock lock(&mu_);
  sql::Transaction tx(&db_);
  GPUQ_RETURN_IF_ERROR(tx.Begin());
  uint64_t removed = 0;
  if (failed_only) {
    GPUQ_RETURN_IF_ERROR(db_.Exec("DELETE FROM kernels WHERE ok = 0"));
    removed += static_cast<uint64_t>(db_.Changes());
  }
  if (unused_before_ms) {
    GPUQ_ASSIGN_OR_RETURN(sql::Stmt s,
                          db_.Prepare("DELETE FROM kernels WHERE last_used_ms < ?1"));
    GPUQ_RETURN_IF_ERROR(s.Bind(1, *unused_before_ms).Run());
    removed += static_cast<uint64_t>(db_.Changes());
  }
  GPUQ_RETURN_IF_ERROR(EvictLocked(max_bytes, nullptr, &removed));
  GPUQ_RETURN_IF_ERROR(tx.Commit());
  return removed;
}

}  // namespace gpuq::compile
