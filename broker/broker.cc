#include "broker/broker.h"

#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <filesystem>
#include <httplib.h>
#include <optional>
#include <thread>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "broker/auth.h"
#include "broker/core.h"
#include "broker/handlers/handlers.h"
#include "schema/codec.h"
#include "schema/filename.h"
#include "util/fd.h"

namespace gpuq::broker {
namespace {

using schema::ClientOp;
using Clock_ = std::chrono::steady_clock;

// The metrics and probe server: its threads, and the largest request body
// it reads (its routes take none).
constexpr size_t kHttpThreads = 32;
constexpr size_t kHttpMaxBody = 4096;

std::string_view View(const zmq::message_t& m) {
  return {static_cast<const char*>(m.data()), m.size()};
}

// Creates the folder of an ipc endpoint with owner-only permissions: the
// ipc endpoint is guarded by file permissions.
void PrepareIpc(const std::string& endpoint) {
  if (endpoint.rfind("ipc://", 0) != 0) return;
  std::filesystem::path p(endpoint.substr(6));
  std::error_code ec;
  if (p.has_parent_path()) {
    std::filesystem::create_directories(p.parent_path(), ec);
    std::filesystem::permissions(p.parent_path(), std::filesystem::perms::owner_all,
                                 std::filesystem::perm_options::replace, ec);
  }
  std::filesystem::remove(p, ec);  // a stale socket file of a dead broker
}

// A timer of the loop: due every `period`.
struct Every {
  std::chrono::microseconds period;
  MonoTime next{};
  bool Due(MonoTime now) {
    if (now < next) return false;
    next = now + period;
    return true;
  }
};

}  // namespace

class Broker::Impl {
 public:
  explicit Impl(BrokerOptions o)
      : opt_(std::move(o)), clock_(opt_.clock ? opt_.clock : Clock::Real()) {}
  ~Impl();
  Status Init();
  Status Run();
  void Stop() {
    stop_.store(true);
    Wake();
  }
  void Reload() {
    reload_.store(true);
    Wake();
  }
  void Wake() {
    uint64_t one = 1;
    (void)!write(wake_fd_.get(), &one, sizeof one);
  }

  std::string client_endpoint_, worker_endpoint_;
  int metrics_port_ = 0;
  size_t resumed_ = 0;
  // What /healthz and /readyz read, kept by the loop (steady-clock time of
  // its latest turn, workers attached, whether the store writes).
  std::atomic<int64_t> loop_turned_ns_{0};
  std::atomic<size_t> workers_attached_{0};
  std::atomic<bool> store_writes_{true};
  std::atomic<size_t> expect_workers_{0};
  std::string local_dir_;

 private:
  void OnClientMessage(Frames& frames);
  void Timers(MonoTime now);
  void RenderStats();
  void RefreshCacheStats();

  BrokerOptions opt_;
  const Clock* clock_;
  zmq::context_t ctx_;
  std::unique_ptr<ZapHandler> zap_;
  zmq::socket_t client_sock_, worker_sock_;
  UniqueFd wake_fd_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> reload_{false};
  std::unique_ptr<BrokerCore> core_;

  Every heartbeat_{}, unmatched_{}, purge_{}, render_{};
  MonoTime last_message_{};

