// The compile service: turns kernel source into CUBIN and PTX for one
// architecture, at most once per cache key across every process sharing the
// cache file. Lookup order: memory (hot entries) -> SQLite -> a sandboxed
// NVRTC compile in a warm helper process.
//
// The service owns its threads: a dispatch thread (answers known without a
// compile, SQLite lookups, deferred SQLite touches) and max_concurrent
// compile threads, which take queued compiles from per-tenant FIFO queues in
// round robin, so that one tenant's compile bombs wait behind its own work,
// not behind nobody's. It dedupes compiles of one key in flight and keeps hot
// entries, and, for a while, compiles stopped at their bounds, in memory.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "broker/compile/compile_request.h"
#include "broker/compile/helper_pool.h"
#include "broker/compile/kernel_cache.h"
#include "broker/compile/sandboxed_compiler.h"
#include "broker/compile/unique_fd.h"
#include "util/mutex.h"
#include "util/sha256.h"
#include "util/thread_annotations.h"

namespace gpuq::compile {

struct CompileServiceOptions {
  std::string cache_path;  // the SQLite file; created when missing, replaced when damaged
  CacheOptions cache;
  size_t memory_entries = 1024;        // hot entries kept in memory
  uint64_t memory_bytes = 256u << 20;
  SandboxLimits limits;
  size_t max_concurrent = 0;           // compiles at once (compile threads); 0 = one per core
  // Helpers kept started, warmed up and confined, waiting for a request;
  // unset: max_concurrent. 0: each compile starts its own helper (and pays
  // NVRTC's first-use cost). Each waiting helper holds a process with NVRTC
  // loaded.
  std::optional<size_t> warm_helpers;
  // Helpers enter a user and mount namespace that shows them only the
  // toolkit's headers where the kernel allows it; false: Landlock alone.
  bool namespaces = true;
  std::string helper_path, cuda_include;  // empty: defaults
  // An entry served from memory refreshes its SQLite last_used at most this
  // often, so that LRU eviction in the file sees it as used.
  std::chrono::milliseconds touch_interval{30000};
  // A compile stopped at its time or memory bound (kTimeout,
  // kResourceExhausted) is answered from memory with the same code for this
  // long, instead of being run again; it is never stored in SQLite.
  std::chrono::milliseconds negative_ttl{60000};
  // The clock negative_ttl is measured by; empty: steady_clock. A seam for
  // tests. Called with the service's lock held: it must be cheap and must
  // not call the service.
  std::function<std::chrono::steady_clock::time_point()> clock;
};

enum class CacheSource { kMemory, kDisk, kCompiled, kPeer };
std::string_view CacheSourceName(CacheSource s);

struct CompileInfo {
  Digest key{};
  CacheSource source = CacheSource::kCompiled;
  uint64_t wall_us = 0;  // from Submit() or Compile() to the answer
  bool cache_hit() const { return source != CacheSource::kCompiled; }
};

using EntryPtr = std::shared_ptr<const CacheEntry>;

class CompileService {
 public:
  // Called once per Submit() with the request's key, its result and how it
  // was found. See Submit().
  using Callback =
      std::function<void(const Digest& key, StatusOr<EntryPtr> result, const CompileInfo& info)>;

  // Opens (or creates, or replaces when damaged: see KernelCache::Open) the
  // cache and starts the service's threads and warm helpers.
  static StatusOr<std::unique_ptr<CompileService>> Create(CompileServiceOptions options);
  // Stops: tells the threads to exit and joins them. A compile under way is
  // stopped (its helper killed); every callback not yet called is called
  // with kUnavailable "compile service stopping". Must not be called from a
  // callback.
  ~CompileService();
  CompileService(const CompileService&) = delete;
  CompileService& operator=(const CompileService&) = delete;

  // Whether this toolkit's NVRTC can compile for `arch` (see
  // compile::CanTarget). Thread-safe, cheap.
  static bool CanTarget(const std::string& arch) { return compile::CanTarget(arch); }

  // The cache key of a request (SHA-256; see schema/PROTOCOL.md).
  Digest KeyFor(const CompileRequest& request) const;

