#include "worker/session_host.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include "schema/codec.h"
#include "util/fd.h"
#include "util/sha256.h"
#include "util/unix_socket.h"
#include "worker/exit_codes.h"

namespace gpuq::worker {

using schema::SessionMessage;
using schema::SessionOp;
using Clock = std::chrono::steady_clock;

namespace {

constexpr size_t kMaxPending = 64;   // connections that have not said hello
constexpr size_t kMaxModules = 256;  // kernels kept loaded (oldest dropped)

bool SameToken(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  unsigned char d = 0;
  for (size_t i = 0; i < a.size(); ++i) d |= static_cast<unsigned char>(a[i] ^ b[i]);
  return d == 0;
}

SessionMessage ErrorReply(uint64_t rid, const Status& s) {
  SessionMessage m;
  m.op = SessionOp::kError;
  m.rid = rid;
  m.code = s.code() == Code::kOk ? Code::kInternal : s.code();
  m.error = s.message();
  return m;
}

// Bytes [offset, offset + size) lie within a buffer of `cap` bytes.
bool InRange(uint64_t offset, uint64_t size, uint64_t cap) {
  return offset <= cap && size <= cap - offset;
}

// The kernel a launch names: its source, options, headers and entry.
std::string KernelKey(const schema::KernelSpec& k) {
  Sha256 h;
  auto part = [&](std::string_view s) { h.UpdateField(s); };
  part(k.source);
  for (const auto& o : k.options) part(o);
  part("|");
  for (const auto& hd : k.headers) {
    part(hd.name);
    part(hd.content);
  }
  part(k.entry);
  part(k.name_expression ? "expr" : "extern");
  return ToHex(h.Finish());
}

}  // namespace

class SessionHost::Impl {
 public:
  Impl(SessionHostOptions o, std::unique_ptr<SessionDevice> d)
      : opt_(std::move(o)), device_(std::move(d)), control_reader_(64u << 20),
        wake_(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {}
  int Run();

 private:
  // What a session's completion thread does, in order: wait for `mark`
  // (if any), then send `reply` (a read's bytes from `read`).
  struct Entry {
    SessionMessage reply;
    std::unique_ptr<SessionMark> mark;
    bool timed = false;
    std::shared_ptr<const std::string> keep;  // a write's bytes, until the mark
    std::unique_ptr<std::string> read;
    bool stop = false;
  };
  struct Buffer {
    uint64_t ptr = 0, size = 0;
  };
  struct Session {
    uint64_t id = 0;
    std::string token;
    uint64_t memory = 0, held = 0;
    std::chrono::milliseconds idle{0};
    Clock::time_point last;
    UniqueFd conn;
    std::unique_ptr<FrameReader> reader;
    std::unique_ptr<SessionStream> stream;
    std::map<uint32_t, Buffer> buffers;
    std::optional<SessionMessage> stalled;  // a launch waiting for its module
    uint64_t close_rid = 0;  // its client's close, answered once the broker knows
    bool ending = false;
    Code end_code = Code::kOk;
    std::string end_why;
    // The completion thread and what it waits for.
    std::mutex mu;
    std::condition_variable cv;
    std::deque<Entry> queue;  // guarded by mu
    std::atomic<uint64_t> unanswered{0};
    std::atomic<bool> finished{false};
    std::thread thread;
  };
  struct Pending {
    UniqueFd fd;
    FrameReader reader;
    explicit Pending(UniqueFd f, size_t max) : fd(std::move(f)), reader(max) {}
  };
  struct Module {
    std::shared_ptr<SessionKernel> kernel;
    Status failed;
    bool ready = false;
    std::vector<uint64_t> waiting;  // sessions stalled on it
  };

  size_t MaxFrame() const { return opt_.max_data + (1u << 20); }
  void Control(const SessionMessage& m);
  void OnControl(SessionMessage& m);
  void Open(const SessionMessage& m);
  void OnModule(SessionMessage& m);
  void Accept();
  void OnPending(size_t i);
  bool OnClient(Session& s);  // false: stop reading it for now
  void Handle(Session& s, SessionMessage& m);
  void Launch(Session& s, SessionMessage& m);
  void Push(Session& s, Entry e);
  void Answer(Session& s, uint64_t rid, const Status& st) {
    Entry e;
    e.reply = ErrorReply(rid, st);
    Push(s, std::move(e));
  }
  void Done(Session& s, uint64_t rid) { Done(s, rid, Entry()); }
  void Done(Session& s, uint64_t rid, Entry e);
  void Usage(Session& s);
  void End(Session& s, Code code, std::string why);
  void Reap();
  void Completions(Session* s);
  void Fault(const Status& s);
  void Wake() {
    uint64_t one = 1;
    (void)!write(wake_.get(), &one, sizeof one);
  }

  const SessionHostOptions opt_;
  std::unique_ptr<SessionDevice> device_;
  FrameReader control_reader_;
  UniqueFd wake_;
  UniqueFd listener_;
  std::mutex control_mu_;  // writes to the control channel
  std::map<uint64_t, std::unique_ptr<Session>> sessions_;
  std::vector<std::unique_ptr<Pending>> pending_;
  std::map<std::string, Module> modules_;
  std::deque<std::string> module_order_;
  std::map<uint64_t, std::string> compiling_;  // rid -> module key
  uint64_t next_rid_ = 1;
  // Handles start at a random number per process: another process's
  // handles are almost never this one's.
  uint32_t next_buffer_ = 1 + static_cast<uint32_t>(std::random_device{}() % (1u << 30));
  std::mutex fault_mu_;
  std::optional<Status> fault_;  // guarded by fault_mu_
  std::atomic<bool> faulted_{false};
  bool broker_gone_ = false;
};

SessionHost::SessionHost(SessionHostOptions options, std::unique_ptr<SessionDevice> device)
    : impl_(std::make_unique<Impl>(std::move(options), std::move(device))) {}
SessionHost::~SessionHost() = default;
int SessionHost::Run() { return impl_->Run(); }

void SessionHost::Impl::Control(const SessionMessage& m) {
  std::lock_guard lock(control_mu_);
  if (broker_gone_) return;
  if (Status s = WriteFrame(opt_.control_fd, schema::EncodeSessionMessage(m)); !s.ok()) {
    spdlog::warn("session process: the broker's channel: {}", s.ToString());
  }
}

void SessionHost::Impl::Usage(Session& s) {
  SessionMessage u;
  u.op = SessionOp::kUsage;
  u.session = s.id;
  u.size = s.held;
  Control(u);
}

int SessionHost::Impl::Run() {
  auto l = ListenStream(opt_.socket_path);
  if (!l.ok()) {
    spdlog::error("session process: {}", l.status().ToString());
    return 1;
  }
  listener_ = std::move(*l);
  spdlog::info("session process for tenant '{}' on {} listening at {}", opt_.tenant,
               device_->info().uuid, opt_.socket_path);
  for (;;) {
    std::vector<pollfd> fds = {{opt_.control_fd, POLLIN, 0}, {wake_.get(), POLLIN, 0}};
    if (pending_.size() < kMaxPending) fds.push_back({listener_.get(), POLLIN, 0});
    const size_t first_pending = fds.size();
    for (auto& p : pending_) fds.push_back({p->fd.get(), POLLIN, 0});
    const size_t first_session = fds.size();
    std::vector<Session*> polled;
    auto now = Clock::now();
    auto timeout = std::chrono::milliseconds(1000);
    for (auto& [id, s] : sessions_) {
      if (s->ending) continue;
      if (s->conn.valid() && !s->stalled) {
        fds.push_back({s->conn.get(), POLLIN, 0});
        polled.push_back(s.get());
      }
      if (s->unanswered.load() == 0) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(s->last + s->idle - now);
        timeout = std::min(timeout, std::max(left, std::chrono::milliseconds(0)));
      }
    }
    if (poll(fds.data(), fds.size(), static_cast<int>(timeout.count()) + 1) < 0 &&
        errno != EINTR) {
      spdlog::error("session process: poll: {}", strerror(errno));
      return 1;
    }
    if (faulted_.load()) {
      std::lock_guard lock(fault_mu_);
      Fault(*fault_);
      return kExitFault;
    }
    if (fds[1].revents) {
      uint64_t n;
      (void)!read(wake_.get(), &n, sizeof n);
    }
    if (fds[0].revents) {
      Status st = control_reader_.Fill(opt_.control_fd);
      std::string frame;
      for (;;) {
        auto next = control_reader_.Next(&frame);
        if (!next.ok()) {
          st = next.status();
          break;
        }
        if (!*next) break;
        SessionMessage m;
        Status d = schema::DecodeSessionMessage(frame, schema::Limits{}, 64u << 20, &m);
        if (!d.ok()) {
          spdlog::error("session process: a bad message from the broker: {}", d.ToString());
          continue;
        }
        OnControl(m);
      }
      if (!st.ok()) {
        // The broker is gone, or done with this process: every session ends.
        {
          std::lock_guard lock(control_mu_);
          broker_gone_ = true;
        }
        for (auto& [id, s] : sessions_) {
          if (!s->ending) End(*s, Code::kSessionLost, "the broker ended the session's process");
        }
        while (!sessions_.empty()) {
          Reap();
          if (!sessions_.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
        (void)unlink(opt_.socket_path.c_str());
        return 0;
      }
    }
    if (first_pending > 2 && fds[2].revents) Accept();
    for (size_t i = first_session; i > first_pending; --i) {
      if (fds[i - 1].revents) OnPending(i - 1 - first_pending);
    }
    for (size_t i = 0; i < polled.size(); ++i) {
      Session& s = *polled[i];
      if (fds[first_session + i].revents && !s.ending) OnClient(s);
    }
    now = Clock::now();
    for (auto& [id, s] : sessions_) {
      if (!s->ending && s->unanswered.load() == 0 && now - s->last >= s->idle) {
        End(*s, Code::kSessionLost,
            "idle for " + std::to_string(s->idle.count()) + " ms, its timeout");
      }
    }
    Reap();
  }
}

void SessionHost::Impl::OnControl(SessionMessage& m) {
  switch (m.op) {
    case SessionOp::kOpen:
      Open(m);
      return;
    case SessionOp::kEnd: {
      auto it = sessions_.find(m.session);
      if (it != sessions_.end() && !it->second->ending) {
        End(*it->second, Code::kSessionLost, "closed through the broker");
      }
      return;
    }
    case SessionOp::kModule:
      OnModule(m);
      return;
    default:
      spdlog::error("session process: the broker sent '{}', which it never sends",
                    schema::SessionOpName(m.op));
  }
}

void SessionHost::Impl::Open(const SessionMessage& m) {
  SessionMessage r;
  r.op = SessionOp::kOpened;
  r.session = m.session;
  if (sessions_.count(m.session) || m.session == 0) {
    r.code = Code::kInvalid;
    r.error = "session " + std::to_string(m.session) + " exists";
    Control(r);
    return;
  }
  auto stream = device_->NewStream();
  if (!stream.ok()) {
    r.code = stream.status().code();
    r.error = stream.status().message();
    Control(r);
    return;
  }
  auto s = std::make_unique<Session>();
  s->id = m.session;
  s->token = m.token;
  s->memory = m.memory;
  s->idle = std::chrono::milliseconds(m.idle_ms);
  s->last = Clock::now();
  s->stream = std::move(*stream);
  Session* raw = s.get();
  s->thread = std::thread([this, raw] { Completions(raw); });
  sessions_.emplace(m.session, std::move(s));
  Control(r);
}

void SessionHost::Impl::Accept() {
  for (;;) {
    auto c = AcceptSeqpacket(listener_.get());  // any socket type: accept4
    if (!c.ok() || !c->valid()) return;
    // Blocking, for the completion thread's writes; reads never wait
    // (FrameReader reads with MSG_DONTWAIT).
    (void)fcntl(c->get(), F_SETFL, fcntl(c->get(), F_GETFL) & ~O_NONBLOCK);
    pending_.push_back(std::make_unique<Pending>(std::move(*c), 4096));
    if (pending_.size() >= kMaxPending) return;
  }
}

void SessionHost::Impl::OnPending(size_t i) {
  Pending& p = *pending_[i];
  Status st = p.reader.Fill(p.fd.get());
  std::string frame;
  auto next = p.reader.Next(&frame);
  auto drop = [&] { pending_.erase(pending_.begin() + static_cast<std::ptrdiff_t>(i)); };
  if (!next.ok() || (!st.ok() && !(next.ok() && *next))) {
    drop();
    return;
  }
  if (!*next) return;
  SessionMessage m;
  Status d = schema::DecodeSessionMessage(frame, schema::Limits{}, 0, &m);
  auto refuse = [&](const Status& why) {
    (void)WriteFrame(p.fd.get(), schema::EncodeSessionMessage(ErrorReply(0, why)));
    drop();
  };
  if (!d.ok()) return refuse(d);
  if (m.op != SessionOp::kHello) {
    return refuse(Error(Code::kInvalid, "a connection begins with hello"));
  }
  auto it = sessions_.find(m.session);
  if (it == sessions_.end() || !SameToken(it->second->token, m.token) || it->second->ending) {
    return refuse(Error(Code::kNotFound, "no session " + std::to_string(m.session) +
                                             " with that token here"));
  }
  Session& s = *it->second;
  if (s.conn.valid()) {
    return refuse(Error(Code::kInvalid, "session " + std::to_string(s.id) +
                                            " has its client's connection already"));
  }
  s.conn = std::move(p.fd);
  s.reader = std::make_unique<FrameReader>(MaxFrame());
  s.last = Clock::now();
  SessionMessage ok;
  ok.op = SessionOp::kDone;
  (void)WriteFrame(s.conn.get(), schema::EncodeSessionMessage(ok));
  drop();
  // What came after the hello is the session's.
  OnClient(s);
}

bool SessionHost::Impl::OnClient(Session& s) {
  Status st = s.reader->Fill(s.conn.get());
  std::string frame;
  while (!s.stalled && !s.ending) {
    auto next = s.reader->Next(&frame);
    if (!next.ok()) {
      Answer(s, 0, next.status());
      End(s, Code::kSessionLost, "its client sent " + next.status().message());
      return false;
    }
    if (!*next) break;
    s.last = Clock::now();
    SessionMessage m;
    Status d = schema::DecodeSessionMessage(frame, schema::Limits{}, opt_.max_data, &m);
    if (!d.ok()) {
      Answer(s, m.rid, d);
      continue;
    }
    Handle(s, m);
  }
  if (!st.ok() && !s.ending && !s.stalled) {
    End(s, Code::kSessionLost, "its client's connection closed");
    return false;
  }
  return true;
}

void SessionHost::Impl::Push(Session& s, Entry e) {
  s.unanswered.fetch_add(1);
  {
    std::lock_guard lock(s.mu);
    s.queue.push_back(std::move(e));
  }
  s.cv.notify_one();
}

void SessionHost::Impl::Done(Session& s, uint64_t rid, Entry e) {
  if (!e.mark) {
    auto mark = s.stream->Mark();
    if (!mark.ok()) return Answer(s, rid, mark.status());
    e.mark = std::move(*mark);
  }
  e.reply.op = SessionOp::kDone;
  e.reply.rid = rid;
  Push(s, std::move(e));
}

void SessionHost::Impl::Handle(Session& s, SessionMessage& m) {
  const uint64_t rid = m.rid;
  if (rid == 0 && m.op != SessionOp::kHello) {
    return Answer(s, 0, Error(Code::kMalformed, "rid must be at least 1"));
  }
  auto buffer = [&](uint32_t h, uint64_t offset, uint64_t size) -> StatusOr<Buffer> {
    auto it = s.buffers.find(h);
    if (it == s.buffers.end()) {
      return Error(Code::kNotFound, "no buffer " + std::to_string(h) + " in this session");
    }
    if (!InRange(offset, size, it->second.size)) {
      return Error(Code::kInvalid, "bytes [" + std::to_string(offset) + ", +" +
                                       std::to_string(size) + ") are outside buffer " +
                                       std::to_string(h) + " of " +
                                       std::to_string(it->second.size) + " bytes");
    }
    return it->second;
  };
  switch (m.op) {
    case SessionOp::kAlloc: {
      if (m.size == 0) return Answer(s, rid, Error(Code::kInvalid, "a buffer is at least 1 byte"));
      if (m.size > s.memory - s.held) {
        return Answer(s, rid, Error(Code::kResourceExhausted,
                                    "the session holds " + std::to_string(s.held) + " of its " +
                                        std::to_string(s.memory) + " bytes; " +
                                        std::to_string(m.size) + " more asked"));
      }
      if (next_buffer_ == 0) {
        return Answer(s, rid, Error(Code::kResourceExhausted, "buffer handles ran out"));
      }
      auto p = s.stream->Alloc(m.size);
      if (!p.ok()) return Answer(s, rid, p.status());
      const uint32_t h = next_buffer_++;
      s.buffers[h] = Buffer{*p, m.size};
      s.held += m.size;
      Entry e;
      e.reply.buffer = h;
      Done(s, rid, std::move(e));
      Usage(s);
      return;
    }
    case SessionOp::kFree: {
      auto b = buffer(m.buffer, 0, 0);
      if (!b.ok()) return Answer(s, rid, b.status());
      s.stream->Free(b->ptr);
      s.held -= b->size;
      s.buffers.erase(m.buffer);
      Done(s, rid);
      Usage(s);
      return;
    }
    case SessionOp::kWrite: {
      auto b = buffer(m.buffer, m.offset, m.data.size());
      if (!b.ok()) return Answer(s, rid, b.status());
      auto keep = std::make_shared<const std::string>(std::move(m.data));
      if (Status w = s.stream->Write(b->ptr + m.offset, *keep); !w.ok()) {
        return Answer(s, rid, w);
      }
      Entry e;
      e.keep = std::move(keep);
      Done(s, rid, std::move(e));
      return;
    }
    case SessionOp::kRead: {
      if (m.size > opt_.max_data) {
        return Answer(s, rid, Error(Code::kTooLarge, "a read is at most " +
                                                         std::to_string(opt_.max_data) +
                                                         " bytes"));
      }
      auto b = buffer(m.buffer, m.offset, m.size);
      if (!b.ok()) return Answer(s, rid, b.status());
      Entry e;
      e.read = std::make_unique<std::string>(m.size, '\0');
      if (Status r = s.stream->Read(b->ptr + m.offset, e.read.get()); !r.ok()) {
        return Answer(s, rid, r);
      }
      Done(s, rid, std::move(e));
      return;
    }
    case SessionOp::kCopy: {
      auto dst = buffer(m.buffer, m.offset, m.size);
      if (!dst.ok()) return Answer(s, rid, dst.status());
      auto src = buffer(m.src, m.src_offset, m.size);
      if (!src.ok()) return Answer(s, rid, src.status());
      if (m.size > 0) {
        if (Status c = s.stream->Copy(dst->ptr + m.offset, src->ptr + m.src_offset, m.size);
            !c.ok()) {
          return Answer(s, rid, c);
        }
      }
      Done(s, rid);
      return;
    }
    case SessionOp::kFill: {
      auto b = buffer(m.buffer, m.offset, m.size);
      if (!b.ok()) return Answer(s, rid, b.status());
      if (m.size > 0) {
        if (Status f = s.stream->Fill(b->ptr + m.offset, static_cast<uint8_t>(m.value), m.size);
            !f.ok()) {
          return Answer(s, rid, f);
        }
      }
      Done(s, rid);
      return;
    }
    case SessionOp::kLaunch:
      Launch(s, m);
      return;
    case SessionOp::kClose:
      // Answered after the broker has heard that it ended (Reap): a client
      // that opens another at once finds its limits as they are.
      s.close_rid = rid;
      End(s, Code::kOk, "closed by its client");
      return;
    default:
      return Answer(s, rid, Error(Code::kUnknownCommand,
                                  "'" + std::string(schema::SessionOpName(m.op)) +
                                      "' is not a request a client makes"));
  }
}

void SessionHost::Impl::Launch(Session& s, SessionMessage& m) {
  const std::string key = KernelKey(m.kernel);
  auto it = modules_.find(key);
  if (it == modules_.end() || !it->second.ready) {
    if (it == modules_.end()) {
      // Compiled once by the broker's compile service (its cache and its
      // sandbox), loaded here once.
      it = modules_.emplace(key, Module{}).first;
      module_order_.push_back(key);
      SessionMessage c;
      c.op = SessionOp::kCompile;
      c.rid = next_rid_++;
      c.kernel = m.kernel;
      compiling_[c.rid] = key;
      Control(c);
    }
    it->second.waiting.push_back(s.id);
    s.stalled = std::move(m);
    return;
  }
  if (!it->second.failed.ok()) return Answer(s, m.rid, it->second.failed);
  const SessionKernel& kernel = *it->second.kernel;
  if (Status c = device_->CheckLaunch(kernel, m.launch); !c.ok()) return Answer(s, m.rid, c);
  std::vector<uint64_t> slots(m.args.size());
  std::vector<void*> params(m.args.size());
  for (size_t i = 0; i < m.args.size(); ++i) {
    const schema::Arg& a = m.args[i];
    params[i] = &slots[i];
    if (a.kind == schema::ArgKind::kScalar) {
      slots[i] = a.bits;
      continue;
    }
    auto b = s.buffers.find(a.buffer);
    if (b == s.buffers.end()) {
      return Answer(s, m.rid, Error(Code::kNotFound, "argument " + std::to_string(i) +
                                                         ": no buffer " +
                                                         std::to_string(a.buffer) +
                                                         " in this session"));
    }
    if (a.offset > b->second.size) {
      return Answer(s, m.rid, Error(Code::kInvalid, "argument " + std::to_string(i) +
                                                        ": offset " + std::to_string(a.offset) +
                                                        " is past buffer " +
                                                        std::to_string(a.buffer) + "'s end"));
    }
    slots[i] = b->second.ptr + a.offset;
  }
  auto mark = s.stream->Launch(kernel, m.launch, params);
  if (!mark.ok()) return Answer(s, m.rid, mark.status());
  Entry e;
  e.mark = std::move(*mark);
  e.timed = true;
  Done(s, m.rid, std::move(e));
}

void SessionHost::Impl::OnModule(SessionMessage& m) {
  auto c = compiling_.extract(m.rid);
  if (c.empty()) return;
  auto it = modules_.find(c.mapped());
  if (it == modules_.end()) return;
  Module& mod = it->second;
  mod.ready = true;
  if (m.code != Code::kOk) {
    mod.failed = Status(m.code, m.error);
  } else {
    auto k = device_->Load(m.image, m.image_kind, m.symbol);
    if (k.ok()) {
      mod.kernel = std::move(*k);
    } else {
      mod.failed = k.status();
    }
  }
  std::vector<uint64_t> waiting = std::move(mod.waiting);
  // Failures are not kept: a later launch asks again (the broker's cache
  // answers a failed compile at once).
  const bool drop = !mod.failed.ok();
  for (uint64_t id : waiting) {
    auto s = sessions_.find(id);
    if (s == sessions_.end() || !s->second->stalled) continue;
    Session& ss = *s->second;
    SessionMessage launch = std::move(*ss.stalled);
    ss.stalled.reset();
    if (ss.ending) continue;
    if (drop) {
      Answer(ss, launch.rid, mod.failed);
    } else {
      Launch(ss, launch);
    }
    if (ss.conn.valid() && !ss.stalled) OnClient(ss);
  }
  if (drop) {
    modules_.erase(it);
    std::erase(module_order_, c.mapped());
  }
  while (module_order_.size() > kMaxModules) {
    auto old = modules_.find(module_order_.front());
    if (old != modules_.end() && old->second.waiting.empty() && old->second.ready) {
      modules_.erase(old);
    }
    module_order_.pop_front();
  }
}

void SessionHost::Impl::End(Session& s, Code code, std::string why) {
  s.ending = true;
  s.end_code = code;
  s.end_why = std::move(why);
  Entry stop;
  stop.stop = true;
  {
    std::lock_guard lock(s.mu);
    s.queue.push_back(std::move(stop));
  }
  s.cv.notify_one();
}

void SessionHost::Impl::Reap() {
  for (auto it = sessions_.begin(); it != sessions_.end();) {
    Session& s = *it->second;
    if (!s.ending || !s.finished.load()) {
      ++it;
      continue;
    }
    s.thread.join();
    // Its work is done: its memory goes back, in stream order.
    for (auto& [h, b] : s.buffers) s.stream->Free(b.ptr);
    if (auto m = s.stream->Mark(); m.ok()) (void)s.stream->Wait(**m);
    s.buffers.clear();
    s.stream.reset();
    if (s.conn.valid() && s.end_code != Code::kOk) {
      SessionMessage lost = ErrorReply(0, Status(s.end_code, s.end_why));
      (void)WriteFrame(s.conn.get(), schema::EncodeSessionMessage(lost));
    }
    SessionMessage ended;
    ended.op = SessionOp::kEnded;
    ended.session = s.id;
    ended.code = s.end_code;
    ended.error = s.end_why;
    Control(ended);
    if (s.conn.valid() && s.close_rid) {
      SessionMessage done;
      done.op = SessionOp::kDone;
      done.rid = s.close_rid;
      (void)WriteFrame(s.conn.get(), schema::EncodeSessionMessage(done));
    }
    spdlog::info("session {} ended: {}", s.id, s.end_why);
    it = sessions_.erase(it);
  }
}

void SessionHost::Impl::Completions(Session* s) {
  for (;;) {
    Entry e;
    {
      std::unique_lock lock(s->mu);
      s->cv.wait(lock, [&] { return !s->queue.empty(); });
      e = std::move(s->queue.front());
      s->queue.pop_front();
    }
    if (e.stop) break;
    if (e.mark) {
      auto ns = s->stream->Wait(*e.mark);
      if (!ns.ok()) {
        // A fault: the context is gone, and with it every session here.
        Status lost(Code::kSessionLost, "a kernel faulted: " + ns.status().message());
        if (s->conn.valid()) {
          (void)WriteFrame(s->conn.get(),
                           schema::EncodeSessionMessage(ErrorReply(e.reply.rid, lost)));
        }
        {
          std::lock_guard lock(fault_mu_);
          if (!fault_) fault_ = lost;
        }
        faulted_ = true;
        Wake();
        break;
      }
      if (e.timed) e.reply.kernel_ns = *ns;
      if (e.read) e.reply.data = std::move(*e.read);
    }
    if (s->conn.valid()) {
      (void)WriteFrame(s->conn.get(), schema::EncodeSessionMessage(e.reply));
    }
    s->unanswered.fetch_sub(1);
  }
  s->finished = true;
  Wake();
}

void SessionHost::Impl::Fault(const Status& why) {
  spdlog::error("session process for tenant '{}': {}; its sessions end", opt_.tenant,
                why.ToString());
  for (auto& [id, s] : sessions_) {
    SessionMessage ended;
    ended.op = SessionOp::kEnded;
    ended.session = id;
    ended.code = Code::kSessionLost;
    ended.error = why.message();
    Control(ended);
  }
  (void)unlink(opt_.socket_path.c_str());
  // Completion threads may be blocked on a dead context: the process ends
  // without waiting for them.
  spdlog::shutdown();
  _exit(kExitFault);
}

int SessionProcessMain(int argc, char** argv, const OpenSessionDevice& open) {
  CLI::App app{"A session process of gpuqd: one tenant's sessions on one GPU"};
  SessionHostOptions o;
  std::string uuid;
  uint64_t spin_us = 0, max_data_mb = 256;
  app.add_option("--control-fd", o.control_fd, "the broker's control channel")->required();
  app.add_option("--socket", o.socket_path, "where the tenant's clients connect")->required();
  app.add_option("--tenant", o.tenant, "whose sessions these are");
  app.add_option("--device", uuid, "the GPU's UUID")->required();
  app.add_option("--spin-us", spin_us, "completion threads poll this long before sleeping");
  app.add_option("--max-data-mb", max_data_mb, "a write's or a read's bytes, at most");
  CLI11_PARSE(app, argc, argv);
  o.spin = std::chrono::microseconds(spin_us);
  o.max_data = static_cast<size_t>(max_data_mb) << 20;
  auto device = open(uuid, o.spin);
  if (!device.ok()) {
    spdlog::error("session process: {}", device.status().ToString());
    return kExitNoDevice;
  }
  SessionHost host(std::move(o), std::move(*device));
  return host.Run();
}

}  // namespace gpuq::worker