  // /metrics, and the kernel cache's size, off the loop.
  Mutex render_mu_;
  std::string prometheus_ GUARDED_BY(render_mu_);
  std::unique_ptr<httplib::Server> http_;
  std::thread http_thread_;
  Mutex cache_stats_mu_;
  CondVar cache_stats_cv_{&cache_stats_mu_};
  bool cache_stats_stop_ GUARDED_BY(cache_stats_mu_) = false;
  std::thread cache_stats_thread_;
};

// ---------------------------------------------------------------- setup

Status Broker::Impl::Init() {
  wake_fd_ = UniqueFd(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!wake_fd_.valid()) return Error(Code::kResourceExhausted, "eventfd failed");
  GPUQ_ASSIGN_OR_RETURN(std::unique_ptr<JobStore> store,
                        JobStore::Open(opt_.store_path, opt_.durability));
  local_dir_ = store->blob_dir();
  GPUQ_ASSIGN_OR_RETURN(ResumeSet resume, store->LoadUnfinished(opt_.limits, clock_->UnixMs()));
  for (const auto& q : resume.quarantined) {
    spdlog::error("job {} (tenant {}) is damaged and quarantined: it failed with io_error: {}",
                  q.id, q.tenant, q.reason);
  }
  const uint64_t next_id = store->next_id(), epoch = store->epoch();
  GPUQ_ASSIGN_OR_RETURN(std::unique_ptr<compile::CompileService> compiler,
                        compile::CompileService::Create(opt_.compile));
  if (!compiler->cache().set_aside().empty()) {
    spdlog::error("the kernel cache {} was damaged: set aside as {}; a fresh one was started",
                  opt_.compile.cache_path, compiler->cache().set_aside());
  }

  const bool curve = !opt_.curve_secret_key.empty();
  if (curve) {
    GPUQ_ASSIGN_OR_RETURN(zap_, ZapHandler::Start(ctx_, opt_.allowed_clients,
                                                  opt_.allowed_workers));
  }
  try {
    client_sock_ = zmq::socket_t(ctx_, zmq::socket_type::router);
    worker_sock_ = zmq::socket_t(ctx_, zmq::socket_type::router);
    // A frame larger than anything the broker could accept is refused by
    // ZeroMQ before it is held whole (the peer is disconnected).
    const uint64_t max_frame = std::max<uint64_t>(
        std::min<uint64_t>(opt_.limits.max_buffer_bytes, opt_.max_queued_bytes),
        opt_.limits.max_header_bytes);
    for (zmq::socket_t* s : {&client_sock_, &worker_sock_}) {
      s->set(zmq::sockopt::router_mandatory, 1);
      s->set(zmq::sockopt::linger, 0);
      s->set(zmq::sockopt::rcvhwm, 100000);
    }
    // Per connection, at most this many replies wait unsent (then the
    // connection's pushes are dropped; it fetches).
    client_sock_.set(zmq::sockopt::sndhwm, 10000);
    worker_sock_.set(zmq::sockopt::sndhwm, 100000);
    client_sock_.set(zmq::sockopt::maxmsgsize, static_cast<int64_t>(max_frame));
    worker_sock_.set(zmq::sockopt::maxmsgsize,
                     static_cast<int64_t>(opt_.limits.max_buffer_bytes + 1));
    if (curve) {
      client_sock_.set(zmq::sockopt::zap_domain, kClientDomain);
      client_sock_.set(zmq::sockopt::curve_server, 1);
      client_sock_.set(zmq::sockopt::curve_secretkey, opt_.curve_secret_key);
      if (!opt_.allowed_workers.empty()) {
        worker_sock_.set(zmq::sockopt::zap_domain, kWorkerDomain);
        worker_sock_.set(zmq::sockopt::curve_server, 1);
        worker_sock_.set(zmq::sockopt::curve_secretkey, opt_.curve_secret_key);
      }
    }
    PrepareIpc(opt_.client_endpoint);
    PrepareIpc(opt_.worker_endpoint);
    client_sock_.bind(opt_.client_endpoint);
    worker_sock_.bind(opt_.worker_endpoint);
    client_endpoint_ = client_sock_.get(zmq::sockopt::last_endpoint);
    worker_endpoint_ = worker_sock_.get(zmq::sockopt::last_endpoint);
  } catch (const zmq::error_t& e) {
    return Error(Code::kUnavailable, std::string("cannot bind: ") + e.what());
  }
  opt_.client_endpoint = client_endpoint_;

  TenantPolicies tenants;
  if (!opt_.tenants_path.empty()) {
    GPUQ_ASSIGN_OR_RETURN(tenants, TenantPolicies::Load(opt_.tenants_path));
    spdlog::info("tenants file {}: {} tenants", opt_.tenants_path, tenants.size());
  }
  auto store_thread =
      std::make_unique<StoreThread>(std::move(store), [this] { Wake(); }, opt_.spin);
  core_ = std::make_unique<BrokerCore>(opt_, clock_, client_sock_, worker_sock_,
                                       std::move(store_thread), std::move(compiler), next_id,
                                       epoch, [this] { Wake(); }, std::move(tenants));
  GPUQ_RETURN_IF_ERROR(core_->connections().Monitor(ctx_, client_sock_, "clients"));
  core_->quarantined = resume.quarantined.size();
  core_->regions().SetLimits(opt_.regions);
  core_->sessions().SetLimits(opt_.sessions);
  // The region channel (PROTOCOL.md, "Regions"), for clients and workers of
  // this host. Without it the broker serves all else.
  if (Status s = core_->region_server().Listen(schema::RegionSocketPath(local_dir_)); !s.ok()) {
    spdlog::warn("no region channel (regions cannot be registered): {}", s.ToString());
  }

  // Resume: every job not ended is queued again, its inputs left on disk.
  const MonoTime now = clock_->Now();
  const int64_t now_ms = clock_->UnixMs();
  for (StoredJob& s : resume.jobs) {
    auto job = std::make_unique<Job>();
    job->id = s.id;
    job->tenant = std::move(s.tenant);
    job->key = std::move(s.key);
    job->priority = s.priority;
    job->accepted_ms = s.accepted_ms;
    job->deadline_ms = s.deadline_ms;
    job->accepted = now - std::chrono::milliseconds(std::max<int64_t>(0, now_ms - s.accepted_ms));
    job->spec = std::make_shared<const schema::JobSpec>(std::move(s.spec));
    job->attempts = s.attempts;
    job->attempts_stored = s.attempts;
    job->suspect = s.suspect;
    job->durable = true;
    for (StoredBuffer& b : s.inputs) {
      JobInput in;
      in.size = b.size;
      in.path = std::move(b.path);
      job->input_bytes += b.size;
      job->inputs.push_back(std::move(in));
    }
    job->held_bytes = job->input_bytes + SpecTextBytes(*job->spec);
    Job& j = core_->jobs().Add(std::move(job));
    j.last_matched = now;
    core_->jobs().Queue(j);
    // Its regions were this broker's predecessor's: memory of clients that
    // must hand it over again. It never runs on what is there now.
    if (NamesRegions(*j.spec)) {
      j.regions = true;
      core_->Finish(j, schema::JobState::kFailed, Code::kUnavailable,
                    "the broker restarted before the job ran, and the regions it names ended "
                    "with it");
    }
  }
  resumed_ = resume.jobs.size();

  if (!opt_.metrics_address.empty()) {
    auto colon = opt_.metrics_address.rfind(':');
    std::string host = opt_.metrics_address.substr(0, colon);
    int port = colon == std::string::npos ? 0 : std::stoi(opt_.metrics_address.substr(colon + 1));
    http_ = std::make_unique<httplib::Server>();
    // Anyone who reaches the port may connect; a connection holds one of
    // the server's threads while it says nothing. With the library's
    // defaults (8 threads on a small host, 5 s to read a request and 5 s
    // between requests) 8 idle connections held off the probes of
    // /healthz and /readyz for seconds at a time, long enough for a
    // liveness probe to restart gpuqd. More threads, and less time each.
    http_->new_task_queue = [] { return new httplib::ThreadPool(kHttpThreads); };
    http_->set_read_timeout(std::chrono::seconds(2));
    http_->set_write_timeout(std::chrono::seconds(2));
    http_->set_keep_alive_timeout(2);
    http_->set_payload_max_length(kHttpMaxBody);  // none of these takes a body
    http_->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      MutexLock lock(&render_mu_);
      res.set_content(prometheus_, "text/plain; version=0.0.4; charset=utf-8");
    });
    // Alive: the loop turned within the last 10 s (it turns at least every
    // 20 ms when idle), or has not started for as long.
    loop_turned_ns_.store(std::chrono::steady_clock::now().time_since_epoch().count());
    http_->Get("/healthz", [this](const httplib::Request&, httplib::Response& res) {
      const int64_t now = std::chrono::steady_clock::now().time_since_epoch().count();
      const double idle_s = (now - loop_turned_ns_.load()) / 1e9;
      if (idle_s < 10) return res.set_content("ok\n", "text/plain");
      res.status = 503;
      res.set_content("the broker's loop has not turned for " + std::to_string(idle_s) + " s\n",
                      "text/plain");
    });
    // Ready: the store writes, and the workers expected are attached.
    http_->Get("/readyz", [this](const httplib::Request&, httplib::Response& res) {
      const size_t attached = workers_attached_.load(), expected = expect_workers_.load();
      if (!store_writes_.load()) {
        res.status = 503;
        return res.set_content("the job store cannot write\n", "text/plain");
      }
      if (attached < expected) {
        res.status = 503;
        return res.set_content(std::to_string(attached) + " of " + std::to_string(expected) +
                                   " expected workers attached\n",
                               "text/plain");
      }
      res.set_content("ready\n", "text/plain");
    });
    metrics_port_ =
        port == 0 ? http_->bind_to_any_port(host) : (http_->bind_to_port(host, port) ? port : -1);
    if (metrics_port_ <= 0) {
      return Error(Code::kUnavailable, "cannot listen on " + opt_.metrics_address);
    }
    http_thread_ = std::thread([this] { http_->listen_after_bind(); });
  }
  core_->cache_changed = [this] { cache_stats_cv_.Signal(); };
  cache_stats_thread_ = std::thread([this] { RefreshCacheStats(); });
  RenderStats();
  return Status::Ok();
}

