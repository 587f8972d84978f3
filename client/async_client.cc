// AsyncClient: the C++ client with futures and callbacks, one I/O thread.
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "gpuq/client.h"
#include "client/connection.h"
#include "schema/codec.h"

namespace gpuq {

using schema::ClientOp;
using schema::ClientReply;
using schema::ClientRequest;
using schema::ReplyOp;
using Clock = std::chrono::steady_clock;
using client_internal::ToResult;
using ResultCallback = std::function<void(StatusOr<JobResult>)>;


class AsyncClient::Impl {
 public:
  explicit Impl(ClientOptions o) : opt_(std::move(o)) {}

  Status Open(const std::string& endpoint) {
    local_possible_ = opt_.local_buffers && endpoint.rfind("ipc://", 0) == 0;
    wake_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (wake_ < 0) return Error(Code::kResourceExhausted, "eventfd failed");
    GPUQ_ASSIGN_OR_RETURN(sock_, client_internal::ConnectDealer(ctx_, endpoint, opt_, 'f'));
    thread_ = std::thread([this] { Loop(); });
    return Status::Ok();
  }

  ~Impl() {
    stop_ = true;
    Wake();
    if (thread_.joinable()) thread_.join();
    if (wake_ >= 0) close(wake_);
  }

  // Called from any thread: queue for the I/O thread.
  struct Outgoing {
    ClientRequest request;
    std::vector<std::string> payload;  // copies: the caller may reuse its buffers
    std::vector<std::string> files;    // local files made for a submit
    std::promise<StatusOr<uint64_t>> submitted;  // submit
    std::promise<std::string> local_dir;         // devices: the broker's local directory
    uint64_t result_of = 0;                      // result fetch for this job id
    bool refetch = false;                        // a fetch again: its timeout is no answer
  };

  std::future<StatusOr<uint64_t>> Submit(const JobRequest& job) {
    auto o = std::make_unique<Outgoing>();
    o->request.op = ClientOp::kSubmit;
    o->request.job = job.spec;
    std::vector<std::string_view> frames = job.inputs;
    bool large = false;
    for (std::string_view in : job.inputs) large |= in.size() >= opt_.local_min_bytes;
    for (const schema::Arg& a : job.spec.buffer_list()) {
      large |= a.kind == schema::ArgKind::kOut && !a.in_region() && a.size >= opt_.local_min_bytes;
    }
    if (large && local_possible_) {
      // Local buffers: large inputs become files of the broker's local
      // directory, written here instead of copied.
      const std::string dir = LocalDir();
      if (!dir.empty()) {
        frames.clear();
        auto made = client_internal::UseLocalFiles(dir, opt_.local_min_bytes, job.inputs,
                                                   &o->request.job, &frames);
        if (!made.ok()) {
          std::promise<StatusOr<uint64_t>> failed;
          failed.set_value(made.status());
          return failed.get_future();
        }
        o->files = std::move(*made);
      }
    }
    for (auto in : frames) o->payload.emplace_back(in);
    auto f = o->submitted.get_future();
    Enqueue(std::move(o));
    return f;
  }

  // The broker's local directory ("" when none or no answer), asked once;
  // waits for the answer (up to the timeout) the first time.
  std::string LocalDir() {
    std::lock_guard lock(local_mu_);
    if (!local_dir_) {
      auto o = std::make_unique<Outgoing>();
      o->request.op = ClientOp::kDevices;
      auto f = o->local_dir.get_future();
      Enqueue(std::move(o));
      if (f.wait_for(opt_.timeout) != std::future_status::ready) return "";
      local_dir_ = f.get();
    }
    return *local_dir_;
  }

  void OnResult(uint64_t id, ResultCallback done) {
    auto o = std::make_unique<Outgoing>();
    o->request.op = ClientOp::kResult;
    o->request.id = id;
    o->result_of = id;
    {
      std::lock_guard lock(mu_);
      waiters_[id].push_back(std::move(done));
    }
    Enqueue(std::move(o));
  }

 private:
  void Wake() {
    uint64_t one = 1;
    (void)!write(wake_, &one, sizeof one);
  }
  void Enqueue(std::unique_ptr<Outgoing> o) {
    {
      std::lock_guard lock(mu_);
      queue_.push_back(std::move(o));
    }
    Wake();
  }

  // Pending request, by rid (I/O thread only).
  struct Pending {
    std::unique_ptr<Outgoing> out;
    Clock::time_point deadline;
  };

