#include "gpuq/client.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <random>

#include <cstdlib>
#include <deque>
#include <map>
#include <optional>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "client/connection.h"
#include "schema/region_channel.h"
#include "util/sealed_memfd.h"
#include "schema/codec.h"
#include "schema/filename.h"

namespace gpuq {

namespace {
// How often a waiting client asks again for a result that was not pushed.
constexpr std::chrono::seconds kRefetchInterval{1};
}  // namespace

using schema::ClientOp;
using schema::ClientReply;
using schema::ClientRequest;
using schema::ReplyOp;
using client_internal::SendRequest;
using client_internal::ToResult;
using Clock = std::chrono::steady_clock;

Bytes::Bytes(std::string s) {
  auto owned = std::make_shared<const std::string>(std::move(s));
  data_ = owned->data();
  size_ = owned->size();
  owner_ = std::move(owned);
}

const Bytes* JobResult::Output(uint32_t arg) const {
  for (size_t i = 0; i < output_args.size() && i < outputs.size(); ++i) {
    if (output_args[i] == arg) return &outputs[i];
  }
  return nullptr;
}

std::string DefaultRuntimeFolder() {
  if (const char* x = getenv("XDG_RUNTIME_DIR"); x && *x) return std::string(x) + "/gpuq";
  return "/tmp/gpuq-" + std::to_string(getuid());
}

std::string DefaultEndpoint() {
  if (const char* b = getenv("GPUQ_BROKER"); b && *b) return b;
  return "ipc://" + DefaultRuntimeFolder() + "/broker.sock";
}

class Client::Impl {
 public:
  explicit Impl(ClientOptions o) : opt_(std::move(o)) {}

  Status Open(const std::string& endpoint) {
    GPUQ_ASSIGN_OR_RETURN(socket_, client_internal::ConnectDealer(ctx_, endpoint, opt_, 'c'));
    endpoint_ = endpoint;
    ipc_ = endpoint.rfind("ipc://", 0) == 0;
    local_possible_ = opt_.local_buffers && ipc_;
    return Status::Ok();
  }

  // The request for a submit: large buffers as local files when the broker
  // shares this host. `files` gets the files made for it.
  Status PrepareSubmit(const JobRequest& job, ClientRequest* req,
                       std::vector<std::string_view>* frames, std::vector<std::string>* files) {
    req->op = ClientOp::kSubmit;
    req->job = job.spec;
    bool large = false;
    for (std::string_view in : job.inputs) large |= in.size() >= opt_.local_min_bytes;
    for (const schema::Arg& a : job.spec.buffer_list()) {
      large |= a.kind == schema::ArgKind::kOut && !a.in_region() && a.size >= opt_.local_min_bytes;
    }
    if (large) GPUQ_RETURN_IF_ERROR(LocalDir().status());
    if (!large || !local_dir_ || local_dir_->empty()) {
      *frames = job.inputs;
      return Status::Ok();
    }
    GPUQ_ASSIGN_OR_RETURN(*files,
                          client_internal::UseLocalFiles(*local_dir_, opt_.local_min_bytes,
                                                         job.inputs, &req->job, frames,
                                                         buffers_.get()));
    return Status::Ok();
  }

  // The broker's local directory ("" when none), asked once.
  StatusOr<std::string> LocalDir() {
    if (!local_possible_) return std::string();
    if (!local_dir_) {
      ClientRequest d;
      d.op = ClientOp::kDevices;
      GPUQ_ASSIGN_OR_RETURN(ClientReply r, Call(std::move(d), nullptr));
      local_dir_ = r.local_dir;
    }
    return *local_dir_;
  }

  uint64_t NextRid() { return ++rid_; }

  // The region channel, opened on the first NewRegion.
  StatusOr<std::shared_ptr<client_internal::RegionChannel>> Regions() {
    if (regions_ && regions_->fd.valid()) return regions_;
    if (!ipc_) return Error(Code::kInvalid, "regions need the broker's ipc endpoint");
    if (!local_dir_) {
      ClientRequest d;
      d.op = ClientOp::kDevices;
      GPUQ_ASSIGN_OR_RETURN(ClientReply r, Call(std::move(d), nullptr));
      local_dir_ = r.local_dir;
    }
    if (local_dir_->empty()) {
      return Error(Code::kUnavailable, "the broker has no local directory for regions");
    }
    auto fd = schema::ConnectRegionChannel(*local_dir_, "");
    if (!fd.ok()) {
      return Error(Code::kUnavailable, "the broker's region channel: " + fd.status().message());
    }
    regions_ = std::make_shared<client_internal::RegionChannel>();
    regions_->fd = std::move(*fd);
    regions_->timeout = opt_.timeout;
    return regions_;
  }
  std::shared_ptr<client_internal::RegionChannel> regions_;
  std::string endpoint_;
  bool ipc_ = false;

