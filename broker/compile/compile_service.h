// The compile service: turns kernel source into CUBIN and PTX for one
// architecture, at most once per cache key across every process sharing the
// cache file. Lookup order: memory (hot entries) -> SQLite -> a sandboxed
// NVRTC compile.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <future>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <semaphore>
#include <string>
#include <unordered_map>

#include "broker/compile/compile_request.h"
#include "broker/compile/kernel_cache.h"
#include "broker/compile/sandboxed_compiler.h"
#include "util/sha256.h"

namespace gpuq::compile {

struct CompileServiceOptions {
  std::string cache_path;  // the SQLite file; created when missing
  CacheOptions cache;
  size_t memory_entries = 1024;        // hot entries kept in memory
  uint64_t memory_bytes = 256u << 20;
  SandboxLimits limits;
  size_t max_concurrent = 0;           // compiles at once; 0 = one per core
  // Helpers enter a user and mount namespace that shows them only the
  // toolkit's headers where the kernel allows it; false: Landlock alone.
  bool namespaces = true;
  std::string helper_path, cuda_include;  // empty: defaults
  // An entry served from memory refreshes its SQLite last_used at most this
  // often, so that LRU eviction in the file sees it as used.
  std::chrono::milliseconds touch_interval{30000};
};

enum class CacheSource { kMemory, kDisk, kCompiled, kPeer };
std::string_view CacheSourceName(CacheSource s);

struct CompileInfo {
  Digest key{};
  CacheSource source = CacheSource::kCompiled;
  uint64_t wall_us = 0;  // time spent in Compile()
  bool cache_hit() const { return source != CacheSource::kCompiled; }
};

using EntryPtr = std::shared_ptr<const CacheEntry>;

class CompileService {
 public:
  static StatusOr<std::unique_ptr<CompileService>> Create(CompileServiceOptions options);

  // Whether this toolkit's NVRTC can compile for `arch` (see
  // compile::CanTarget). Thread-safe, cheap.
  static bool CanTarget(const std::string& arch) { return compile::CanTarget(arch); }

  // The cache key of a request (SHA-256; see schema/PROTOCOL.md).
  Digest KeyFor(const CompileRequest& request) const;

  // Thread-safe. Returns the cache entry for the request: ok, or rejected by
  // NVRTC with its log (a rejection is cached). Errors: kInvalid for a bad
  // request (nothing compiled), kTimeout / kResourceExhausted for a compile
  // that ran over its bounds (not cached), kIoError for the cache file.
  // Concurrent calls for one key compile it once; a caller waits for the
  // compile of the same key in this or another process.
  StatusOr<EntryPtr> Compile(const CompileRequest& request, CompileInfo* info = nullptr);

  // The entry if it is in memory, without waiting, compiling or touching
  // SQLite (counts as a memory hit); null otherwise.
  EntryPtr Peek(const Digest& key) { return MemoryGet(key); }

  struct Stats {
    uint64_t memory_hits = 0, disk_hits = 0, peer_hits = 0, compiles = 0;
    uint64_t rejected = 0;  // compiles that NVRTC rejected
    uint64_t errors = 0;    // timeouts, memory exhaustion, I/O
    uint64_t memory_entries = 0, memory_bytes = 0;
  };
  Stats stats() const;
  KernelCache& cache() { return *cache_; }
  const std::string& nvrtc_version() const { return nvrtc_version_; }
  const CompileServiceOptions& options() const { return options_; }

 private:
  CompileService(CompileServiceOptions options, std::unique_ptr<KernelCache> cache,
                 std::string nvrtc_version);
  Status Validate(const CompileRequest& request) const;
  StatusOr<EntryPtr> Resolve(const CompileRequest& request, const Digest& key,
                             CacheSource* source);
  StatusOr<EntryPtr> CompileNow(const CompileRequest& request, const Digest& key);
  EntryPtr MemoryGet(const Digest& key);
  void MemoryPut(const EntryPtr& entry);

  struct DigestHash {
    size_t operator()(const Digest& d) const {
      size_t h;
      static_assert(sizeof h <= sizeof(Digest));
      std::memcpy(&h, d.data(), sizeof h);
      return h;
    }
  };
  struct Hot {
    EntryPtr entry;
    std::chrono::steady_clock::time_point last_touch;
    uint64_t untouched_hits = 0;
    std::list<Digest>::iterator lru;
  };

  const CompileServiceOptions options_;
  std::unique_ptr<KernelCache> cache_;
  const std::string nvrtc_version_;
  const SandboxedCompiler compiler_;
  std::counting_semaphore<> slots_;

  mutable std::mutex mu_;
  std::unordered_map<Digest, Hot, DigestHash> hot_;  // GUARDED_BY(mu_)
  std::list<Digest> lru_;                            // GUARDED_BY(mu_), most recent first
  uint64_t hot_bytes_ = 0;                           // GUARDED_BY(mu_)
  std::map<Digest, std::shared_future<StatusOr<EntryPtr>>> inflight_;  // GUARDED_BY(mu_)
  Stats stats_;                                      // GUARDED_BY(mu_)
};

}  // namespace gpuq::compile