Broker::Impl::~Impl() {
  {
    MutexLock lock(&cache_stats_mu_);
    cache_stats_stop_ = true;
  }
  cache_stats_cv_.Signal();
  if (cache_stats_thread_.joinable()) cache_stats_thread_.join();
  if (http_) http_->stop();
  if (http_thread_.joinable()) http_thread_.join();
  core_.reset();  // the store thread finishes what it was given
  zap_.reset();
}

// The kernel cache file's entry count and size: a SQLite query, so never on
// the loop.
void Broker::Impl::RefreshCacheStats() {
  MutexLock lock(&cache_stats_mu_);
  while (!cache_stats_stop_) {
    cache_stats_mu_.Unlock();
    auto stats = core_->compiler().cache().Stats();
    if (stats.ok()) {
      core_->cache_entries.store(stats->entries, std::memory_order_relaxed);
      core_->cache_bytes.store(stats->bytes, std::memory_order_relaxed);
    }
    cache_stats_mu_.Lock();
    cache_stats_cv_.WaitUntil(std::chrono::steady_clock::now() + std::chrono::seconds(2));
  }
}

// ---------------------------------------------------------------- loop

Status Broker::Impl::Run() {
  spdlog::info("broker serving clients on {} and workers on {}{}", client_endpoint_,
               worker_endpoint_,
               resumed_ ? fmt::format(" ({} jobs resumed from the store)", resumed_) : "");
  using std::chrono::duration_cast;
  using std::chrono::microseconds;
  heartbeat_.period = duration_cast<microseconds>(opt_.heartbeat);
  unmatched_.period = std::clamp<microseconds>(
      duration_cast<microseconds>(opt_.unmatched_grace) / 12, std::chrono::milliseconds(20),
      std::chrono::seconds(5));
  // Half the retention, between 100 ms and a minute: a result outlives its
  // retention by at most half of it.
  purge_.period = std::clamp<microseconds>(duration_cast<microseconds>(opt_.retention) / 2,
                                           std::chrono::milliseconds(100), std::chrono::minutes(1));
  render_.period = std::chrono::milliseconds(250);
  const auto tick = std::min<std::chrono::milliseconds>(opt_.heartbeat / 4,
                                                        std::chrono::milliseconds(20));
  while (!stop_.load()) {
    std::vector<zmq::pollitem_t> items = {{client_sock_.handle(), 0, ZMQ_POLLIN, 0},
                                          {worker_sock_.handle(), 0, ZMQ_POLLIN, 0},
                                          {nullptr, wake_fd_.get(), ZMQ_POLLIN, 0},
                                          {core_->connections().events().handle(), 0,
                                           ZMQ_POLLIN, 0}};
    constexpr size_t kFixed = 4;
    core_->region_server().PollItems(&items);
    const size_t first_session = items.size();
    core_->sessions().PollItems(&items);
    auto timeout = tick;
    // With --spin-us: awake for that long after a message, and all the
    // while a job runs on a worker (its result is taken the moment it comes).
    const bool running = opt_.spin.count() > 0 && core_->AnyRunning();
    core_->SetStoreBusy(running);
    if (opt_.spin.count() > 0 && (clock_->Now() - last_message_ < opt_.spin || running)) {
      timeout = std::chrono::milliseconds(0);
    }
    const MonoTime idle_from = clock_->Now();
    try {
      zmq::poll(items.data(), items.size(), timeout);
    } catch (const zmq::error_t& e) {
      if (e.num() != EINTR) return Error(Code::kInternal, std::string("poll: ") + e.what());
    }
    const MonoTime busy_from = clock_->Now();
    loop_turned_ns_.store(std::chrono::steady_clock::now().time_since_epoch().count(),
                          std::memory_order_relaxed);
    workers_attached_.store(core_->workers().all().size(), std::memory_order_relaxed);
    store_writes_.store(core_->store_failure().ok(), std::memory_order_relaxed);
    StatsSnapshot& counters = core_->counters();
    counters.loop_idle_us += MicrosBetween(idle_from, busy_from);
    ++counters.loop_iterations;
    if (items[2].revents) {
      uint64_t n;
      (void)!read(wake_fd_.get(), &n, sizeof n);
    }
    if (reload_.exchange(false) && !opt_.tenants_path.empty()) {
      // A small file, read on an operator's signal: the loop reads it.
      auto tenants = TenantPolicies::Load(opt_.tenants_path);
      if (!tenants.ok()) {
        spdlog::error("tenants file {} not reloaded, the settings stay as they were: {}",
                      opt_.tenants_path, tenants.status().ToString());
      } else {
        spdlog::info("tenants file {} reloaded: {} tenants", opt_.tenants_path, tenants->size());
        core_->SetTenantPolicies(std::move(*tenants));
      }
    }
    core_->connections().DrainEvents();
    if (first_session > kFixed) {
      core_->region_server().OnPoll(items.data() + kFixed, first_session - kFixed);
    }
    if (items.size() > first_session) {
      core_->sessions().OnPoll(items.data() + first_session, items.size() - first_session);
    }
    // What is ready, in rounds of a few messages from each side, so that
    // neither side starves the other; between rounds the store's finished
    // batches are taken and the next one handed over, and jobs are sent,
    // so that the store thread and the workers are never kept waiting for
    // the end of a long iteration.
    constexpr int kRound = 64, kRounds = 64;
    for (int round = 0; round < kRounds; ++round) {
      int taken = 0;
      std::optional<MonoTime> drained;
      for (; taken < kRound; ++taken) {
        Frames frames;
        if (!zmq::recv_multipart(worker_sock_, std::back_inserter(frames),
                                 zmq::recv_flags::dontwait)) {
          drained = clock_->Now();
          core_->WorkersDrained(*drained);
          break;
        }
        core_->OnWorkerFrames(frames);
      }
      int from_clients = 0;
      for (; from_clients < kRound; ++from_clients) {
        Frames frames;
        if (!zmq::recv_multipart(client_sock_, std::back_inserter(frames),
                                 zmq::recv_flags::dontwait)) {
          break;
        }
        OnClientMessage(frames);
      }
      taken += from_clients;
      if (taken) last_message_ = clock_->Now();
      counters.loop_messages += static_cast<uint64_t>(taken);
      core_->OnBatchesDone();
      core_->OnCompilesDone();
      core_->sessions().Tick();
      // Timers judge silence against the drain above: read at that moment,
      // their clock cannot stand later than it (a check due later than the
      // drain would find nobody silent and not come again for a period).
      if (round == 0) Timers(drained.value_or(clock_->Now()));
      core_->Dispatch();
      core_->FlushWorkers();  // jobs whose inputs the store read this round
      core_->Flush();
      if (taken == 0) break;
    }
    counters.loop_busy_us += MicrosBetween(busy_from, clock_->Now());
  }
  schema::BrokerMessage bye;
  bye.op = schema::BrokerOp::kDisconnect;
  bye.error = "broker stopping";
  for (const auto& [id, w] : core_->workers().all()) core_->SendWorker(id, bye);
  spdlog::info("broker stopped");
  return Status::Ok();
}

