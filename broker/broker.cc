#include "broker/broker.h"

#include <spdlog/spdlog.h>
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <httplib.h>
#include <list>
#include <mutex>
#include <queue>
#include <set>
#include <thread>
#include <unordered_map>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "broker/metrics.h"
#include "broker/scheduler.h"
#include "schema/codec.h"

namespace gpuq::broker {
namespace {

using compile::CompileInfo;
using compile::CompileRequest;
using compile::EntryPtr;
using schema::BrokerMessage;
using schema::BrokerOp;
using schema::ClientOp;
using schema::ClientReply;
using schema::ClientRequest;
using schema::JobState;
using schema::ReplyOp;
using schema::WorkerMessage;
using schema::WorkerOp;
using Clock = std::chrono::steady_clock;
using Frames = std::vector<zmq::message_t>;

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

uint64_t UsBetween(Clock::time_point a, Clock::time_point b) {
  return b > a ? static_cast<uint64_t>(
                     std::chrono::duration_cast<std::chrono::microseconds>(b - a).count())
               : 0;
}

std::string_view View(const zmq::message_t& m) {
  return std::string_view(static_cast<const char*>(m.data()), m.size());
}

std::string Printable(const std::string& routing_id) {
  return ToHex(reinterpret_cast<const uint8_t*>(routing_id.data()),
               std::min<size_t>(routing_id.size(), 8));
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

// The modules a worker holds: the same LRU the worker keeps (PROTOCOL.md,
// "Module images"), touched in the order jobs are sent.
class ModuleSet {
 public:
  explicit ModuleSet(size_t capacity) : capacity_(capacity) {}
  // Returns true if the worker already has `key`; records it as most recent.
  bool Touch(const std::string& key) {
    auto it = index_.find(key);
    if (it != index_.end()) {
      order_.splice(order_.begin(), order_, it->second);
      return true;
    }
    if (capacity_ == 0) return false;
    order_.push_front(key);
    index_[key] = order_.begin();
    if (order_.size() > capacity_) {
      index_.erase(order_.back());
      order_.pop_back();
    }
    return false;
  }

 private:
  size_t capacity_;
  std::list<std::string> order_;
  std::unordered_map<std::string, std::list<std::string>::iterator> index_;
};

struct Job {
  uint64_t id = 0;
  std::string tenant, key, client;
  uint32_t priority = schema::kDefaultPriority;
  int64_t accepted_ms = 0, deadline_ms = 0;
  Clock::time_point accepted;
  schema::JobSpec spec;
  std::vector<zmq::message_t> inputs;
  std::vector<schema::LocalFile> input_files;  // inputs after `inputs`, full paths
  uint64_t input_bytes = 0;
  JobState state = JobState::kQueued;
  uint32_t attempts = 0;
  bool suspect = false;
  std::string worker;  // routing id while dispatched
  Clock::time_point dispatched;
  std::map<std::string, EntryPtr> modules;  // by architecture
  std::set<std::string> compiling;          // architectures being compiled
  uint64_t compile_us = 0;
  bool cache_hit = true;
};

struct Worker {
  std::string id;  // routing id
  std::string name;
  schema::DeviceInfo device;
  std::string arch;
  uint32_t slots = 0, credits = 0;
  std::set<uint64_t> inflight;
  ModuleSet modules{0};
  Clock::time_point last_seen;
  bool exclusive = false;  // running a suspect alone
  bool local = false;      // on this host: reads and writes the local directory
};

struct CompileTask {
  Digest key;
  CompileRequest request;
};

struct CompileDone {
  Digest key;
  std::string arch;
  StatusOr<EntryPtr> result = Status(Code::kInternal, "not run");
  CompileInfo info;
};

// A reply or push to send once the store has committed.
struct Outgoing {
  std::string client;
  ClientReply reply;
  std::vector<zmq::message_t> payload;
};

}  // namespace

class Broker::Impl {
 public:
  explicit Impl(BrokerOptions o) : opt_(std::move(o)) {}
  ~Impl();
  Status Init();
  Status Run();
  void Stop() {
    stop_.store(true);
    uint64_t one = 1;
    (void)!write(wake_fd_, &one, sizeof one);
  }

  std::string client_endpoint_, worker_endpoint_;
  int metrics_port_ = 0;
  size_t resumed_ = 0;
  std::string local_dir_;  // the store's blob directory

 private:
  // Client side.
  void OnClientMessage(Frames& frames);
  void OnSubmit(const std::string& client, ClientRequest& req, Frames& frames);
  void OnStatus(const std::string& client, const ClientRequest& req);
  void OnResult(const std::string& client, const ClientRequest& req);
  void OnCancel(const std::string& client, const ClientRequest& req);
  void ReplyError(const std::string& client, uint64_t rid, const Status& s,
                  uint64_t retry_after_ms = 0, uint64_t id = 0);
  void SendClient(Outgoing& out);

  // Worker side.
  void OnWorkerMessage(Frames& frames);
  void OnWorkerResult(Worker& w, WorkerMessage& m, Frames& frames);
  void WorkerLost(const std::string& id, const std::string& why);
  bool SendWorker(const std::string& id, const BrokerMessage& m, Frames* payload = nullptr);

  // Jobs.
  void Enqueue(std::unique_ptr<Job> job);
  void WorkersChanged();
  void RequestCompile(Job& job, const std::string& arch);
  void OnCompileDone(CompileDone& done);
  bool Eligible(Job& job, const Worker& w);
  void Dispatch();
  void SendJob(Worker& w, Job& job);
  // Ends a job: stores its result (in the current transaction) and queues
  // the push to its client for after the commit.
  void Finish(Job& job, JobState state, Code code, std::string error,
              const schema::Timing& timing = {}, std::vector<uint32_t> outputs = {},
              std::vector<zmq::message_t> data = {}, const std::string& device = "",
              std::vector<schema::LocalFile> files = {});
  // Local buffers (PROTOCOL.md): clients on the ipc endpoint share this host.
  bool LocalClients() const { return client_endpoint_.rfind("ipc://", 0) == 0; }
  // Each file a peer names: its prefix, a regular file of one link, the size
  // it declared.
  Status CheckLocalFiles(const std::vector<schema::LocalFile>& files, const char* prefix) const;
  // Removes the files a peer named that carry its prefix (c- clients, w-
  // workers); never any other file of the directory.
  void DropLocalFiles(const std::vector<schema::LocalFile>& files, const char* prefix) const;
  // A file's bytes as a message, mapped rather than copied.
  static StatusOr<zmq::message_t> MapFile(const std::string& path, uint64_t size);
  Status EnsureTransaction();
  void CommitAndFlush();
  void Timers();
  void CompileLoop();
  void RenderStats();
  StatsSnapshot Snapshot();
  std::vector<schema::WorkerView> WorkerViews() const;