  Status Send(const ClientRequest& req, const std::vector<std::string_view>& payload = {}) {
    return SendRequest(socket_, schema::EncodeClientRequest(req), payload);
  }

  // Receives one message into `reply` and `frames`, waiting until `deadline`.
  Status Receive(Clock::time_point deadline, ClientReply* reply,
                 std::vector<zmq::message_t>* frames) {
    // With opt_.spin, poll awake first: an answer that comes within it costs
    // no thread wake-up.
    const auto spin_until = Clock::now() + opt_.spin;
    for (;;) {
      auto left = std::chrono::duration_cast<Millis>(deadline - Clock::now());
      if (left.count() < 0) left = Millis(0);
      const bool spinning = Clock::now() < spin_until && left.count() > 0;
      if (spinning) left = Millis(0);
      zmq::pollitem_t item = {socket_.handle(), 0, ZMQ_POLLIN, 0};
      try {
        zmq::poll(&item, 1, left);
      } catch (const zmq::error_t& e) {
        if (e.num() == EINTR) continue;
        return Error(Code::kUnavailable, e.what());
      }
      if (!(item.revents & ZMQ_POLLIN) && spinning) continue;
      if (!(item.revents & ZMQ_POLLIN)) {
        return Error(Code::kTimeout, "no answer from the broker in time");
      }
      frames->clear();
      if (!zmq::recv_multipart(socket_,
                               std::back_inserter(*frames), zmq::recv_flags::dontwait)) {
        continue;
      }
      if (frames->size() < 2) continue;
      std::vector<uint64_t> sizes;
      for (size_t i = 2; i < frames->size(); ++i) sizes.push_back((*frames)[i].size());
      if (!schema::CheckProtocolFrame((*frames)[0].to_string_view(), schema::kClientProtocol)
               .ok()) {
        continue;
      }
      Status s = schema::DecodeClientReply((*frames)[1].to_string_view(), sizes, limits_, reply);
      if (!s.ok()) return s.WithContext("reply from the broker");
      return Status::Ok();
    }
  }

  // Files a message that is not the awaited one as an event.
  void Keep(ClientReply& r, std::vector<zmq::message_t>& frames) {
    Event e;
    switch (r.op) {
      case ReplyOp::kAccepted:
        pending_files_.erase(r.rid);  // the broker took them
        e.kind = Event::kAccepted;
        e.rid = r.rid;
        e.id = r.id;
        e.existing = r.existing;
        break;
      case ReplyOp::kError:
        DropFiles(r.rid);
        e.kind = Event::kRejected;
        e.rid = r.rid;
        e.id = r.id;
        e.error = Error(r.code, r.error);
        e.retry_after_ms = r.retry_after_ms;
        break;
      case ReplyOp::kResult:
        if (r.rid != 0) return;  // a fetch nobody waits for any more
        e.kind = Event::kResult;
        e.id = r.id;
        e.result = ToResult(r, frames);
        break;
      default:
        return;  // a late answer to a request that timed out
    }
    events_.push_back(std::move(e));
    BoundKeptResults();
  }