  // Asynchronous compile. Thread-safe and non-blocking (it validates and
  // hashes the request, and looks in memory; it never touches SQLite or
  // waits for a compile), so an event loop may call it. `done` is called
  // exactly once, on one of the service's threads, never inside Submit()
  // itself (callers may hold their own locks across Submit()). It must not
  // block for long (it holds up the thread that serves other answers) and
  // must not call Compile() or destroy the service; it may call Submit().
  // The result is that of Compile(). `tenant` names whose compile this is:
  // compiles wait in per-tenant FIFO queues served round robin; a request
  // whose key is being compiled already waits for that compile, whoever
  // asked for it.
  void Submit(CompileRequest request, std::string tenant, Callback done) LOCKS_EXCLUDED(mu_);

  // Synchronous compile (for `gpuq compile` and tests): Submit() as the
  // tenant "" and wait. Thread-safe; must not be called from a Submit()
  // callback. Returns the cache entry for the request: ok, or rejected by
  // NVRTC with its log (a rejection is cached). Errors: kInvalid for a bad
  // request (nothing compiled), kTimeout / kResourceExhausted for a compile
  // that ran over its bounds (not stored in SQLite; remembered in memory for
  // negative_ttl), kIoError for the cache file, kUnavailable when the helper
  // cannot run or the service is stopping. Concurrent calls for one key
  // compile it once; a caller waits for the compile of the same key in this
  // or another process.
  StatusOr<EntryPtr> Compile(const CompileRequest& request, CompileInfo* info = nullptr)
      LOCKS_EXCLUDED(mu_);

  // The entry if it is in memory, without waiting, compiling or touching
  // SQLite (counts as a memory hit); null otherwise. Thread-safe,
  // non-blocking.
  EntryPtr Peek(const Digest& key) LOCKS_EXCLUDED(mu_);

  // Blocks until the warm helpers are started, warmed up and confined, or
  // `timeout` passes; returns whether they are. For benchmarks and tests.
  bool WaitForWarmHelpers(std::chrono::milliseconds timeout) {
    return helpers_->WaitUntilWarm(timeout);
  }
  HelperPool& helpers() { return *helpers_; }

  struct Stats {
    uint64_t memory_hits = 0, disk_hits = 0, peer_hits = 0, compiles = 0;
    uint64_t rejected = 0;       // compiles that NVRTC rejected
    uint64_t errors = 0;         // timeouts, memory exhaustion, I/O
    uint64_t negative_hits = 0;  // answered from the memory of a stopped compile
    uint64_t memory_entries = 0, memory_bytes = 0;
    uint64_t queued = 0;  // compiles waiting for a compile thread
    // Where compiles' time went, summed over `compiles`: waiting for a
    // helper, the helper's round trip (request written to reply read),
    // within that NVRTC's own compile, and storing the entry.
    uint64_t take_us = 0, helper_us = 0, nvrtc_us = 0, insert_us = 0;
  };
  Stats stats() const LOCKS_EXCLUDED(mu_);
  KernelCache& cache() { return *cache_; }
  const std::string& nvrtc_version() const { return nvrtc_version_; }
  const CompileServiceOptions& options() const { return options_; }

 private:
  struct Waiter {
    Callback done;
    std::chrono::steady_clock::time_point t0;
  };
  // One key being resolved: looked up in SQLite, then compiled. waiters[0]
  // started it; the others joined it.
  struct Flight {
    Digest key{};
    CompileRequest request;
    std::string tenant;
    std::vector<Waiter> waiters;
    // Every tenant that waits for it, the first's first. Queued for a
    // compile, it waits in each one's queue and goes at the first turn of
    // any of them: a tenant that asks for what another's flight will build
    // waits its own turn, never behind that tenant's whole queue.
    std::vector<std::string> tenants;
    bool queued = false;  // in the compile queues (of each of `tenants`)
    bool taken = false;   // taken from them: its copies left there are skipped
  };
  using FlightPtr = std::shared_ptr<Flight>;
  // A callback ready to run, with its arguments.
  struct Answer {
    Waiter waiter;
    Digest key{};
    StatusOr<EntryPtr> result = Status(Code::kInternal, "unanswered");
    CacheSource source = CacheSource::kCompiled;
  };
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
  struct Stopped {  // a compile stopped at its bounds, remembered
    Status status;
    std::chrono::steady_clock::time_point until;
  };