  // A result is pushed only to the connection that submitted the job, in
  // the broker's lifetime: after a reconnect, a broker restart, or a push
  // dropped because this client did not read, only a fetch finds it. So the
  // results waited for are fetched again, each at most once a second and at
  // most kRefetchBatch a round.
  static constexpr auto kRefetchInterval = std::chrono::seconds(1);
  static constexpr size_t kRefetchBatch = 256;
  void Refetch(std::map<uint64_t, Pending>& pending, uint64_t& rid,
               std::map<uint64_t, Clock::time_point>& last_fetch) {
    std::vector<uint64_t> waited;
    {
      std::lock_guard lock(mu_);
      for (const auto& [id, cbs] : waiters_) waited.push_back(id);
    }
    std::set<uint64_t> fetching;
    for (const auto& [r, p] : pending) {
      if (p.out->result_of) fetching.insert(p.out->result_of);
    }
    const auto now = Clock::now();
    std::map<uint64_t, Clock::time_point> kept;
    size_t sent = 0;
    for (uint64_t id : waited) {
      auto last = last_fetch.find(id);
      Clock::time_point when = last == last_fetch.end() ? now : last->second;
      if (!fetching.count(id) && now - when >= kRefetchInterval && sent < kRefetchBatch) {
        auto o = std::make_unique<Outgoing>();
        o->request.op = ClientOp::kResult;
        o->request.id = id;
        o->result_of = id;
        o->refetch = true;
        Send(std::move(o), pending, rid);
        ++sent;
        when = now;
      }
      kept[id] = when;
    }
    last_fetch.swap(kept);
  }

  void Send(std::unique_ptr<Outgoing> o, std::map<uint64_t, Pending>& pending, uint64_t& rid) {
    o->request.rid = ++rid;
    const std::vector<std::string_view> payload(o->payload.begin(), o->payload.end());
    if (Status s = client_internal::SendRequest(sock_, schema::EncodeClientRequest(o->request),
                                                payload);
        !s.ok()) {
      if (o->request.op == ClientOp::kSubmit) {
        for (const std::string& p : o->files) (void)unlink(p.c_str());  // never sent
      }
      return Unanswered(*o, s);
    }
    o->payload.clear();
    pending[rid] = {std::move(o), Clock::now() + opt_.timeout};
  }

  // Resolves a request that will have no answer: a submit or devices call
  // with `why`, a fetch's waiters too (a refetch's wait goes on).
  void Unanswered(Outgoing& o, const Status& why) {
    if (o.request.op == ClientOp::kSubmit) {
      o.submitted.set_value(why);
    } else if (o.request.op == ClientOp::kDevices) {
      o.local_dir.set_value("");
    } else if (!o.refetch) {
      Deliver(o.result_of, why);
    }
  }

