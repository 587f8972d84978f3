#include "broker/compile/compile_service.h"

#include <dlfcn.h>
#include <sys/stat.h>

#include <fcntl.h>
#include <nvrtc.h>
#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <set>
#include <cstring>
#include <future>
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

// What a compile's output depends on beyond its request: NVRTC's version,
// and which NVRTC and which toolkit headers, each by its real path and what
// its file system says of it (a patch release keeps the major.minor version
// and, as Debian installs it, the library's path: its size and time change,
// and the include directory's time with the headers replaced in it).
std::string Identity(const std::string& path) {
  std::error_code ec;
  const auto real = std::filesystem::canonical(path, ec);
  const std::string name = ec ? path : real.string();
  struct stat st {};
  if (stat(name.c_str(), &st) != 0) return name;
  return name + " " + std::to_string(st.st_size) + " " + std::to_string(st.st_mtim.tv_sec) + "." +
         std::to_string(st.st_mtim.tv_nsec);
}

std::string Toolchain(const std::string& version, const std::string& cuda_include) {
  Dl_info info{};
  const bool found = dladdr(reinterpret_cast<void*>(&nvrtcVersion), &info) && info.dli_fname;
  return version + "\n" + (found ? Identity(info.dli_fname) : "unknown") + "\n" +
         Identity(cuda_include.empty() ? DefaultCudaInclude() : cuda_include);
}

bool HasByte(const std::string& s, std::string_view bytes) {
  return s.find_first_of(bytes.data(), 0, bytes.size()) != std::string::npos;
}

Status Stopping() { return Error(Code::kUnavailable, "compile service stopping"); }

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
      toolchain_(Toolchain(nvrtc_version_, options_.cuda_include)),
      compiler_(SandboxOptions{options_.helper_path, options_.cuda_include, options_.limits,
                               options_.namespaces}) {
  int fds[2];
  // Without the pipe a stop waits for compiles under way instead of
  // cancelling them; nothing else depends on it.
  if (pipe2(fds, O_CLOEXEC) == 0) {
    stop_read_ = UniqueFd(fds[0]);
    stop_write_ = UniqueFd(fds[1]);
  }
  helpers_ = std::make_unique<HelperPool>(
      &compiler_, options_.warm_helpers.value_or(options_.max_concurrent));
  dispatch_thread_ = std::thread([this] { DispatchLoop(); });
  for (size_t i = 0; i < options_.max_concurrent; ++i) {
    compile_threads_.emplace_back([this] { CompileLoop(); });
  }
}

CompileService::~CompileService() {
  {
    MutexLock lock(&mu_);
    stopping_ = true;
    compile_wanted_.SignalAll();
  }
  if (stop_write_) {
    const char byte = 1;
    (void)!write(stop_write_.get(), &byte, 1);
  }
  for (auto& t : compile_threads_) t.join();
  {
    MutexLock lock(&mu_);
    dispatch_stopping_ = true;
    dispatch_wanted_.SignalAll();
  }
  dispatch_thread_.join();
  helpers_.reset();
}

std::chrono::steady_clock::time_point CompileService::Now() const {
  return options_.clock ? options_.clock() : std::chrono::steady_clock::now();
}