  BrokerOptions opt_;
  zmq::context_t ctx_;
  zmq::socket_t client_sock_, worker_sock_;
  zmq::socket_t zap_socket_;  // owned by the ZAP thread
  int wake_fd_ = -1;
  std::atomic<bool> stop_{false};
  std::unique_ptr<JobStore> store_;
  std::string bound_tenant_;  // of the client message being handled; "" off CURVE
  // A tenant bound to its key sees only its own jobs.
  bool Visible(const std::string& job_tenant) const {
    return bound_tenant_.empty() || bound_tenant_ == job_tenant;
  }
  std::unique_ptr<compile::CompileService> compiler_;
  Scheduler scheduler_;
  std::unordered_map<uint64_t, std::unique_ptr<Job>> jobs_;  // not yet ended
  std::map<std::pair<std::string, std::string>, uint64_t> keys_;  // (tenant, key) -> id
  std::map<std::string, Worker> workers_;
  std::vector<std::string> worker_archs_;  // of workers_, distinct (WorkersChanged)
  struct KernelMemo {
    schema::KernelSpec kernel;
    Digest key;
  };
  std::map<std::string, KernelMemo> last_kernel_;  // by architecture
  Histogram* compile_latency_ = nullptr;           // counters_.latency["compile"]
  std::map<Digest, std::vector<uint64_t>> waiting_compile_;
  using Deadline = std::pair<int64_t, uint64_t>;
  std::priority_queue<Deadline, std::vector<Deadline>, std::greater<>> deadlines_;
  uint64_t queued_bytes_ = 0;
  std::vector<Outgoing> outgoing_;  // sent after the next commit
  std::vector<std::unique_ptr<Job>> accepted_;  // enqueued after the next commit
  bool commit_failed_ = false;

  // Compile pool.
  std::mutex compile_mu_;
  std::condition_variable compile_cv_;
  std::deque<CompileTask> compile_tasks_;  // GUARDED_BY(compile_mu_)
  std::vector<CompileDone> compile_done_;  // GUARDED_BY(compile_mu_)
  bool compile_stop_ = false;              // GUARDED_BY(compile_mu_)
  std::vector<std::thread> compile_threads_;