void Broker::Impl::Timers(MonoTime now) {
  core_->ExpireDeadlines();
  if (heartbeat_.Due(now)) {
    core_->Heartbeats();
    core_->EnforceLimits();
    core_->region_server().Tick();
  }
  if (unmatched_.Due(now)) core_->FailUnmatched();
  if (purge_.Due(now)) core_->Purge();
  if (render_.Due(now)) RenderStats();
}

void Broker::Impl::OnClientMessage(Frames& frames) {
  if (frames.empty()) return;
  RequestContext ctx;
  // The descriptor a message came from, read off a data frame: the routing
  // id frame the ROUTER makes does not always carry it.
  const int fd = zmq_msg_get(frames[frames.size() > 1 ? 1 : 0].handle(), ZMQ_SRCFD);
  ctx.conn = core_->connections().Seen(std::string(View(frames[0])), fd);
  if (frames.size() > 1) {
    // On CURVE connections the tenant is the one bound to the client's key.
    const Peer peer = PeerOf(frames[1]);
    ctx.tenant = peer.tenant;
    ctx.operator_ = peer.operator_;
  }
  if (frames.size() < 3) {
    return core_->ReplyError(ctx,
                             Error(Code::kMalformed, "a message is [protocol, header, payload...]"));
  }
  ctx.rid = schema::PeekRequestId(View(frames[2]));
  if (Status s = schema::CheckProtocolFrame(View(frames[1]), schema::kClientProtocol); !s.ok()) {
    return core_->ReplyError(ctx, s);
  }
  std::vector<uint64_t> sizes;
  for (size_t i = 3; i < frames.size(); ++i) sizes.push_back(frames[i].size());
  schema::ClientRequest req;
  if (Status s = schema::DecodeClientRequest(View(frames[2]), sizes, opt_.limits, &req);
      !s.ok()) {
    if (s.code() != Code::kUnknownCommand) ++core_->counters().rejected;
    // A refused submit's local files are removed, whatever refused it, and
    // the refusal is answered once they are gone.
    if (req.op == ClientOp::kSubmit && !req.job.files.empty()) {
      core_->DropPeerFiles(req.job.files, schema::kClientFilePrefix);
      core_->batch().on_done.push_back([this, ctx, s] { core_->ReplyError(ctx, s); });
      return;
    }
    // A session call is answered in its place among its session's calls.
    if (schema::PeekString(View(frames[2]), "op") == std::optional<std::string_view>("session_call")) {
      return core_->sessions().Refused(ctx, schema::PeekUint(View(frames[2]), "id"), s);
    }
    return core_->ReplyError(ctx, s);
  }
  ctx.rid = req.rid;
  switch (req.op) {
    case ClientOp::kSubmit:
      return handlers::Submit(*core_, ctx, req, frames);
    case ClientOp::kStatus:
      return handlers::Status(*core_, ctx, req.id);
    case ClientOp::kResult:
      return handlers::Result(*core_, ctx, req.id);
    case ClientOp::kCancel:
      return handlers::Cancel(*core_, ctx, req.id);
    case ClientOp::kStats:
      return handlers::Stats(*core_, ctx);
    case ClientOp::kDevices:
      return handlers::Devices(*core_, ctx);
    case ClientOp::kUsage:
      return handlers::Usage(*core_, ctx, req);
    case ClientOp::kSessionOpen:
      return core_->sessions().Open(ctx, req.session, req.tenant);
    case ClientOp::kSessionClose:
      return core_->sessions().Close(ctx, req.id);
    case ClientOp::kSessionCall:
      return core_->sessions().Call(ctx, req.id, req.token, frames[3]);
  }
}