  void Loop() {
    uint64_t rid = 0;
    std::map<uint64_t, Pending> pending;
    std::map<uint64_t, Clock::time_point> last_fetch;  // by job id waited for
    auto next_refetch = Clock::now();
    while (!stop_) {
      zmq::pollitem_t items[] = {{sock_.handle(), 0, ZMQ_POLLIN, 0}, {nullptr, wake_, ZMQ_POLLIN, 0}};
      // A signal that interrupts the poll is an empty turn.
      client_internal::PollOnce(items, 2, std::chrono::milliseconds(50));
      if (items[1].revents) {
        uint64_t n;
        (void)!read(wake_, &n, sizeof n);
      }
      std::deque<std::unique_ptr<Outgoing>> out;
      {
        std::lock_guard lock(mu_);
        out.swap(queue_);
      }
      for (auto& o : out) Send(std::move(o), pending, rid);
      if (Clock::now() >= next_refetch) {
        next_refetch = Clock::now() + std::chrono::milliseconds(200);
        Refetch(pending, rid, last_fetch);
      }
      for (int i = 0; i < 4096; ++i) {
        std::vector<zmq::message_t> frames;
        try {
          if (!zmq::recv_multipart(sock_, std::back_inserter(frames),
                                   zmq::recv_flags::dontwait)) {
            break;
          }
        } catch (const zmq::error_t& e) {
          if (e.num() == EINTR) break;  // the next turn takes it
          throw;
        }
        if (frames.size() < 2) continue;
        std::vector<uint64_t> sizes;
        for (size_t k = 2; k < frames.size(); ++k) sizes.push_back(frames[k].size());
        ClientReply r;
        if (!schema::DecodeClientReply(frames[1].to_string_view(), sizes, limits_, &r).ok()) {
          continue;
        }
        if (r.op == ReplyOp::kResult && r.rid == 0) {
          Deliver(r.id, ToResult(r, frames));
          continue;
        }
        auto it = pending.find(r.rid);
        if (it == pending.end()) continue;
        Outgoing& o = *it->second.out;
        if (o.request.op == ClientOp::kSubmit) {
          if (r.op == ReplyOp::kAccepted) {
            o.submitted.set_value(r.id);
          } else if (r.op == ReplyOp::kError) {
            for (const std::string& p : o.files) (void)unlink(p.c_str());  // not the broker's
            o.submitted.set_value(Error(r.code, r.error));
          } else {
            // Neither taken nor refused: whether the broker has the job (and
            // its files) is not known, so they are left as a timeout leaves them.
            o.submitted.set_value(Error(Code::kInternal,
                                        "the broker answered a submit with a '" +
                                            std::string(schema::ReplyOpName(r.op)) + "' reply"));
          }
        } else if (o.request.op == ClientOp::kDevices) {
          o.local_dir.set_value(r.op == ReplyOp::kDevices ? r.local_dir : "");
        } else if (r.op == ReplyOp::kResult) {
          Deliver(o.result_of, ToResult(r, frames));  // had ended before we asked
        } else if (r.op == ReplyOp::kError) {
          Deliver(o.result_of, Error(r.code, r.error));
        }  // a status reply: not ended yet; a push or a later fetch brings it
        pending.erase(it);
      }
      const auto now = Clock::now();
      for (auto it = pending.begin(); it != pending.end();) {
        if (now < it->second.deadline) {
          ++it;
          continue;
        }
        Unanswered(*it->second.out, Error(Code::kTimeout, "no answer from the broker in time"));
        it = pending.erase(it);
      }
    }
    // Stopping: nothing pending is left unresolved.
    Status gone = Error(Code::kUnavailable, "the client was closed");
    for (auto& [r, p] : pending) {
      if (p.out->request.op == ClientOp::kSubmit) p.out->submitted.set_value(gone);
      if (p.out->request.op == ClientOp::kDevices) p.out->local_dir.set_value("");
    }
    std::map<uint64_t, std::vector<ResultCallback>> waiters;
    {
      std::lock_guard lock(mu_);
      waiters.swap(waiters_);
      for (auto& o : queue_) {
        if (o->request.op == ClientOp::kSubmit) o->submitted.set_value(gone);
        if (o->request.op == ClientOp::kDevices) o->local_dir.set_value("");
      }
    }
    for (auto& [id, cbs] : waiters) {
      for (auto& cb : cbs) cb(gone);
    }
  }

  // Resolves every waiter of job `id` (once: later deliveries find none).
  void Deliver(uint64_t id, StatusOr<JobResult> r) {
    std::vector<ResultCallback> cbs;
    {
      std::lock_guard lock(mu_);
      auto it = waiters_.find(id);
      if (it == waiters_.end()) return;
      cbs = std::move(it->second);
      waiters_.erase(it);
    }
    for (auto& cb : cbs) cb(r);
  }

  ClientOptions opt_;
  bool local_possible_ = false;
  std::mutex local_mu_;
  std::optional<std::string> local_dir_;  // GUARDED_BY(local_mu_)
  schema::Limits limits_;
  zmq::context_t ctx_;
  zmq::socket_t sock_;  // I/O thread only, after Open()
  int wake_ = -1;
  std::atomic<bool> stop_{false};
  std::thread thread_;
  std::mutex mu_;
  std::deque<std::unique_ptr<Outgoing>> queue_;                // GUARDED_BY(mu_)
  std::map<uint64_t, std::vector<ResultCallback>> waiters_;   // GUARDED_BY(mu_)
};

AsyncClient::AsyncClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
AsyncClient::~AsyncClient() = default;

StatusOr<std::unique_ptr<AsyncClient>> AsyncClient::Connect(const std::string& endpoint,
                                                            ClientOptions options) {
  auto impl = std::make_unique<Impl>(std::move(options));
  GPUQ_RETURN_IF_ERROR(impl->Open(endpoint));
  return std::unique_ptr<AsyncClient>(new AsyncClient(std::move(impl)));
}

std::future<StatusOr<uint64_t>> AsyncClient::Submit(const JobRequest& job) {
  return impl_->Submit(job);
}

void AsyncClient::OnResult(uint64_t id, ResultCallback done) {
  impl_->OnResult(id, std::move(done));
}

std::future<StatusOr<JobResult>> AsyncClient::Result(uint64_t id) {
  auto promise = std::make_shared<std::promise<StatusOr<JobResult>>>();
  auto f = promise->get_future();
  OnResult(id, [promise](StatusOr<JobResult> r) { promise->set_value(std::move(r)); });
  return f;
}

}  // namespace gpuq
