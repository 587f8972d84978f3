// The kernel cache: compiled kernels in one SQLite file (schema of
// schema/kernel_cache.sql), shared safely by several processes.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "broker/compile/compile_request.h"
#include "util/mutex.h"
#include "util/sha256.h"
#include "util/sqlite.h"
#include "util/thread_annotations.h"

namespace gpuq::compile {

struct CacheEntry {
  Digest key{};
  std::string arch;
  std::string nvrtc_version;
  bool ok = false;
  Code code = Code::kOk;  // kOk, kCompileError or kSandboxViolation
  std::string ptx, cubin, log;
  std::vector<LoweredName> lowered;
  uint64_t compile_us = 0;
  int64_t created_ms = 0, last_used_ms = 0;
  uint64_t hits = 0;

  uint64_t Bytes() const { return ptx.size() + cubin.size() + log.size(); }
  // The symbol to launch for `entry`: its lowered name when it was compiled as
  // a name expression, else `entry` itself (an extern "C" name).
  std::string Symbol(const std::string& entry) const;
  // True when the PTX defines a kernel named `symbol`.
  bool HasKernel(const std::string& symbol) const;
};

struct CacheStats {
  uint64_t entries = 0, failed_entries = 0, bytes = 0, max_bytes = 0;
  uint64_t hits = 0, misses = 0, evictions = 0;  // over the file's life
};

struct CacheOptions {
  uint64_t max_bytes = 1ull << 30;  // LRU eviction above this
  // A hit writes its entry's last_used (and the pending hit and miss counts)
  // only when last_used is older than this; other counts are flushed with
  // the next write, by Stats(), and when the cache is closed.
  std::chrono::milliseconds touch_interval{30000};
  // Open() runs PRAGMA quick_check, which reads the whole file (about 0.6 s
  // for 800 MB from the page cache), to find damage in the middle of it too.
  // Without it Open() still finds a file that is not SQLite, a truncated one
  // and tables of another shape.
  bool verify_on_open = true;
};

// Thread-safe (one connection behind a mutex). Several processes may open the
// same file: SQLite's locking and BEGIN IMMEDIATE transactions keep it
// consistent, and the `compiling` table keeps two processes from compiling
// one key at once.
class KernelCache {
 public:
  // Opens the cache at `path`, creating it when missing. A file there that is
  // not a sound kernel cache (not SQLite, truncated, failing quick_check,
  // tables of another shape) is only a cache: it is moved aside to
  // PATH.damaged-<Unix seconds> (with its -wal and -shm) and a fresh cache is
  // started in its place; set_aside() then says so. Errors: kIoError when
  // the file cannot be opened, created or moved; kInvalid for a sound cache
  // of another format (another gpuq version's): its entries are left as they
  // are, though the schema script, run first, adds the tables and rows of
  // this format that it lacks (IF NOT EXISTS, OR IGNORE).
  static StatusOr<std::unique_ptr<KernelCache>> Open(const std::string& path,
                                                    CacheOptions options = {});
  ~KernelCache();

  // When Open() moved a damaged file aside: what was wrong with it and where
  // it went, one line for the owner's log. Empty otherwise.
  const std::string& set_aside() const { return set_aside_; }

  // nullopt on a miss. Counts a hit or a miss; a hit refreshes last_used.
  StatusOr<std::optional<CacheEntry>> Lookup(const Digest& key) LOCKS_EXCLUDED(mu_);
  // Refreshes last_used and adds `hits` for an entry served from memory.
  Status Touch(const Digest& key, uint64_t hits) LOCKS_EXCLUDED(mu_);
  // Inserts or replaces `entry`, then evicts least recently used entries
  // (never this one) until the file's entries fit in max_bytes.
  Status Insert(const CacheEntry& entry) LOCKS_EXCLUDED(mu_);

  enum class Claim { kOwned, kBusy, kPresent };
  // kOwned: the caller must compile the key and then Release() it. kBusy:
  // another live process is compiling it. kPresent: it is in the cache.
  // A claim older than `stale_after`, or whose owner process is gone, is
  // taken over.
  StatusOr<Claim> TryClaim(const Digest& key, std::chrono::milliseconds stale_after) LOCKS_EXCLUDED(mu_);
  Status Release(const Digest& key) LOCKS_EXCLUDED(mu_);

  StatusOr<CacheStats> Stats() LOCKS_EXCLUDED(mu_);
  // Every entry's metadata, most recently used first (blobs left empty).
  StatusOr<std::vector<CacheEntry>> List() LOCKS_EXCLUDED(mu_);
  // Removes failed entries when `failed_only`, and entries unused since
  // `unused_before_ms` when it is set (either, both or neither), then the
  // least recently used until the rest fit in `max_bytes`. Returns how many
  // were removed.
  StatusOr<uint64_t> Prune(uint64_t max_bytes, std::optional<int64_t> unused_before_ms,
                           bool failed_only) LOCKS_EXCLUDED(mu_);

  const std::string& path() const { return path_; }
  uint64_t max_bytes() const { return options_.max_bytes; }

 private:
  KernelCache(std::string path, CacheOptions options, sql::Db db)
      : path_(std::move(path)), options_(options), db_(std::move(db)) {}
  // Open() once the file at `path` is sound or absent.
  static StatusOr<std::unique_ptr<KernelCache>> OpenSound(const std::string& path,
                                                          const CacheOptions& options);
  Status EvictLocked(uint64_t max_bytes, const Digest* keep, uint64_t* removed)
      EXCLUSIVE_LOCKS_REQUIRED(mu_);
  Status CountLocked(const char* counter, int64_t delta) EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Writes pending hit and miss counts; call inside a write transaction.
  Status FlushLocked() EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A prepared statement kept for the life of the connection.
  StatusOr<sql::Stmt*> Cached(const char* sql) EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string path_;
  const CacheOptions options_;
  std::string set_aside_;
  Mutex mu_;
  sql::Db db_ GUARDED_BY(mu_);
  sql::StatementCache statements_ GUARDED_BY(mu_);
  std::map<Digest, uint64_t> pending_hits_ GUARDED_BY(mu_);
  uint64_t pending_misses_ GUARDED_BY(mu_) = 0;
};

int64_t NowMs();

}  // namespace gpuq::compile
