#include "broker/compile/compile_service.h"

#include <nvrtc.h>

#include <algorithm>
#include <cstring>
#include <thread>

namespace gpuq::compile {
namespace {

// Bumped whenever the same request may compile differently (2: CCCL on the
// include path), so that outcomes cached before are not served after.
constexpr std::string_view kCacheFormat = "gpuq-kernel-cache/2";

uint64_t MicrosSince(std::chrono::steady_clock::time_point t0) {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(
                                   std::chrono::steady_clock::now() - t0)
                                   .count());
}

std::string NvrtcVersion() {
  int major = 0, minor = 0;
  if (nvrtcVersion(&major, &minor) != NVRTC_SUCCESS) return "unknown";
  return std::to_string(major) + "." + std::to_string(minor);
}

bool HasByte(const std::string& s, std::string_view bytes) {
  return s.find_first_of(bytes.data(), 0, bytes.size()) != std::string::npos;
}

}  // namespace

std::string_view CacheSourceName(CacheSource s) {
  switch (s) {
    case CacheSource::kMemory:
      return "memory";
    case CacheSource::kDisk:
      return "disk";
    case CacheSource::kPeer:
      return "peer";
    case CacheSource::kCompiled:
      break;
  }
  return "compiled";
}

StatusOr<std::unique_ptr<CompileService>> CompileService::Create(
    CompileServiceOptions options) {
  if (options.cache_path.empty()) return Error(Code::kInvalid, "no kernel cache path");
  GPUQ_ASSIGN_OR_RETURN(auto cache, KernelCache::Open(options.cache_path, options.cache));
  if (options.max_concurrent == 0) {
    options.max_concurrent = std::max(1u, std::thread::hardware_concurrency());
  }
  return std::unique_ptr<CompileService>(
      new CompileService(std::move(options), std::move(cache), NvrtcVersion()));
}

CompileService::CompileService(CompileServiceOptions options,
                               std::unique_ptr<KernelCache> cache, std::string nvrtc_version)
    : options_(std::move(options)),
      cache_(std::move(cache)),
      nvrtc_version_(std::move(nvrtc_version)),
      compiler_(SandboxOptions{options_.helper_path, options_.cuda_include, options_.limits,
                               options_.namespaces}),
      slots_(static_cast<std::ptrdiff_t>(options_.max_concurrent)) {}

Digest CompileService::KeyFor(const CompileRequest& r) const {
  Sha256 h;
  h.UpdateField(kCacheFormat);
  h.UpdateField(nvrtc_version_);
  h.UpdateField(r.arch);
  h.UpdateField(r.source_name);
  h.UpdateField(r.source);
  h.UpdateField(std::to_string(r.headers.size()));
  for (const auto& hd : r.headers) {
    h.UpdateField(hd.name);
    h.UpdateField(hd.content);
  }
  h.UpdateField(std::to_string(r.options.size()));
  for (const auto& o : r.options) h.UpdateField(o);
  h.UpdateField(std::to_string(r.name_expressions.size()));
  for (const auto& e : r.name_expressions) h.UpdateField(e);
  return h.Finish();
}

Status CompileService::Validate(const CompileRequest& r) const {
  GPUQ_RETURN_IF_ERROR(ValidateArch(r.arch));
  if (!CanTarget(r.arch)) {
    const auto& archs = SupportedArchs();
    return Error(Code::kInvalid,
                 "NVRTC " + nvrtc_version_ + " cannot compile for " + r.arch +
                     (archs.empty() ? std::string()
                                    : " (it targets " + std::to_string(archs.front()) +
                                          " to " + std::to_string(archs.back()) + ")"));
  }
  GPUQ_RETURN_IF_ERROR(ValidateOptions(r.options));
  const std::string_view kNul("\0", 1);
  // NVRTC takes C strings: an embedded NUL would compile less than was hashed.
  if (r.source.empty()) return Error(Code::kInvalid, "kernel source is empty");
  if (HasByte(r.source, kNul)) return Error(Code::kInvalid, "kernel source contains a NUL byte");
  if (r.source_name.empty() || HasByte(r.source_name, std::string_view("\0\"\n", 3))) {
    return Error(Code::kInvalid, "bad source name");
  }
  for (const auto& h : r.headers) {
    if (h.name.empty() || HasByte(h.name, std::string_view("\0\n", 2)) ||
        HasByte(h.content, kNul)) {
      return Error(Code::kInvalid, "header '" + h.name.substr(0, 64) +
                                       "' has an empty or bad name, or a NUL byte");
    }
  }
  for (const auto& e : r.name_expressions) {
    if (e.empty() || HasByte(e, std::string_view("\0\t\n", 3))) {
      return Error(Code::kInvalid, "bad name expression '" + e.substr(0, 64) + "'");
    }
  }
  return Status::Ok();
}

EntryPtr CompileService::MemoryGet(const Digest& key) {
  Digest touch_key{};
  uint64_t touch_hits = 0;
  EntryPtr entry;
  {
    std::lock_guard lock(mu_);
    auto it = hot_.find(key);
    if (it == hot_.end()) return nullptr;
    Hot& h = it->second;
    lru_.splice(lru_.begin(), lru_, h.lru);
    ++h.untouched_hits;
    ++stats_.memory_hits;
    entry = h.entry;
    auto now = std::chrono::steady_clock::now();
    if (now - h.last_touch >= options_.touch_interval) {
      h.last_touch = now;
      touch_key = key;
      touch_hits = std::exchange(h.untouched_hits, 0);
    }
  }
  // Best effort: a failed touch only makes eviction a little less accurate.
  if (touch_hits) (void)cache_->Touch(touch_key, touch_hits);
  return entry;
}