  CompileService(CompileServiceOptions options, std::unique_ptr<KernelCache> cache,
                 std::string nvrtc_version);
  Status Validate(const CompileRequest& request) const;
  std::chrono::steady_clock::time_point Now() const;

  // What is known without SQLite or a compile: a hot entry, or a remembered
  // stopped compile. Fills `source`. Null result when nothing is known.
  std::optional<StatusOr<EntryPtr>> KnownLocked(const Digest& key)
      EXCLUSIVE_LOCKS_REQUIRED(mu_);
  EntryPtr MemoryGetLocked(const Digest& key) EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void MemoryPutLocked(const EntryPtr& entry) EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Enqueue(Digest key, CompileRequest request, std::string tenant, Waiter waiter)
      LOCKS_EXCLUDED(mu_);
  void AnswerLocked(Waiter waiter, const Digest& key, StatusOr<EntryPtr> result,
                    CacheSource source) EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Ends a flight: caches the outcome in memory, and returns the answers to
  // run (outside the lock) for its waiters.
  std::vector<Answer> FinishLocked(const FlightPtr& flight, StatusOr<EntryPtr> result,
                                   CacheSource source) EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void QueueForCompileLocked(const FlightPtr& flight) EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void QueueForTenantLocked(const FlightPtr& flight, const std::string& tenant)
      EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The next flight to compile, by round robin over the tenants, or null
  // where every flight queued was taken already.
  FlightPtr NextForCompileLocked() EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static void Run(std::vector<Answer> answers);

  void DispatchLoop() LOCKS_EXCLUDED(mu_);
  void CompileLoop() LOCKS_EXCLUDED(mu_);
  StatusOr<EntryPtr> Resolve(const Flight& flight, CacheSource* source) LOCKS_EXCLUDED(mu_);
  StatusOr<EntryPtr> CompileNow(const CompileRequest& request, const Digest& key)
      LOCKS_EXCLUDED(mu_);

  const CompileServiceOptions options_;
  std::unique_ptr<KernelCache> cache_;
  const std::string nvrtc_version_;
  // NVRTC's version, its library's file and the toolkit's headers: part of
  // every key (KeyFor).
  const std::string toolchain_;
  const SandboxedCompiler compiler_;
  std::unique_ptr<HelperPool> helpers_;  // uses compiler_
  // Readable once the service stops: cancels compiles under way and waits
  // for other processes' compiles.
  UniqueFd stop_read_, stop_write_;

  mutable Mutex mu_;
  CondVar compile_wanted_{&mu_};   // a flight queued for compile, or stopping
  CondVar dispatch_wanted_{&mu_};  // an answer, lookup or touch to do, or stopping
  bool stopping_ GUARDED_BY(mu_) = false;           // compile threads exit
  bool dispatch_stopping_ GUARDED_BY(mu_) = false;  // then the dispatch thread drains
  std::unordered_map<Digest, FlightPtr, DigestHash> inflight_ GUARDED_BY(mu_);
  std::deque<FlightPtr> lookups_ GUARDED_BY(mu_);  // new flights, for SQLite
  std::deque<Answer> answers_ GUARDED_BY(mu_);
  std::map<Digest, uint64_t> touches_ GUARDED_BY(mu_);  // memory hits to write to SQLite
  // Flights waiting for a compile thread, per tenant, and the tenants with
  // any, next to be served first. Invariant: a tenant is in turns_ exactly
  // when its queue is in queues_, and then the queue is not empty.
  std::map<std::string, std::deque<FlightPtr>> queues_ GUARDED_BY(mu_);
  std::deque<std::string> turns_ GUARDED_BY(mu_);
  std::unordered_map<Digest, Stopped, DigestHash> stopped_ GUARDED_BY(mu_);
  std::unordered_map<Digest, Hot, DigestHash> hot_ GUARDED_BY(mu_);
  std::list<Digest> lru_ GUARDED_BY(mu_);  // most recent first
  uint64_t hot_bytes_ GUARDED_BY(mu_) = 0;
  Stats stats_ GUARDED_BY(mu_);

  std::thread dispatch_thread_;
  std::vector<std::thread> compile_threads_;
};

}  // namespace gpuq::compile