void Broker::Impl::RenderStats() {
  if (!http_) return;
  std::string text = PrometheusText(core_->Snapshot(nullptr));
  MutexLock lock(&render_mu_);
  prometheus_ = std::move(text);
}

// ---------------------------------------------------------------- public

Broker::Broker(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Broker::~Broker() = default;

StatusOr<std::unique_ptr<Broker>> Broker::Create(BrokerOptions options) {
  auto impl = std::make_unique<Impl>(std::move(options));
  GPUQ_RETURN_IF_ERROR(impl->Init());
  return std::unique_ptr<Broker>(new Broker(std::move(impl)));
}

Status Broker::Run() { return impl_->Run(); }
void Broker::Stop() { impl_->Stop(); }
void Broker::Reload() { impl_->Reload(); }
const std::string& Broker::client_endpoint() const { return impl_->client_endpoint_; }
const std::string& Broker::local_dir() const { return impl_->local_dir_; }
const std::string& Broker::worker_endpoint() const { return impl_->worker_endpoint_; }
int Broker::metrics_port() const { return impl_->metrics_port_; }
size_t Broker::resumed() const { return impl_->resumed_; }
void Broker::ExpectWorkers(size_t n) { impl_->expect_workers_.store(n); }

}  // namespace gpuq::broker