void CompileService::MemoryPut(const EntryPtr& entry) {
  std::lock_guard lock(mu_);
  if (hot_.count(entry->key)) return;
  if (entry->Bytes() > options_.memory_bytes) return;
  lru_.push_front(entry->key);
  hot_[entry->key] = Hot{entry, std::chrono::steady_clock::now(), 0, lru_.begin()};
  hot_bytes_ += entry->Bytes();
  while (!lru_.empty() &&
         (hot_.size() > options_.memory_entries || hot_bytes_ > options_.memory_bytes)) {
    auto victim = hot_.find(lru_.back());
    hot_bytes_ -= victim->second.entry->Bytes();
    hot_.erase(victim);
    lru_.pop_back();
  }
}

StatusOr<EntryPtr> CompileService::Compile(const CompileRequest& request, CompileInfo* info) {
  const auto t0 = std::chrono::steady_clock::now();
  GPUQ_RETURN_IF_ERROR(Validate(request));
  const Digest key = KeyFor(request);
  CacheSource source = CacheSource::kMemory;
  EntryPtr entry = MemoryGet(key);
  if (!entry) {
    // One caller per key resolves it; the others share its result.
    std::shared_future<StatusOr<EntryPtr>> flight;
    std::promise<StatusOr<EntryPtr>> promise;
    bool leader = false;
    {
      std::lock_guard lock(mu_);
      auto it = inflight_.find(key);
      if (it != inflight_.end()) {
        flight = it->second;
      } else {
        flight = promise.get_future().share();
        inflight_.emplace(key, flight);
        leader = true;
      }
    }
    if (leader) {
      StatusOr<EntryPtr> r = Resolve(request, key, &source);
      if (r.ok()) MemoryPut(*r);
      promise.set_value(r);
      std::lock_guard lock(mu_);
      inflight_.erase(key);
    } else {
      source = CacheSource::kPeer;
    }
    StatusOr<EntryPtr> r = flight.get();
    if (!r.ok()) return r.status();
    entry = *r;
  }
  if (info) {
    info->key = key;
    info->source = source;
    info->wall_us = MicrosSince(t0);
  }
  return entry;
}

StatusOr<EntryPtr> CompileService::Resolve(const CompileRequest& request, const Digest& key,
                                           CacheSource* source) {
  // Other processes may be compiling the same key: wait for their result
  // rather than compile it a second time, up to a little over the wall
  // limit (after which their claim is stale and is taken over).
  const auto stale = options_.limits.wall + std::chrono::seconds(5);
  const auto give_up = std::chrono::steady_clock::now() + stale;
  auto nap = std::chrono::milliseconds(5);
  for (bool waited = false;; waited = true) {
    GPUQ_ASSIGN_OR_RETURN(std::optional<CacheEntry> hit, cache_->Lookup(key));
    if (hit) {
      *source = waited ? CacheSource::kPeer : CacheSource::kDisk;
      std::lock_guard lock(mu_);
      ++(waited ? stats_.peer_hits : stats_.disk_hits);
      return std::make_shared<const CacheEntry>(std::move(*hit));
    }
    GPUQ_ASSIGN_OR_RETURN(KernelCache::Claim claim, cache_->TryClaim(key, stale));
    if (claim == KernelCache::Claim::kOwned) break;
    if (claim == KernelCache::Claim::kBusy) {
      if (std::chrono::steady_clock::now() > give_up) break;
      std::this_thread::sleep_for(nap);
      nap = std::min(nap * 2, std::chrono::milliseconds(100));
    }
  }
  *source = CacheSource::kCompiled;
  StatusOr<EntryPtr> r = CompileNow(request, key);
  Status released = cache_->Release(key);
  if (r.ok() && !released.ok()) return released;
  return r;
}

StatusOr<EntryPtr> CompileService::CompileNow(const CompileRequest& request, const Digest& key) {
  const auto t0 = std::chrono::steady_clock::now();
  slots_.acquire();
  StatusOr<CompileOutput> out = compiler_.Compile(request);
  slots_.release();
  if (!out.ok()) {
    std::lock_guard lock(mu_);
    ++stats_.errors;
    return out.status();
  }
  auto e = std::make_shared<CacheEntry>();
  e->key = key;
  e->arch = request.arch;
  e->nvrtc_version = nvrtc_version_;
  e->ok = out->ok;
  e->code = out->ok ? Code::kOk : out->code;
  e->ptx = std::move(out->ptx);
  e->cubin = std::move(out->cubin);
  e->log = std::move(out->log);
  e->lowered = std::move(out->lowered);
  e->compile_us = MicrosSince(t0);
  e->created_ms = e->last_used_ms = NowMs();
  Status stored = cache_->Insert(*e);
  {
    std::lock_guard lock(mu_);
    ++stats_.compiles;
    if (!e->ok) ++stats_.rejected;
    if (!stored.ok()) ++stats_.errors;
  }
  if (!stored.ok()) return stored;
  return EntryPtr(std::move(e));
}

CompileService::Stats CompileService::stats() const {
  std::lock_guard lock(mu_);
  Stats s = stats_;
  s.memory_entries = hot_.size();
  s.memory_bytes = hot_bytes_;
  return s;
}

}  // namespace gpuq::compile