  // Pushed results nobody has taken are bounded (kMaxKeptResults, and
  // kMaxKeptResultBytes of outputs): past either, the oldest go, as the
  // broker drops the pushes of a client that does not read. A dropped
  // result is fetched (Fetch, Wait).
  static constexpr size_t kMaxKeptResults = 1024;
  static constexpr uint64_t kMaxKeptResultBytes = 256ull << 20;
  static uint64_t OutputBytes(const Event& e) {
    uint64_t n = 0;
    for (const Bytes& b : e.result.outputs) n += b.size();
    return n;
  }
  void BoundKeptResults() {
    size_t count = 0;
    uint64_t bytes = 0;
    for (const Event& e : events_) {
      if (e.kind != Event::kResult) continue;
      ++count;
      bytes += OutputBytes(e);
    }
    for (auto it = events_.begin();
         it != events_.end() && (count > kMaxKeptResults || bytes > kMaxKeptResultBytes);) {
      if (it->kind != Event::kResult) {
        ++it;
        continue;
      }
      --count;
      bytes -= OutputBytes(*it);
      it = events_.erase(it);
    }
  }
  // Job `id`'s pushed results, once its result has been taken another way.
  void ForgetResults(uint64_t id) {
    std::erase_if(events_, [id](const Event& e) { return e.kind == Event::kResult && e.id == id; });
  }

  // A status or result request for job `id`, answered as a JobResult.
  StatusOr<JobResult> AboutJob(ClientOp op, uint64_t id) {
    ClientRequest req;
    req.op = op;
    req.id = id;
    std::vector<zmq::message_t> frames;
    GPUQ_ASSIGN_OR_RETURN(ClientReply r, Call(std::move(req), &frames));
    return ToResult(r, frames);
  }

  // Sends `req` and waits for the reply with its rid.
  StatusOr<ClientReply> Call(ClientRequest req, std::vector<zmq::message_t>* frames_out,
                             const std::vector<std::string_view>& payload = {}) {
    req.rid = NextRid();
    GPUQ_RETURN_IF_ERROR(Send(req, payload));
    const auto deadline = Clock::now() + opt_.timeout;
    for (;;) {
      ClientReply r;
      std::vector<zmq::message_t> frames;
      GPUQ_RETURN_IF_ERROR(Receive(deadline, &r, &frames));
      if (r.rid == req.rid) {
        if (frames_out) *frames_out = std::move(frames);
        if (r.op == ReplyOp::kError) return Error(r.code, r.error);
        return r;
      }
      Keep(r, frames);
    }
  }

  // A refused submit's local files (the broker removes those it read).
  void DropFiles(uint64_t rid) {
    auto it = pending_files_.find(rid);
    if (it == pending_files_.end()) return;
    for (const std::string& p : it->second) (void)unlink(p.c_str());
    pending_files_.erase(it);
  }