  // Stats.
  Clock::time_point started_ = Clock::now();
  StatsSnapshot counters_;  // counters and histograms; the rest is filled in Snapshot()
  std::mutex render_mu_;
  std::string prometheus_;  // GUARDED_BY(render_mu_)
  std::unique_ptr<httplib::Server> http_;
  std::thread http_thread_;
  // CURVE authentication (ZAP, RFC 27) for both endpoints.
  void ZapLoop();
  std::thread zap_thread_;
  std::atomic<bool> zap_stop_{false};
  Clock::time_point next_heartbeat_, next_render_, next_purge_;
  Clock::time_point workers_drained_;  // when the worker socket was last empty
  Clock::time_point last_message_;     // the last message taken from either socket
};

// ---------------------------------------------------------------- setup

Status Broker::Impl::Init() {
  compile_latency_ = &counters_.latency["compile"];
  GPUQ_ASSIGN_OR_RETURN(store_, JobStore::Open(opt_.store_path, opt_.durability));
  local_dir_ = store_->blob_dir();
  GPUQ_ASSIGN_OR_RETURN(compiler_, compile::CompileService::Create(opt_.compile));
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake_fd_ < 0) return Error(Code::kResourceExhausted, "eventfd failed");
  const bool curve = !opt_.curve_secret_key.empty();
  if (curve) {
    zmq::socket_t zap(ctx_, zmq::socket_type::rep);
    zap.bind("inproc://zeromq.zap.01");
    zap_thread_ = std::thread([this, z = std::move(zap)]() mutable {
      zap_socket_ = std::move(z);
      ZapLoop();
    });
  }
  try {
    client_sock_ = zmq::socket_t(ctx_, zmq::socket_type::router);
    worker_sock_ = zmq::socket_t(ctx_, zmq::socket_type::router);
    for (zmq::socket_t* s : {&client_sock_, &worker_sock_}) {
      s->set(zmq::sockopt::router_mandatory, 1);
      s->set(zmq::sockopt::linger, 0);
      s->set(zmq::sockopt::sndhwm, 1000000);
      s->set(zmq::sockopt::rcvhwm, 1000000);
      s->set(zmq::sockopt::maxmsgsize, static_cast<int64_t>(opt_.limits.max_buffer_bytes + 1));
    }
    if (curve) {
      client_sock_.set(zmq::sockopt::zap_domain, "clients");
      client_sock_.set(zmq::sockopt::curve_server, 1);
      client_sock_.set(zmq::sockopt::curve_secretkey, opt_.curve_secret_key);
      if (!opt_.allowed_workers.empty()) {
        worker_sock_.set(zmq::sockopt::zap_domain, "workers");
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

  // Resume: every job not ended is queued again.
  GPUQ_ASSIGN_OR_RETURN(ResumeSet stored, store_->LoadUnfinished(opt_.limits, NowMs()));
  for (const ResumeSet::Quarantined& q : stored.quarantined) {
    spdlog::error("job {} of tenant {} not resumed, damaged in the store: {}", q.id, q.tenant,
                  q.reason);
  }
  for (StoredJob& s : stored.jobs) {
    auto job = std::make_unique<Job>();
    job->id = s.id;
    job->tenant = std::move(s.tenant);
    job->key = std::move(s.key);
    job->priority = s.priority;
    job->accepted_ms = s.accepted_ms;
    job->deadline_ms = s.deadline_ms;
    job->accepted = Clock::now() - std::chrono::milliseconds(NowMs() - s.accepted_ms);
    job->spec = std::move(s.spec);
    job->attempts = s.attempts;
    job->suspect = s.suspect;
    GPUQ_ASSIGN_OR_RETURN(std::vector<StoredBuffer> inputs, store_->LoadInputs(s.id));
    for (StoredBuffer& in : inputs) {
      job->input_bytes += in.size;
      if (in.path.empty()) {
        job->inputs.emplace_back(in.bytes.data(), in.bytes.size());
      } else {
        GPUQ_ASSIGN_OR_RETURN(zmq::message_t mapped, MapFile(in.path, in.size));
        job->inputs.push_back(std::move(mapped));
      }
    }
    Enqueue(std::move(job));
  }
  resumed_ = stored.jobs.size();

  for (size_t i = 0; i < std::max<size_t>(1, opt_.compile_threads); ++i) {
    compile_threads_.emplace_back([this] { CompileLoop(); });
  }
  if (!opt_.metrics_address.empty()) {
    auto colon = opt_.metrics_address.rfind(':');
    std::string host = opt_.metrics_address.substr(0, colon);
    int port = colon == std::string::npos ? 0 : std::stoi(opt_.metrics_address.substr(colon + 1));
    http_ = std::make_unique<httplib::Server>();
    http_->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      std::lock_guard lock(render_mu_);
      res.set_content(prometheus_, "text/plain; version=0.0.4; charset=utf-8");
    });
    metrics_port_ = port == 0 ? http_->bind_to_any_port(host) : (http_->bind_to_port(host, port) ? port : -1);
    if (metrics_port_ <= 0) {
      return Error(Code::kUnavailable, "cannot listen on " + opt_.metrics_address);
    }
    http_thread_ = std::thread([this] { http_->listen_after_bind(); });
  }
  RenderStats();
  return Status::Ok();
}

Broker::Impl::~Impl() {
  zap_stop_ = true;
  if (zap_thread_.joinable()) zap_thread_.join();
  {
    std::lock_guard lock(compile_mu_);
    compile_stop_ = true;
  }
  compile_cv_.notify_all();
  for (auto& t : compile_threads_) t.join();
  if (http_) http_->stop();
  if (http_thread_.joinable()) http_thread_.join();
  if (wake_fd_ >= 0) close(wake_fd_);
}

void Broker::Impl::ZapLoop() {
  while (!zap_stop_) {
    zmq::pollitem_t item = {zap_socket_.handle(), 0, ZMQ_POLLIN, 0};
    zmq::poll(&item, 1, std::chrono::milliseconds(100));
    if (!(item.revents & ZMQ_POLLIN)) continue;
    std::vector<zmq::message_t> req;
    if (!zmq::recv_multipart(zap_socket_, std::back_inserter(req))) continue;
    // [version, request id, domain, address, identity, mechanism, credentials...]
    std::string status = "400", text = "key not allowed", user;
    if (req.size() >= 7 && req[5].to_string_view() == "CURVE" && req[6].size() == 32) {
      char z85[41];
      zmq_z85_encode(z85, static_cast<const uint8_t*>(req[6].data()), 32);
      const auto& allowed = req[2].to_string_view() == "workers" ? opt_.allowed_workers
                                                                  : opt_.allowed_clients;
      auto it = allowed.find(z85);
      if (it != allowed.end()) {
        status = "200";
        text = "OK";
        user = it->second;
      } else {
        spdlog::warn("refused a {} connection from {}: key {} is not allowed",
                     req[2].to_string(), req[3].to_string(), z85);
      }
    }
    std::vector<zmq::message_t> reply;
    reply.emplace_back("1.0", 3);
    reply.push_back(req.size() > 1 ? std::move(req[1]) : zmq::message_t());
    reply.emplace_back(status.data(), status.size());
    reply.emplace_back(text.data(), text.size());
    reply.emplace_back(user.data(), user.size());
    reply.emplace_back();
    zmq::send_multipart(zap_socket_, reply);
  }
}

// ---------------------------------------------------------------- loop

Status Broker::Impl::Run() {
  spdlog::info("broker serving clients on {} and workers on {}{}", client_endpoint_,
               worker_endpoint_,
               resumed_ ? fmt::format(" ({} jobs resumed from the store)", resumed_) : "");
  next_heartbeat_ = next_render_ = next_purge_ = Clock::now();
  while (!stop_.load()) {
    zmq::pollitem_t items[] = {{client_sock_.handle(), 0, ZMQ_POLLIN, 0},
                               {worker_sock_.handle(), 0, ZMQ_POLLIN, 0},
                               {nullptr, wake_fd_, ZMQ_POLLIN, 0}};
    auto timeout = std::min(opt_.heartbeat / 2, std::chrono::milliseconds(50));
    if (opt_.spin.count() > 0 && Clock::now() - last_message_ < opt_.spin) {
      timeout = std::chrono::milliseconds(0);
    }
    try {
      zmq::poll(items, 3, timeout);
    } catch (const zmq::error_t& e) {
      if (e.num() != EINTR) return Error(Code::kInternal, std::string("poll: ") + e.what());
    }
    if (items[2].revents) {
      uint64_t n;
      (void)!read(wake_fd_, &n, sizeof n);
    }
    // Drain what is ready, bounded so that neither side starves the other.
    for (int i = 0; i < 4096; ++i) {
      Frames frames;
      if (!zmq::recv_multipart(worker_sock_, std::back_inserter(frames),
                               zmq::recv_flags::dontwait)) {
        // Every worker message sent before now has been seen: a worker's
        // silence is judged up to here, not up to the end of an iteration
        // that a large job made long.
        workers_drained_ = Clock::now();
        break;
      }
      OnWorkerMessage(frames);
      last_message_ = Clock::now();
    }
    for (int i = 0; i < 4096; ++i) {
      Frames frames;
      if (!zmq::recv_multipart(client_sock_, std::back_inserter(frames), zmq::recv_flags::dontwait))
        break;
      OnClientMessage(frames);
      last_message_ = Clock::now();
    }
    std::vector<CompileDone> done;
    {
      std::lock_guard lock(compile_mu_);
      done.swap(compile_done_);
    }
    for (CompileDone& d : done) OnCompileDone(d);
    Timers();
    CommitAndFlush();
    if (commit_failed_) return Error(Code::kIoError, "the job store failed; stopping");
    Dispatch();
    CommitAndFlush();  // requeues and failures of workers lost while sending
    if (commit_failed_) return Error(Code::kIoError, "the job store failed; stopping");
  }
  for (auto& [id, w] : workers_) {
    BrokerMessage bye;
    bye.op = BrokerOp::kDisconnect;
    bye.error = "broker stopping";
    SendWorker(id, bye);
  }
  spdlog::info("broker stopped");
  return Status::Ok();
}

Status Broker::Impl::EnsureTransaction() {
  if (store_->in_transaction()) return Status::Ok();
  return store_->Begin();
}

void Broker::Impl::CommitAndFlush() {
  if (store_->in_transaction()) {
    Status s = store_->Commit();
    if (!s.ok()) {
      spdlog::critical("job store commit failed: {}", s.ToString());
      for (auto& job : accepted_) {
        ReplyError(job->client, 0, Error(Code::kIoError, "the job store failed"));
      }
      accepted_.clear();
      outgoing_.clear();
      commit_failed_ = true;
      return;
    }
  }
  for (auto& job : accepted_) Enqueue(std::move(job));
  accepted_.clear();
  for (Outgoing& o : outgoing_) SendClient(o);
  outgoing_.clear();
}

void Broker::Impl::Timers() {
  const auto now = Clock::now();
  const int64_t now_ms = NowMs();
  // Deadlines: a job not started by its deadline expires.
  while (!deadlines_.empty() && deadlines_.top().first <= now_ms) {
    uint64_t id = deadlines_.top().second;
    deadlines_.pop();
    auto it = jobs_.find(id);
    if (it == jobs_.end() || it->second->state != JobState::kQueued) continue;
    scheduler_.Remove(id);
    Finish(*it->second, JobState::kExpired, Code::kTimeout, "not started by its deadline");
  }
  if (now >= next_heartbeat_) {
    next_heartbeat_ = now + opt_.heartbeat;
    const auto silent = opt_.heartbeat * opt_.heartbeat_misses;
    std::vector<std::string> lost;
    for (auto& [id, w] : workers_) {
      if (workers_drained_ - w.last_seen > silent) {
        lost.push_back(id);
        continue;
      }
      BrokerMessage hb;
      hb.op = BrokerOp::kHeartbeat;
      SendWorker(id, hb);
    }
    for (const auto& id : lost) WorkerLost(id, "silent for too long");
  }
  if (now >= next_purge_) {
    // Half the retention, between 100 ms and a minute: a result outlives its
    // retention by at most half of it.
    next_purge_ = now + std::clamp<std::chrono::milliseconds>(
                            std::chrono::duration_cast<std::chrono::milliseconds>(opt_.retention) / 2,
                            std::chrono::milliseconds(100), std::chrono::minutes(1));
    if (EnsureTransaction().ok()) {
      auto purged = store_->PurgeFinished(now_ms - opt_.retention.count() * 1000);
      if (purged.ok() && *purged) spdlog::info("purged {} results past retention", *purged);
    }
  }
  if (now >= next_render_) {
    next_render_ = now + std::chrono::milliseconds(250);
    RenderStats();
  }
}

// ---------------------------------------------------------------- clients

void Broker::Impl::SendClient(Outgoing& out) {
  if (out.client.empty()) return;
  std::string header = schema::EncodeClientReply(out.reply);
  try {
    auto more = zmq::send_flags::sndmore | zmq::send_flags::dontwait;
    if (!client_sock_.send(zmq::buffer(out.client), more)) {
      spdlog::warn("client {} is not reading; job {} stays fetchable", Printable(out.client),
                   out.reply.id);
      return;
    }
    client_sock_.send(zmq::buffer(schema::kClientProtocol), zmq::send_flags::sndmore);
    client_sock_.send(zmq::buffer(header),
                  out.payload.empty() ? zmq::send_flags::none : zmq::send_flags::sndmore);
    for (size_t i = 0; i < out.payload.size(); ++i) {
      client_sock_.send(out.payload[i], i + 1 < out.payload.size() ? zmq::send_flags::sndmore
                                                              : zmq::send_flags::none);
    }
  } catch (const zmq::error_t& e) {
    // EHOSTUNREACH: the client has gone. Its results stay fetchable.
    spdlog::debug("client {} unreachable: {}", Printable(out.client), e.what());
  }
}

void Broker::Impl::ReplyError(const std::string& client, uint64_t rid, const Status& s,
                              uint64_t retry_after_ms, uint64_t id) {
  Outgoing o;
  o.client = client;
  o.reply.op = ReplyOp::kError;
  o.reply.rid = rid;
  o.reply.id = id;
  o.reply.code = s.code() == Code::kOk ? Code::kInternal : s.code();
  o.reply.error = s.message();
  o.reply.retry_after_ms = retry_after_ms;
  SendClient(o);
}

void Broker::Impl::OnClientMessage(Frames& frames) {
  if (frames.empty()) return;
  const std::string client(View(frames[0]));
  if (frames.size() < 3) {
    ReplyError(client, 0, Error(Code::kMalformed, "a message is [protocol, header, payload...]"));
    return;
  }
  if (Status s = schema::CheckProtocolFrame(View(frames[1]), schema::kClientProtocol); !s.ok()) {
    ReplyError(client, schema::PeekRequestId(View(frames[2])), s);
    return;
  }
  std::vector<uint64_t> sizes;
  for (size_t i = 3; i < frames.size(); ++i) sizes.push_back(frames[i].size());
  // On CURVE connections the tenant is the one bound to the client's key.
  const char* user = zmq_msg_gets(frames[1].handle(), "User-Id");
  bound_tenant_ = user ? user : "";
  ClientRequest req;
  if (Status s = schema::DecodeClientRequest(View(frames[2]), sizes, opt_.limits, &req);
      !s.ok()) {
    if (s.code() != Code::kUnknownCommand) ++counters_.rejected;
    ReplyError(client, schema::PeekRequestId(View(frames[2])), s);
    return;
  }
  switch (req.op) {
    case ClientOp::kSubmit:
      OnSubmit(client, req, frames);
      return;
    case ClientOp::kStatus:
      OnStatus(client, req);
      return;
    case ClientOp::kResult:
      OnResult(client, req);
      return;
    case ClientOp::kCancel:
      OnCancel(client, req);
      return;
    case ClientOp::kStats: {
      Outgoing o;
      o.client = client;
      o.reply.op = ReplyOp::kStats;
      o.reply.rid = req.rid;
      o.reply.stats = EncodeStats(Snapshot());
      SendClient(o);
      return;
    }
    case ClientOp::kDevices: {
      Outgoing o;
      o.client = client;
      o.reply.op = ReplyOp::kDevices;
      o.reply.rid = req.rid;
      o.reply.workers = WorkerViews();
      if (LocalClients()) o.reply.local_dir = store_->blob_dir();
      SendClient(o);
      return;
    }
  }
}

void Broker::Impl::OnSubmit(const std::string& client, ClientRequest& req, Frames& frames) {
  schema::JobSpec& spec = req.job;
  if (!bound_tenant_.empty()) spec.tenant = bound_tenant_;
  const std::string tenant = spec.tenant.empty() ? "default" : spec.tenant;
  // The client's files a submit names are the broker's to remove unless it
  // takes them.
  auto drop_files = [&] { DropLocalFiles(spec.files, "c-"); };
  auto reject = [&](const Status& s, uint64_t retry = 0) {
    ++counters_.rejected;
    drop_files();
    ReplyError(client, req.rid, s, retry);
  };
  if (!spec.files.empty()) {
    if (!LocalClients()) {
      return reject(Error(Code::kInvalid, "local files need the broker's ipc endpoint"));
    }
    if (Status s = CheckLocalFiles(spec.files, "c-"); !s.ok()) return reject(s);
  }
  if (Status s = compile::ValidateOptions(spec.kernel.options); !s.ok()) return reject(s);
  if (!spec.placement.arch.empty()) {
    if (Status s = compile::ValidateArch(spec.placement.arch); !s.ok()) return reject(s);
  }
  // Idempotency: the same key returns the job it named first.
  if (!spec.key.empty()) {
    auto k = keys_.find({tenant, spec.key});
    std::optional<uint64_t> existing;
    if (k != keys_.end()) {
      existing = k->second;
    } else {
      for (const auto& j : accepted_) {
        if (j->tenant == tenant && j->key == spec.key) existing = j->id;
      }
      if (!existing) {
        auto found = store_->FindByKey(tenant, spec.key);
        if (!found.ok()) return reject(found.status());
        existing = *found;
      }
    }
    if (existing) {
      drop_files();
      Outgoing o;
      o.client = client;
      o.reply.op = ReplyOp::kAccepted;
      o.reply.rid = req.rid;
      o.reply.id = *existing;
      o.reply.existing = true;
      outgoing_.push_back(std::move(o));  // after any commit that created it
      return;
    }
  }
  uint64_t bytes = 0;
  for (size_t i = 3; i < frames.size(); ++i) bytes += frames[i].size();
  const size_t pending = accepted_.size();
  if (scheduler_.size() + jobs_.size() + pending >= opt_.max_queued) {
    return reject(Error(Code::kQueueFull, "the broker holds " + std::to_string(opt_.max_queued) +
                                              " jobs, its limit"),
                  100);
  }
  if (scheduler_.TenantSize(tenant) >= opt_.max_queued_per_tenant) {
    return reject(Error(Code::kQueueFull, "tenant " + tenant + " has " +
                                              std::to_string(opt_.max_queued_per_tenant) +
                                              " queued jobs, its limit"),
                  250);
  }
  if (queued_bytes_ + bytes > opt_.max_queued_bytes) {
    return reject(Error(Code::kQueueFull, "queued input buffers are at their limit of " +
                                              std::to_string(opt_.max_queued_bytes) + " bytes"),
                  250);
  }
  if (Status s = EnsureTransaction(); !s.ok()) return reject(s);
  auto job = std::make_unique<Job>();
  job->tenant = tenant;
  job->key = spec.key;
  job->client = client;
  job->priority = spec.priority;
  job->accepted_ms = NowMs();
  job->accepted = Clock::now();
  job->deadline_ms = spec.deadline_ms ? job->accepted_ms + static_cast<int64_t>(spec.deadline_ms) : 0;
  if (spec.time_limit_ms == 0) spec.time_limit_ms = opt_.default_time_limit_ms;
  StoredJob row;
  row.id = store_->next_id();
  row.tenant = tenant;
  row.key = spec.key;
  row.priority = spec.priority;
  row.accepted_ms = job->accepted_ms;
  row.deadline_ms = job->deadline_ms;
  row.spec = spec;
  row.spec.files.clear();  // stored as the job's input rows, after the frames
  std::vector<std::string_view> inputs;
  for (size_t i = 3; i < frames.size(); ++i) inputs.push_back(View(frames[i]));
  if (Status s = store_->Insert(row, inputs, spec.files); !s.ok()) return reject(s);
  job->id = row.id;
  for (size_t i = 0; i < spec.files.size(); ++i) {
    job->input_files.push_back({store_->InputPath(row.id, inputs.size() + i), spec.files[i].size});
  }
  spec.files.clear();
  job->spec = std::move(spec);
  job->input_bytes = bytes;
  for (size_t i = 3; i < frames.size(); ++i) job->inputs.push_back(std::move(frames[i]));
  ++counters_.submitted;
  Outgoing o;
  o.client = client;
  o.reply.op = ReplyOp::kAccepted;
  o.reply.rid = req.rid;
  o.reply.id = job->id;
  outgoing_.push_back(std::move(o));
  accepted_.push_back(std::move(job));
}

void Broker::Impl::OnStatus(const std::string& client, const ClientRequest& req) {
  Outgoing o;
  o.client = client;
  o.reply.op = ReplyOp::kStatus;
  o.reply.rid = req.rid;
  o.reply.id = req.id;
  const Status unknown =
      Error(Code::kNotFound, "no job " + std::to_string(req.id));
  auto it = jobs_.find(req.id);
  if (it != jobs_.end() && !Visible(it->second->tenant)) {
    return ReplyError(client, req.rid, unknown, 0, req.id);
  }
  if (it != jobs_.end()) {
    const Job& j = *it->second;
    o.reply.state = j.state;
    o.reply.attempts = j.attempts;
    if (!j.worker.empty()) {
      auto w = workers_.find(j.worker);
      if (w != workers_.end()) o.reply.device = w->second.device.uuid;
    }
    SendClient(o);
    return;
  }
  auto stored = store_->Get(req.id);
  if (!stored.ok()) return ReplyError(client, req.rid, stored.status());
  if (!*stored || !Visible((*stored)->tenant)) {
    return ReplyError(client, req.rid, unknown, 0, req.id);
  }
  o.reply.state = (*stored)->state;
  o.reply.attempts = (*stored)->attempts;
  auto result = store_->GetResultMeta(req.id);
  if (result.ok() && *result) {
    o.reply.device = (*result)->device;
    if ((*result)->code != Code::kOk) {
      o.reply.code = (*result)->code;
      o.reply.error = (*result)->error;
    }
  }
  SendClient(o);
}

void Broker::Impl::OnResult(const std::string& client, const ClientRequest& req) {
  if (jobs_.count(req.id)) return OnStatus(client, req);  // not ended yet
  if (!bound_tenant_.empty()) {
    auto stored = store_->Get(req.id);
    if (!stored.ok() || !*stored || !Visible((*stored)->tenant)) {
      return ReplyError(client, req.rid,
                        Error(Code::kNotFound, "no job " + std::to_string(req.id)), 0, req.id);
    }
  }
  auto result = store_->GetResult(req.id);
  if (!result.ok()) return ReplyError(client, req.rid, result.status());
  if (!*result) {
    return ReplyError(client, req.rid,
                      Error(Code::kNotFound, "no result for job " + std::to_string(req.id) +
                                                 " (unknown, or past retention)"),
                      0, req.id);
  }
  StoredResult& r = **result;
  Outgoing o;
  o.client = client;
  o.reply.op = ReplyOp::kResult;
  o.reply.rid = req.rid;
  o.reply.id = req.id;
  o.reply.state = r.state;
  o.reply.code = r.code;
  o.reply.error = std::move(r.error);
  o.reply.attempts = r.attempts;
  o.reply.device = std::move(r.device);
  o.reply.timing = r.timing;
  o.reply.outputs = std::move(r.outputs);
  for (StoredBuffer& d : r.data) {
    if (d.path.empty()) {
      o.payload.emplace_back(d.bytes.data(), d.bytes.size());
      continue;
    }
    auto mapped = MapFile(d.path, d.size);
    if (!mapped.ok()) return ReplyError(client, req.rid, mapped.status());
    o.payload.push_back(std::move(*mapped));
  }
  SendClient(o);
}

void Broker::Impl::OnCancel(const std::string& client, const ClientRequest& req) {
  auto it = jobs_.find(req.id);
  if (it != jobs_.end() && !Visible(it->second->tenant)) {
    return ReplyError(client, req.rid, Error(Code::kNotFound, "no job " + std::to_string(req.id)),
                      0, req.id);
  }
  if (it == jobs_.end()) {
    // Ended already (or unknown): report the state it has.
    auto stored = store_->Get(req.id);
    if (!stored.ok()) return ReplyError(client, req.rid, stored.status());
    if (!*stored || !Visible((*stored)->tenant)) {
      return ReplyError(client, req.rid, Error(Code::kNotFound, "no job " + std::to_string(req.id)),
                        0, req.id);
    }
    Outgoing o;
    o.client = client;
    o.reply.op = ReplyOp::kCanceled;
    o.reply.rid = req.rid;
    o.reply.id = req.id;
    o.reply.state = (*stored)->state;
    SendClient(o);
    return;
  }
  Job& job = *it->second;
  scheduler_.Remove(job.id);
  // A dispatched job keeps its worker slot until the worker answers; its
  // result is then dropped.
  Finish(job, JobState::kCanceled, Code::kOk, "");
  Outgoing o;
  o.client = client;
  o.reply.op = ReplyOp::kCanceled;
  o.reply.rid = req.rid;
  o.reply.id = req.id;
  o.reply.state = JobState::kCanceled;
  outgoing_.push_back(std::move(o));
}

// ---------------------------------------------------------------- jobs

void Broker::Impl::Enqueue(std::unique_ptr<Job> job) {
  Job& j = *job;
  j.state = JobState::kQueued;
  j.worker.clear();
  if (!j.key.empty()) keys_[{j.tenant, j.key}] = j.id;
  queued_bytes_ += j.input_bytes;
  if (j.deadline_ms) deadlines_.push({j.deadline_ms, j.id});
  scheduler_.Push(j.id, j.tenant, j.priority);
  // Compile now for the architectures of the workers we have, so that the
  // kernel is ready when a slot frees.
  jobs_[j.id] = std::move(job);
  for (const auto& arch : worker_archs_) {
    if (j.spec.placement.arch.empty() || j.spec.placement.arch == arch) RequestCompile(j, arch);
  }
}

void Broker::Impl::WorkersChanged() {
  std::set<std::string> archs;
  for (const auto& [id, w] : workers_) archs.insert(w.arch);
  worker_archs_.assign(archs.begin(), archs.end());
}

void Broker::Impl::RequestCompile(Job& job, const std::string& arch) {
  if (job.modules.count(arch) || job.compiling.count(arch)) return;
  // The same kernel as the last job for this architecture, still in the
  // compile service's memory: no hashing, no copies (the common case of a
  // scheduler sending one kernel many times).
  const schema::KernelSpec& k = job.spec.kernel;
  auto memo = last_kernel_.find(arch);
  if (memo != last_kernel_.end() && memo->second.kernel.source == k.source &&
      memo->second.kernel.options == k.options && memo->second.kernel.headers == k.headers &&
      memo->second.kernel.name_expression == k.name_expression &&
      (!k.name_expression || memo->second.kernel.entry == k.entry)) {
    if (EntryPtr hot = compiler_->Peek(memo->second.key)) {
      if (hot->ok && hot->HasKernel(hot->Symbol(k.entry))) {
        ++counters_.cache_hits;
        compile_latency_->Observe(0);
        job.modules[arch] = std::move(hot);
        return;
      }
    }
  }
  CompileRequest req;
  req.source = job.spec.kernel.source;
  req.headers = job.spec.kernel.headers;
  req.options = job.spec.kernel.options;
  if (job.spec.kernel.name_expression) req.name_expressions = {job.spec.kernel.entry};
  req.arch = arch;
  const Digest key = compiler_->KeyFor(req);
  last_kernel_[arch] = {k, key};
  if (EntryPtr hot = compiler_->Peek(key)) {
    CompileDone d{key, arch, hot, {}};
    d.info.key = key;
    d.info.source = compile::CacheSource::kMemory;
    waiting_compile_[key].push_back(job.id);
    job.compiling.insert(arch);
    OnCompileDone(d);
    return;
  }
  job.compiling.insert(arch);
  auto& waiting = waiting_compile_[key];
  waiting.push_back(job.id);
  if (waiting.size() > 1) return;  // a compile of this key is under way
  {
    std::lock_guard lock(compile_mu_);
    compile_tasks_.push_back({key, std::move(req)});
  }
  compile_cv_.notify_one();
}

void Broker::Impl::CompileLoop() {
  for (;;) {
    CompileTask task;
    {
      std::unique_lock lock(compile_mu_);
      compile_cv_.wait(lock, [&] { return compile_stop_ || !compile_tasks_.empty(); });
      if (compile_stop_) return;
      task = std::move(compile_tasks_.front());
      compile_tasks_.pop_front();
    }
    CompileDone done{task.key, task.request.arch, Status(Code::kInternal, ""), {}};
    done.result = compiler_->Compile(task.request, &done.info);
    {
      std::lock_guard lock(compile_mu_);
      compile_done_.push_back(std::move(done));
    }
    uint64_t one = 1;
    (void)!write(wake_fd_, &one, sizeof one);
  }
}

void Broker::Impl::OnCompileDone(CompileDone& done) {
  auto waiting = waiting_compile_.extract(done.key);
  if (waiting.empty()) return;
  if (done.info.cache_hit()) {
    ++counters_.cache_hits;
  } else {
    ++counters_.cache_misses;
  }
  compile_latency_->Observe(done.info.wall_us);
  for (uint64_t id : waiting.mapped()) {
    auto it = jobs_.find(id);
    if (it == jobs_.end()) continue;  // ended meanwhile (canceled, expired)
    Job& job = *it->second;
    job.compiling.erase(done.arch);
    job.compile_us += done.info.wall_us;
    job.cache_hit = job.cache_hit && done.info.cache_hit();
    if (job.state != JobState::kQueued) continue;
    if (!done.result.ok()) {
      scheduler_.Remove(id);
      Finish(job, JobState::kFailed, done.result.status().code(),
             "compile for " + done.arch + ": " + done.result.status().message());
      continue;
    }
    const EntryPtr& entry = *done.result;
    if (!entry->ok) {
      scheduler_.Remove(id);
      Finish(job, JobState::kFailed, entry->code, entry->log);
      continue;
    }
    const std::string symbol = entry->Symbol(job.spec.kernel.entry);
    if (!entry->HasKernel(symbol)) {
      scheduler_.Remove(id);
      Finish(job, JobState::kFailed, Code::kInvalid,
             "no kernel named '" + job.spec.kernel.entry +
                 "' in the compiled source (is it extern \"C\" __global__, or should 'expr' be "
                 "set for a C++ name?)");
      continue;
    }
    job.modules[done.arch] = entry;
  }
}

bool Broker::Impl::Eligible(Job& job, const Worker& w) {
  const schema::Placement& p = job.spec.placement;
  if (!p.arch.empty() && p.arch != w.arch) return false;
  if (!p.gpu.empty() && p.gpu != w.device.uuid) return false;
  if (p.min_free_bytes && w.device.free_bytes < p.min_free_bytes) return false;
  if (job.suspect && !w.inflight.empty()) return false;
  if (!job.modules.count(w.arch)) {
    RequestCompile(job, w.arch);
    return false;
  }
  return true;
}

void Broker::Impl::Dispatch() {
  if (scheduler_.size() == 0) return;
  // Round robin over workers, one job at a time, while any has a slot.
  bool progress = true;
  while (progress && scheduler_.size() > 0) {
    progress = false;
    for (auto it = workers_.begin(); it != workers_.end();) {
      Worker& w = it->second;
      ++it;  // SendJob may lose the worker
      if (w.credits == 0 || w.exclusive) continue;
      auto id = scheduler_.Pop([&](uint64_t jid) {
        auto j = jobs_.find(jid);
        return j != jobs_.end() && Eligible(*j->second, w);
      });
      if (!id) continue;
      SendJob(w, *jobs_[*id]);
      progress = true;
    }
  }
}

void Broker::Impl::SendJob(Worker& w, Job& job) {
  // A worker on another host gets the bytes of the job's local files as
  // frames. Done first: a failure here must leave the worker's state alone.
  Frames file_frames;
  if (!w.local) {
    for (const schema::LocalFile& f : job.input_files) {
      auto frame = MapFile(f.name, f.size);
      if (!frame.ok()) {
        Finish(job, JobState::kFailed, Code::kIoError, frame.status().message());
        return;
      }
      file_frames.push_back(std::move(*frame));
    }
  }
  const EntryPtr& entry = job.modules[w.arch];
  BrokerMessage m;
  m.op = BrokerOp::kJob;
  m.id = job.id;
  m.attempt = ++job.attempts;
  m.module = ToHex(entry->key);
  m.entry = entry->Symbol(job.spec.kernel.entry);
  m.launch = job.spec.launch;
  m.time_limit_ms = job.spec.time_limit_ms;
  m.args = job.spec.args;
  Frames payload;
  if (!w.modules.Touch(m.module)) {
    m.image = entry->cubin.empty() ? schema::ImageKind::kPtx : schema::ImageKind::kCubin;
    const std::string& image = entry->cubin.empty() ? entry->ptx : entry->cubin;
    payload.emplace_back(image.data(), image.size());
    for (auto& a : m.args) {
      if (a.kind == schema::ArgKind::kIn || a.kind == schema::ArgKind::kInOut) ++a.frame;
    }
  }
  for (auto& in : job.inputs) {
    zmq::message_t copy;
    copy.copy(in);  // shares the buffer: no copy of the bytes
    payload.push_back(std::move(copy));
  }
  if (w.local) {
    m.files = job.input_files;
    if (job.spec.local_out) m.out_dir = store_->blob_dir();
  } else {
    for (auto& f : file_frames) payload.push_back(std::move(f));
  }
  job.state = JobState::kDispatched;
  job.worker = w.id;
  job.dispatched = Clock::now();
  w.inflight.insert(job.id);
  --w.credits;
  if (job.suspect) w.exclusive = true;
  queued_bytes_ -= std::min(queued_bytes_, job.input_bytes);
  // The attempt count is stored when the job is requeued or ends, not here:
  // a write per dispatch would cost a commit per job, and after a broker
  // restart the job runs again anyway.
  if (!SendWorker(w.id, m, &payload)) WorkerLost(w.id, "unreachable");
}

bool Broker::Impl::SendWorker(const std::string& id, const BrokerMessage& m, Frames* payload) {
  const std::string header = schema::EncodeBrokerMessage(m);
  const bool has_payload = payload && !payload->empty();
  try {
    if (!worker_sock_.send(zmq::buffer(id), zmq::send_flags::sndmore | zmq::send_flags::dontwait)) {
      return false;
    }
    worker_sock_.send(zmq::buffer(schema::kWorkerProtocol), zmq::send_flags::sndmore);
    worker_sock_.send(zmq::buffer(header),
                  has_payload ? zmq::send_flags::sndmore : zmq::send_flags::none);
    if (has_payload) {
      for (size_t i = 0; i < payload->size(); ++i) {
        worker_sock_.send((*payload)[i], i + 1 < payload->size() ? zmq::send_flags::sndmore
                                                             : zmq::send_flags::none);
      }
    }
    return true;
  } catch (const zmq::error_t& e) {
    spdlog::warn("worker {} unreachable: {}", Printable(id), e.what());
    return false;
  }
}

Status Broker::Impl::CheckLocalFiles(const std::vector<schema::LocalFile>& files,
                                     const char* prefix) const {
  for (const schema::LocalFile& f : files) {
    // The prefix keeps a peer from naming the store's own files (another
    // job's buffers).
    if (f.name.rfind(prefix, 0) != 0) {
      return Error(Code::kInvalid, "local file '" + f.name + "' must be named " + prefix + "...");
    }
    const std::string path = store_->blob_dir() + "/" + f.name;
    const int fd = open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return Error(Code::kInvalid, "local file " + path + ": " + strerror(errno));
    struct stat st {};
    const bool ok = fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_nlink == 1;
    close(fd);
    if (!ok) return Error(Code::kInvalid, "local file " + path + " is not a plain file");
    if (static_cast<uint64_t>(st.st_size) != f.size) {
      return Error(Code::kInvalid, "local file " + path + " holds " + std::to_string(st.st_size) +
                                       " bytes, not the " + std::to_string(f.size) + " named");
    }
  }
  return Status::Ok();
}

void Broker::Impl::DropLocalFiles(const std::vector<schema::LocalFile>& files,
                                  const char* prefix) const {
  for (const schema::LocalFile& f : files) {
    if (f.name.rfind(prefix, 0) == 0) (void)unlink((local_dir_ + "/" + f.name).c_str());
  }
}

StatusOr<zmq::message_t> Broker::Impl::MapFile(const std::string& path, uint64_t size) {
  if (size == 0) return zmq::message_t();
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Error(Code::kIoError, path + ": " + strerror(errno));
  void* p = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (p == MAP_FAILED) return Error(Code::kIoError, "mapping " + path + ": " + strerror(errno));
  return zmq::message_t(
      p, size, [](void* data, void* hint) { munmap(data, reinterpret_cast<uintptr_t>(hint)); },
      reinterpret_cast<void*>(static_cast<uintptr_t>(size)));
}

void Broker::Impl::Finish(Job& job, JobState state, Code code, std::string error,
                          const schema::Timing& worker_timing, std::vector<uint32_t> outputs,
                          std::vector<zmq::message_t> data, const std::string& device,
                          std::vector<schema::LocalFile> files) {
  const auto now = Clock::now();
  schema::Timing t = worker_timing;
  const bool ran = job.state == JobState::kDispatched;
  t.queue_us = UsBetween(job.accepted, ran ? job.dispatched : now);
  t.compile_us = job.compile_us;
  t.cache_hit = job.cache_hit && !job.modules.empty();
  t.total_us = UsBetween(job.accepted, now);
  if (state == JobState::kQueued || state == JobState::kDispatched) state = JobState::kFailed;

  if (job.state == JobState::kQueued) queued_bytes_ -= std::min(queued_bytes_, job.input_bytes);
  if (ran) {
    auto w = workers_.find(job.worker);
    // The slot stays taken until the worker answers (see OnWorkerResult).
    if (w != workers_.end() && state != JobState::kCanceled) w->second.inflight.erase(job.id);
  }
  StoredResult r;
  r.id = job.id;
  r.state = state;
  r.code = state == JobState::kDone || state == JobState::kCanceled ? Code::kOk : code;
  if (state == JobState::kCanceled) r.code = Code::kOk;
  r.error = r.code == Code::kOk ? "" : std::move(error);
  r.device = device;
  r.attempts = job.attempts;
  r.timing = t;
  r.outputs = outputs;
  std::vector<std::string_view> views;
  for (auto& d : data) views.push_back(View(d));
  if (Status s = EnsureTransaction(); s.ok()) {
    s = store_->Finish(r, views, NowMs(), job.inputs.size() + job.input_files.size(), files);
    if (!s.ok()) {
      spdlog::critical("job {}: cannot store its result: {}", job.id, s.ToString());
      commit_failed_ = true;
    }
  } else {
    commit_failed_ = true;
  }
  const std::string outcome = state == JobState::kFailed ? std::string(CodeName(r.code))
                                                          : std::string(JobStateName(state));
  ++counters_.finished[outcome];
  if (state == JobState::kDone) {
    auto& lat = counters_.latency;
    lat["queue"].Observe(t.queue_us);
    lat["load"].Observe(t.load_us);
    lat["h2d"].Observe(t.h2d_us);
    lat["kernel"].Observe(t.kernel_us);
    lat["d2h"].Observe(t.d2h_us);
    lat["total"].Observe(t.total_us);
  }
  if (state == JobState::kFailed) {
    spdlog::info("job {} failed: {}: {}", job.id, CodeName(r.code),
                 r.error.substr(0, r.error.find('\n')));
  }
  // Push the result to its client (after the commit).
  Outgoing o;
  o.client = job.client;
  o.reply.op = ReplyOp::kResult;
  o.reply.rid = 0;
  o.reply.id = job.id;
  o.reply.state = state;
  o.reply.code = r.code;
  o.reply.error = r.error;
  o.reply.attempts = job.attempts;
  o.reply.device = device;
  o.reply.timing = t;
  o.reply.outputs = std::move(outputs);
  for (size_t i = 0; i < files.size(); ++i) {
    o.reply.files.push_back({store_->OutputPath(job.id, data.size() + i), files[i].size});
  }
  o.payload = std::move(data);
  outgoing_.push_back(std::move(o));
  if (!job.key.empty()) keys_.erase({job.tenant, job.key});
  job.state = state;
  jobs_.erase(job.id);  // `job` is gone from here on
}

// ---------------------------------------------------------------- workers

void Broker::Impl::OnWorkerMessage(Frames& frames) {
  if (frames.empty()) return;
  const std::string id(View(frames[0]));
  auto refuse = [&](const Status& s) {
    BrokerMessage m;
    m.op = BrokerOp::kError;
    m.code = s.code();
    m.error = s.message();
    SendWorker(id, m);
  };
  if (frames.size() < 3) {
    return refuse(Error(Code::kMalformed, "a message is [protocol, header, payload...]"));
  }
  if (Status s = schema::CheckProtocolFrame(View(frames[1]), schema::kWorkerProtocol); !s.ok()) {
    return refuse(s);
  }
  std::vector<uint64_t> sizes;
  for (size_t i = 3; i < frames.size(); ++i) sizes.push_back(frames[i].size());
  WorkerMessage m;
  if (Status s = schema::DecodeWorkerMessage(View(frames[2]), sizes, opt_.limits, &m); !s.ok()) {
    return refuse(s);
  }
  auto it = workers_.find(id);
  if (m.op == WorkerOp::kReady) {
    if (it != workers_.end()) WorkerLost(id, "it registered again");
    Worker& w = workers_[id];
    w.id = id;
    w.name = m.worker;
    w.device = m.device;
    w.arch = m.device.Arch();
    w.slots = w.credits = std::max<uint32_t>(1, m.slots);
    w.modules = ModuleSet(m.module_slots);
    w.last_seen = Clock::now();
    w.local = !m.local_dir.empty() && m.local_dir == store_->blob_dir();
    WorkersChanged();
    spdlog::info("worker {} ready: {} ({}, {}), {} slots", w.name, w.device.name, w.arch,
                 w.device.uuid, w.slots);
    // Queued jobs may now need this architecture.
    for (auto& [jid, job] : jobs_) {
      if (job->state == JobState::kQueued &&
          (job->spec.placement.arch.empty() || job->spec.placement.arch == w.arch)) {
        RequestCompile(*job, w.arch);
      }
    }
    return;
  }
  if (it == workers_.end()) {
    // A worker from before a broker restart, or one declared gone.
    BrokerMessage bye;
    bye.op = BrokerOp::kDisconnect;
    bye.error = "unknown worker: send ready";
    SendWorker(id, bye);
    return;
  }
  Worker& w = it->second;
  w.last_seen = Clock::now();
  switch (m.op) {
    case WorkerOp::kHeartbeat:
      w.device.free_bytes = m.free_bytes;
      return;
    case WorkerOp::kResult:
      OnWorkerResult(w, m, frames);
      return;
    case WorkerOp::kDisconnect:
      WorkerLost(id, "it disconnected: " + m.reason);
      return;
    case WorkerOp::kReady:
      return;
  }
}

void Broker::Impl::OnWorkerResult(Worker& w, WorkerMessage& m, Frames& frames) {
  // The slot frees whatever became of the job (it may have been canceled).
  w.inflight.erase(m.id);
  w.credits = std::min(w.slots, w.credits + 1);
  w.exclusive = false;
  auto drop_files = [&] { DropLocalFiles(m.files, "w-"); };
  auto it = jobs_.find(m.id);
  if (it == jobs_.end()) return drop_files();  // canceled meanwhile, or a stale result
  Job& job = *it->second;
  if (job.state != JobState::kDispatched || job.worker != w.id || job.attempts != m.attempt) {
    return drop_files();  // from an earlier attempt
  }
  std::vector<zmq::message_t> data;
  for (size_t i = 3; i < frames.size(); ++i) data.push_back(std::move(frames[i]));
  if (!m.files.empty()) {
    Status s = w.local && job.spec.local_out
                   ? CheckLocalFiles(m.files, "w-")
                   : Error(Code::kInternal, "the worker returned files it was not asked for");
    if (!s.ok()) {
      drop_files();
      Finish(job, JobState::kFailed, Code::kInternal, "worker " + w.name + ": " + s.message());
      return;
    }
  }
  if (m.state == JobState::kDone) job.suspect = false;
  Finish(job, m.state, m.code, std::move(m.error), m.timing, std::move(m.outputs),
         std::move(data), w.device.uuid, std::move(m.files));
}

void Broker::Impl::WorkerLost(const std::string& id, const std::string& why) {
  auto it = workers_.find(id);
  if (it == workers_.end()) return;
  Worker w = std::move(it->second);
  workers_.erase(it);
  WorkersChanged();
  ++counters_.workers_lost;
  spdlog::warn("worker {} ({}) is gone: {}; {} jobs were in flight", w.name, w.device.uuid, why,
               w.inflight.size());
  const bool alone = w.inflight.size() == 1;
  for (uint64_t jid : w.inflight) {
    auto j = jobs_.find(jid);
    if (j == jobs_.end()) continue;
    Job& job = *j->second;
    if (job.state != JobState::kDispatched || job.worker != id) continue;
    if (w.local && job.spec.local_out) {
      // The output files the lost attempt may have begun (w-ID-ATTEMPT-ARG).
      for (size_t a = 0; a < job.spec.args.size(); ++a) {
        const schema::ArgKind k = job.spec.args[a].kind;
        if (k != schema::ArgKind::kOut && k != schema::ArgKind::kInOut) continue;
        (void)unlink((store_->blob_dir() + "/w-" + std::to_string(job.id) + "-" +
                      std::to_string(job.attempts) + "-" + std::to_string(a))
                         .c_str());
      }
    }
    // A job that was alone on a worker that died is the culprit; jobs that
    // shared it are suspects, replayed one at a time.
    if (job.suspect && alone) {
      Finish(job, JobState::kFailed, Code::kKernelFault,
             "its worker died while running it alone (" + why + ")");
      continue;
    }
    if (job.attempts >= opt_.max_attempts) {
      Finish(job, JobState::kFailed, Code::kUnavailable,
             "lost with its worker " + std::to_string(job.attempts) + " times (" + why + ")");
      continue;
    }
    // Requeued as a suspect: it runs alone next time, and is judged then.
    job.suspect = true;
    ++counters_.requeued;
    if (EnsureTransaction().ok()) (void)store_->SetAttempts(job.id, job.attempts, job.suspect);
    job.state = JobState::kQueued;
    job.worker.clear();
    queued_bytes_ += job.input_bytes;
    scheduler_.Push(job.id, job.tenant, job.priority);
  }
}

// ---------------------------------------------------------------- stats

StatsSnapshot Broker::Impl::Snapshot() {
  StatsSnapshot s = counters_;
  s.queued = scheduler_.size();
  s.queued_by_priority = scheduler_.SizeByPriority();
  s.queued_by_tenant = scheduler_.SizeByTenant();
  for (const auto& [id, job] : jobs_) {
    if (job->state == JobState::kDispatched) ++s.inflight;
    if (!job->compiling.empty()) ++s.compiling;
  }
  s.workers = WorkerViews();
  for (const auto& v : s.workers) s.inflight_by_worker[v.worker] = v.inflight;
  auto cache = compiler_->cache().Stats();
  if (cache.ok()) {
    s.cache_entries = cache->entries;
    s.cache_bytes = cache->bytes;
  }
  s.uptime_s = std::chrono::duration<double>(Clock::now() - started_).count();
  return s;
}

std::vector<schema::WorkerView> Broker::Impl::WorkerViews() const {
  std::vector<schema::WorkerView> views;
  const auto now = Clock::now();
  for (const auto& [id, w] : workers_) {
    schema::WorkerView v;
    v.worker = w.name;
    v.device = w.device;
    v.slots = w.slots;
    v.inflight = static_cast<uint32_t>(w.inflight.size());
    v.heartbeat_age_ms = static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::milliseconds>(now - w.last_seen).count());
    views.push_back(std::move(v));
  }
  return views;
}

void Broker::Impl::RenderStats() {
  if (!http_) return;
  std::string text = PrometheusText(Snapshot());
  std::lock_guard lock(render_mu_);
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
const std::string& Broker::client_endpoint() const { return impl_->client_endpoint_; }
const std::string& Broker::local_dir() const { return impl_->local_dir_; }
const std::string& Broker::worker_endpoint() const { return impl_->worker_endpoint_; }
int Broker::metrics_port() const { return impl_->metrics_port_; }
size_t Broker::resumed() const { return impl_->resumed_; }

}  // namespace gpuq::broker