Digest CompileService::KeyFor(const CompileRequest& r) const {
  Sha256 h;
  h.UpdateField(kCacheFormat);
  h.UpdateField(toolchain_);
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

EntryPtr CompileService::MemoryGetLocked(const Digest& key) {
  auto it = hot_.find(key);
  if (it == hot_.end()) return nullptr;
  Hot& h = it->second;
  lru_.splice(lru_.begin(), lru_, h.lru);
  ++h.untouched_hits;
  ++stats_.memory_hits;
  auto now = std::chrono::steady_clock::now();
  if (now - h.last_touch >= options_.touch_interval) {
    // Written by the dispatch thread: a memory hit never waits for SQLite.
    h.last_touch = now;
    touches_[key] += std::exchange(h.untouched_hits, 0);
    dispatch_wanted_.Signal();
  }
  return h.entry;
}

void CompileService::MemoryPutLocked(const EntryPtr& entry) {
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

std::optional<StatusOr<EntryPtr>> CompileService::KnownLocked(const Digest& key) {
  if (EntryPtr e = MemoryGetLocked(key)) return StatusOr<EntryPtr>(std::move(e));
  auto it = stopped_.find(key);
  if (it == stopped_.end()) return std::nullopt;
  if (Now() >= it->second.until) {
    stopped_.erase(it);
    return std::nullopt;
  }
  ++stats_.negative_hits;
  return StatusOr<EntryPtr>(it->second.status);
}

EntryPtr CompileService::Peek(const Digest& key) {
  MutexLock lock(&mu_);
  return MemoryGetLocked(key);
}

void CompileService::Submit(CompileRequest request, std::string tenant, Callback done) {
  Waiter waiter{std::move(done), std::chrono::steady_clock::now()};
  const Status valid = Validate(request);
  const Digest key = KeyFor(request);
  if (!valid.ok()) {
    MutexLock lock(&mu_);
    AnswerLocked(std::move(waiter), key, valid, CacheSource::kCompiled);
    return;
  }
  Enqueue(key, std::move(request), std::move(tenant), std::move(waiter));
}

StatusOr<EntryPtr> CompileService::Compile(const CompileRequest& request, CompileInfo* info) {
  const auto t0 = std::chrono::steady_clock::now();
  GPUQ_RETURN_IF_ERROR(Validate(request));
  const Digest key = KeyFor(request);
  {
    MutexLock lock(&mu_);
    if (auto known = KnownLocked(key)) {
      if (info) *info = CompileInfo{key, CacheSource::kMemory, MicrosSince(t0)};
      return std::move(*known);
    }
  }
  struct Outcome {
    StatusOr<EntryPtr> result;
    CompileInfo info;
  };
  std::promise<Outcome> promise;
  std::future<Outcome> outcome = promise.get_future();
  Enqueue(key, request, "",
          Waiter{[&promise](const Digest&, StatusOr<EntryPtr> result, const CompileInfo& i) {
                   promise.set_value(Outcome{std::move(result), i});
                 },
                 t0});
  Outcome o = outcome.get();
  if (info) *info = o.info;
  return std::move(o.result);
}

void CompileService::Enqueue(Digest key, CompileRequest request, std::string tenant,
                             Waiter waiter) {
  MutexLock lock(&mu_);
  if (stopping_) {
    AnswerLocked(std::move(waiter), key, Stopping(), CacheSource::kCompiled);
    return;
  }
  if (auto known = KnownLocked(key)) {
    AnswerLocked(std::move(waiter), key, std::move(*known), CacheSource::kMemory);
    return;
  }
  if (auto it = inflight_.find(key); it != inflight_.end()) {
    const FlightPtr& flight = it->second;
    flight->waiters.push_back(std::move(waiter));
    if (std::find(flight->tenants.begin(), flight->tenants.end(), tenant) ==
        flight->tenants.end()) {
      flight->tenants.push_back(tenant);
      if (flight->queued && !flight->taken) QueueForTenantLocked(flight, tenant);
    }
    return;
  }
  auto flight = std::make_shared<Flight>();
  flight->key = key;
  flight->request = std::move(request);
  flight->tenants.push_back(tenant);
  flight->tenant = std::move(tenant);
  flight->waiters.push_back(std::move(waiter));
  inflight_.emplace(key, flight);
  lookups_.push_back(std::move(flight));
  dispatch_wanted_.Signal();
}

void CompileService::AnswerLocked(Waiter waiter, const Digest& key, StatusOr<EntryPtr> result,
                                  CacheSource source) {
  answers_.push_back(Answer{std::move(waiter), key, std::move(result), source});
  dispatch_wanted_.Signal();
}

std::vector<CompileService::Answer> CompileService::FinishLocked(const FlightPtr& flight,
                                                                 StatusOr<EntryPtr> result,
                                                                 CacheSource source) {
  inflight_.erase(flight->key);
  if (result.ok()) {
    MemoryPutLocked(*result);
  } else if (result.status().code() == Code::kTimeout ||
             result.status().code() == Code::kResourceExhausted) {
    // The source may be a bomb: a retry within the TTL gets the same answer
    // at once instead of another helper for the full bound.
    const auto ttl_s = std::chrono::duration_cast<std::chrono::seconds>(options_.negative_ttl);
    if (stopped_.size() >= std::max<size_t>(options_.memory_entries, 64)) {
      const auto now = Now();
      std::erase_if(stopped_, [&](const auto& kv) { return now >= kv.second.until; });
      if (stopped_.size() >= std::max<size_t>(options_.memory_entries, 64)) {
        stopped_.erase(stopped_.begin());
      }
    }
    stopped_[flight->key] =
        Stopped{Status(result.status().code(),
                       result.status().message() + " (remembered: not compiled again for " +
                           std::to_string(ttl_s.count()) + " s)"),
                Now() + options_.negative_ttl};
  }
  std::vector<Answer> answers;
  for (size_t i = 0; i < flight->waiters.size(); ++i) {
    answers.push_back(Answer{std::move(flight->waiters[i]), flight->key, result,
                             i == 0 ? source : CacheSource::kPeer});
  }
  flight->waiters.clear();
  return answers;
}

void CompileService::QueueForCompileLocked(const FlightPtr& flight) {
  flight->queued = true;
  for (const std::string& tenant : flight->tenants) QueueForTenantLocked(flight, tenant);
}

void CompileService::QueueForTenantLocked(const FlightPtr& flight, const std::string& tenant) {
  auto& queue = queues_[tenant];
  if (queue.empty()) turns_.push_back(tenant);
  queue.push_back(flight);
  compile_wanted_.Signal();
}

CompileService::FlightPtr CompileService::NextForCompileLocked() {
  // Round robin: the tenant whose turn it is gives its oldest flight, and
  // goes to the back of the line if it has more. A flight another tenant's
  // turn took already is dropped, and the turn goes on.
  while (!turns_.empty()) {
    std::string tenant = std::move(turns_.front());
    turns_.pop_front();
    auto it = queues_.find(tenant);
    FlightPtr flight = std::move(it->second.front());
    it->second.pop_front();
    if (it->second.empty()) {
      queues_.erase(it);
    } else if (flight->taken) {
      turns_.push_front(std::move(tenant));  // still its turn
    } else {
      turns_.push_back(std::move(tenant));
    }
    if (flight->taken) continue;
    flight->taken = true;
    return flight;
  }
  return nullptr;
}

void CompileService::Run(std::vector<Answer> answers) {
  for (Answer& a : answers) {
    const CompileInfo info{a.key, a.source, MicrosSince(a.waiter.t0)};
    a.waiter.done(a.key, std::move(a.result), info);
  }
}

void CompileService::DispatchLoop() {
  mu_.Lock();
  for (;;) {
    while (!dispatch_stopping_ && answers_.empty() && lookups_.empty() && touches_.empty()) {
      dispatch_wanted_.Wait();
    }
    std::vector<Answer> answers;
    if (!answers_.empty()) {
      answers.push_back(std::move(answers_.front()));
      answers_.pop_front();
      if (dispatch_stopping_) answers.back().result = Stopping();
    } else if (!touches_.empty()) {
      std::map<Digest, uint64_t> touches;
      touches.swap(touches_);
      mu_.Unlock();
      // Best effort: a failed touch only makes eviction a little less accurate.
      for (const auto& [key, hits] : touches) (void)cache_->Touch(key, hits);
      mu_.Lock();
      continue;
    } else if (!lookups_.empty()) {
      FlightPtr flight = std::move(lookups_.front());
      lookups_.pop_front();
      if (dispatch_stopping_) {
        answers = FinishLocked(flight, Stopping(), CacheSource::kCompiled);
      } else {
        mu_.Unlock();
        StatusOr<std::optional<CacheEntry>> hit = cache_->Lookup(flight->key);
        mu_.Lock();
        if (!hit.ok()) {
          ++stats_.errors;
          answers = FinishLocked(flight, hit.status(), CacheSource::kDisk);
        } else if (*hit) {
          ++stats_.disk_hits;
          answers = FinishLocked(flight, std::make_shared<const CacheEntry>(std::move(**hit)),
                                 CacheSource::kDisk);
        } else {
          QueueForCompileLocked(flight);
          continue;
        }
      }
    } else if (!turns_.empty()) {
      // Stopping, and the compile threads are gone: whatever still waits
      // for one is answered.
      FlightPtr flight = NextForCompileLocked();
      if (!flight) continue;
      answers = FinishLocked(flight, Stopping(), CacheSource::kCompiled);
    } else {
      break;  // stopping, and nothing is left to answer
    }
    mu_.Unlock();
    Run(std::move(answers));
    mu_.Lock();
  }
  mu_.Unlock();
}

void CompileService::CompileLoop() {
  mu_.Lock();
  for (;;) {
    while (!stopping_ && turns_.empty()) compile_wanted_.Wait();
    if (stopping_) break;
    FlightPtr flight = NextForCompileLocked();
    if (!flight) continue;
    mu_.Unlock();
    CacheSource source = CacheSource::kCompiled;
    StatusOr<EntryPtr> result = Resolve(*flight, &source);
    mu_.Lock();
    if (!result.ok() && stopping_ && result.status().code() == Code::kUnavailable) {
      result = Stopping();  // cancelled by the stop
    }
    std::vector<Answer> answers = FinishLocked(flight, std::move(result), source);
    mu_.Unlock();
    Run(std::move(answers));
    mu_.Lock();
  }
  mu_.Unlock();
}

StatusOr<EntryPtr> CompileService::Resolve(const Flight& flight, CacheSource* source) {
  // Other processes may be compiling the same key: wait for their result
  // rather than compile it a second time, up to a little over the wall
  // limit (after which their claim is stale and is taken over).
  const auto stale = options_.limits.wall + std::chrono::seconds(5);
  const auto give_up = std::chrono::steady_clock::now() + stale;
  auto nap = std::chrono::milliseconds(5);
  for (;;) {
    GPUQ_ASSIGN_OR_RETURN(KernelCache::Claim claim, cache_->TryClaim(flight.key, stale));
    if (claim == KernelCache::Claim::kOwned) break;
    if (claim == KernelCache::Claim::kPresent) {
      // Stored by another process since the dispatch thread looked.
      GPUQ_ASSIGN_OR_RETURN(std::optional<CacheEntry> hit, cache_->Lookup(flight.key));
      if (!hit) continue;  // evicted since: claim it again
      *source = CacheSource::kPeer;
      MutexLock lock(&mu_);
      ++stats_.peer_hits;
      return std::make_shared<const CacheEntry>(std::move(*hit));
    }
    if (std::chrono::steady_clock::now() > give_up) break;
    pollfd stop{stop_read_.get(), POLLIN, 0};
    if (poll(&stop, stop_read_ ? 1 : 0, static_cast<int>(nap.count())) > 0) return Stopping();
    nap = std::min(nap * 2, std::chrono::milliseconds(100));
  }
  *source = CacheSource::kCompiled;
  StatusOr<EntryPtr> r = CompileNow(flight.request, flight.key);
  Status released = cache_->Release(flight.key);
  if (r.ok() && !released.ok()) return released;
  return r;
}

StatusOr<EntryPtr> CompileService::CompileNow(const CompileRequest& request, const Digest& key) {
  const auto t0 = std::chrono::steady_clock::now();
  helpers_->NoteArch(request.arch);
  StatusOr<Helper> helper = helpers_->Take();
  if (!helper.ok()) {
    MutexLock lock(&mu_);
    ++stats_.errors;
    return helper.status();
  }
  const uint64_t take_us = MicrosSince(t0);
  StatusOr<CompileOutput> out = compiler_.Run(*helper, request, stop_read_.get());
  helpers_->Retire(std::move(*helper));
  if (!out.ok()) {
    MutexLock lock(&mu_);
    ++stats_.errors;
    return out.status();
  }
  const uint64_t helper_us = MicrosSince(t0) - take_us;
  auto e = std::make_shared<CacheEntry>();
  e->key = key;
  e->arch = request.arch;
  e->nvrtc_version = nvrtc_version_;
  e->ok = out->ok;
  e->code = out->ok ? Code::kOk : out->code;
  e->ptx = std::move(out->ptx);
  e->cubin = std::move(out->cubin);
  e->log = std::move(out->log);
  TruncateLog(&e->log);  // the helper cuts it too; this service keeps no more
  e->lowered = std::move(out->lowered);
  e->compile_us = MicrosSince(t0);
  e->created_ms = e->last_used_ms = NowMs();
  Status stored = cache_->Insert(*e);
  {
    MutexLock lock(&mu_);
    ++stats_.compiles;
    stats_.take_us += take_us;
    stats_.helper_us += helper_us;
    stats_.nvrtc_us += out->nvrtc_us;
    stats_.insert_us += MicrosSince(t0) - e->compile_us;
    if (!e->ok) ++stats_.rejected;
    if (!stored.ok()) ++stats_.errors;
  }
  if (!stored.ok()) return stored;
  return EntryPtr(std::move(e));
}

CompileService::Stats CompileService::stats() const {
  MutexLock lock(&mu_);
  Stats s = stats_;
  s.memory_entries = hot_.size();
  s.memory_bytes = hot_bytes_;
  s.queued = 0;
  std::set<const Flight*> queued;  // a flight may wait in several tenants' queues
  for (const auto& [tenant, queue] : queues_) {
    for (const FlightPtr& f : queue) {
      if (!f->taken) queued.insert(f.get());
    }
  }
  s.queued += queued.size();
  return s;
}

}  // namespace gpuq::compile