  ClientOptions opt_;
  bool local_possible_ = false;
  std::optional<std::string> local_dir_;  // learned on the first large submit
  std::map<uint64_t, std::vector<std::string>> pending_files_;  // by submit rid
  std::shared_ptr<client_internal::LocalBuffers> buffers_ =
      std::make_shared<client_internal::LocalBuffers>();
  zmq::context_t ctx_;
  zmq::socket_t socket_;
  schema::Limits limits_;
  uint64_t rid_ = 0;
  std::deque<Event> events_;
};

Client::Client(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Client::~Client() = default;

StatusOr<std::unique_ptr<Client>> Client::Connect(const std::string& endpoint,
                                                  ClientOptions options) {
  auto impl = std::make_unique<Impl>(std::move(options));
  GPUQ_RETURN_IF_ERROR(impl->Open(endpoint));
  return std::unique_ptr<Client>(new Client(std::move(impl)));
}

StatusOr<uint64_t> Client::Submit(const JobRequest& job) {
  GPUQ_ASSIGN_OR_RETURN(uint64_t rid, SubmitAsync(job));
  const auto deadline = Clock::now() + impl_->opt_.timeout;
  for (;;) {
    ClientReply r;
    std::vector<zmq::message_t> frames;
    GPUQ_RETURN_IF_ERROR(impl_->Receive(deadline, &r, &frames));
    if (r.rid == rid && r.op == ReplyOp::kAccepted) {
      impl_->pending_files_.erase(rid);
      return r.id;
    }
    if (r.rid == rid && r.op == ReplyOp::kError) {
      impl_->DropFiles(rid);
      return Error(r.code, r.error);
    }
    impl_->Keep(r, frames);
  }
}

StatusOr<uint64_t> Client::SubmitAsync(const JobRequest& job) {
  ClientRequest req;
  std::vector<std::string_view> frames;
  std::vector<std::string> files;
  GPUQ_RETURN_IF_ERROR(impl_->PrepareSubmit(job, &req, &frames, &files));
  req.rid = impl_->NextRid();
  if (Status s = impl_->Send(req, frames); !s.ok()) {
    for (const std::string& p : files) (void)unlink(p.c_str());
    return s;
  }
  if (!files.empty()) impl_->pending_files_[req.rid] = std::move(files);
  return req.rid;
}

StatusOr<Client::Event> Client::Poll(Millis timeout) {
  const auto deadline = Clock::now() + timeout;
  while (impl_->events_.empty()) {
    ClientReply r;
    std::vector<zmq::message_t> frames;
    GPUQ_RETURN_IF_ERROR(impl_->Receive(deadline, &r, &frames));
    impl_->Keep(r, frames);
  }
  Event e = std::move(impl_->events_.front());
  impl_->events_.pop_front();
  return e;
}

StatusOr<JobResult> Client::Wait(uint64_t id, std::optional<Millis> timeout) {
  auto& events = impl_->events_;
  auto kept = [&]() -> std::optional<JobResult> {
    for (auto it = events.begin(); it != events.end(); ++it) {
      if (it->kind == Event::kResult && it->id == id) {
        JobResult r = std::move(it->result);
        events.erase(it);
        return r;
      }
    }
    return std::nullopt;
  };
  const auto deadline = Clock::now() + timeout.value_or(impl_->opt_.timeout);
  // A result is pushed only to the connection that submitted the job, in
  // the broker's lifetime: after a reconnect, a broker restart, or a push
  // dropped because this client was not reading, only a fetch finds it. So
  // the result is fetched first, and again every second while waiting.
  for (;;) {
    if (auto r = kept()) return std::move(*r);
    GPUQ_ASSIGN_OR_RETURN(JobResult fetched, Fetch(id));
    if (schema::IsTerminal(fetched.state)) {
      // Its push, if it came meanwhile, is the same result: not kept twice.
      impl_->ForgetResults(id);
      return fetched;
    }
    if (auto r = kept()) return std::move(*r);
    const auto refetch = std::min(deadline, Clock::now() + kRefetchInterval);
    for (;;) {
      ClientReply r;
      std::vector<zmq::message_t> frames;
      Status s = impl_->Receive(refetch, &r, &frames);
      if (s.code() == Code::kTimeout) {
        if (Clock::now() >= deadline) return s;
        break;  // fetch again
      }
      GPUQ_RETURN_IF_ERROR(s);
      if (r.op == ReplyOp::kResult && r.rid == 0 && r.id == id) return ToResult(r, frames);
      impl_->Keep(r, frames);
    }
  }
}

StatusOr<JobResult> Client::GetStatus(uint64_t id) { return impl_->AboutJob(ClientOp::kStatus, id); }

StatusOr<JobResult> Client::Fetch(uint64_t id) { return impl_->AboutJob(ClientOp::kResult, id); }

StatusOr<schema::JobState> Client::Cancel(uint64_t id) {
  ClientRequest req;
  req.op = ClientOp::kCancel;
  req.id = id;
  GPUQ_ASSIGN_OR_RETURN(ClientReply r, impl_->Call(std::move(req), nullptr));
  return r.state;
}

StatusOr<std::string> Client::Stats() {
  ClientRequest req;
  req.op = ClientOp::kStats;
  GPUQ_ASSIGN_OR_RETURN(ClientReply r, impl_->Call(std::move(req), nullptr));
  return std::move(r.stats);
}

InputBuffer::~InputBuffer() {
  if (path_.empty()) return;
  auto* live = static_cast<client_internal::LocalBuffers*>(registry_.get());
  if (live->live.erase(data_) > 0) (void)unlink(path_.c_str());  // never submitted
  if (data_ && size_) munmap(data_, size_);
}

StatusOr<std::unique_ptr<Region>> Client::NewRegion(uint64_t size, const std::string& tenant) {
  GPUQ_ASSIGN_OR_RETURN(std::shared_ptr<client_internal::RegionChannel> ch, impl_->Regions());
  GPUQ_ASSIGN_OR_RETURN(UniqueFd fd, CreateSealedMemfd(size, "gpuq-region"));
  std::unique_ptr<Region> r(new Region());
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  if (p == MAP_FAILED) return Error(Code::kResourceExhausted, std::string("mmap: ") + std::strerror(errno));
  r->data_ = static_cast<char*>(p);
  r->size_ = size;
  schema::RegionMessage m;
  m.op = schema::RegionOp::kRegister;
  m.tenant = tenant;
  m.size = size;
  GPUQ_ASSIGN_OR_RETURN(schema::RegionMessage reply, ch->Call(std::move(m), fd.get()));
  r->id_ = reply.region;
  r->channel_ = ch;
  r->fd_ = fd.Release();
  return r;
}

StatusOr<std::unique_ptr<InputBuffer>> Client::NewInput(size_t size) {
  std::unique_ptr<InputBuffer> b(new InputBuffer());
  b->size_ = size;
  GPUQ_ASSIGN_OR_RETURN(std::string dir, impl_->LocalDir());
  if (dir.empty() || size < impl_->opt_.local_min_bytes) {
    b->memory_.resize(size);
    b->data_ = b->memory_.data();
    return b;
  }
  const std::string name = schema::ClientFileName();
  const std::string path = dir + "/" + name;
  const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return Error(Code::kIoError, path + ": " + std::strerror(errno));
  void* p = MAP_FAILED;
  if (ftruncate(fd, static_cast<off_t>(size)) == 0) {
    p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  }
  const int err = errno;
  close(fd);
  if (p == MAP_FAILED) {
    (void)unlink(path.c_str());
    return Error(Code::kIoError, "mapping " + path + ": " + std::strerror(err));
  }
  b->data_ = static_cast<char*>(p);
  b->path_ = path;
  b->registry_ = impl_->buffers_;
  impl_->buffers_->live[b->data_] = {name, size};
  return b;
}

StatusOr<std::vector<schema::WorkerView>> Client::Devices() {
  ClientRequest req;
  req.op = ClientOp::kDevices;
  GPUQ_ASSIGN_OR_RETURN(ClientReply r, impl_->Call(std::move(req), nullptr));
  return std::move(r.workers);
}

StatusOr<std::vector<schema::TenantUsage>> Client::Usage(const std::string& tenant,
                                                         uint64_t since_ms, uint64_t until_ms) {
  ClientRequest req;
  req.op = ClientOp::kUsage;
  req.tenant = tenant;
  req.since_ms = since_ms;
  req.until_ms = until_ms;
  GPUQ_ASSIGN_OR_RETURN(ClientReply r, impl_->Call(std::move(req), nullptr));
  if (r.op != schema::ReplyOp::kUsage) {
    return Error(Code::kInternal, "the broker answered usage with " +
                                      std::string(schema::ReplyOpName(r.op)));
  }
  return std::move(r.usage);
}

StatusOr<std::unique_ptr<Session>> Client::OpenSession(const SessionOptions& options) {
  ClientRequest req;
  req.op = ClientOp::kSessionOpen;
  req.tenant = options.tenant;
  req.session.placement = options.placement;
  req.session.memory = options.memory;
  req.session.idle_ms = static_cast<uint64_t>(options.idle.count());
  req.session.limit_ms = static_cast<uint64_t>(options.time_limit.count());
  GPUQ_ASSIGN_OR_RETURN(ClientReply r, impl_->Call(std::move(req), nullptr));
  if (r.op != schema::ReplyOp::kSession || r.path.empty()) {
    return Error(Code::kInternal, "the broker answered session_open with " +
                                      std::string(schema::ReplyOpName(r.op)));
  }
  // The session's process listens on the broker's host: a client that
  // reaches the broker other than by ipc goes through it.
  if (options.through_broker || !impl_->ipc_) {
    auto s = Session::ConnectThroughBroker(r.id, r.device, r.token, impl_->endpoint_,
                                           impl_->opt_);
    if (!s.ok()) (void)CloseSession(r.id);
    return s;
  }
  // A session this client cannot reach is closed, not left to count
  // against the tenant's bounds until its idle timeout.
  auto s = Session::Connect(r.id, r.device, r.path, r.token, impl_->opt_.timeout,
                            impl_->opt_.spin);
  if (!s.ok()) (void)CloseSession(r.id);
  return s;
}

Status Client::CloseSession(uint64_t id) {
  ClientRequest req;
  req.op = ClientOp::kSessionClose;
  req.id = id;
  GPUQ_ASSIGN_OR_RETURN(ClientReply r, impl_->Call(std::move(req), nullptr));
  (void)r;
  return Status::Ok();
}

}  // namespace gpuq
