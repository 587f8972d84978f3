#include "broker/sessions.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <thread>

#include "broker/core.h"
#include "schema/codec.h"
#include "schema/filename.h"
#include "util/sha256.h"
#include "worker/exit_codes.h"

extern char** environ;

namespace gpuq::broker {

using schema::SessionMessage;
using schema::SessionOp;

namespace {

std::string RandomHex(size_t bytes) {
  std::vector<uint8_t> b(bytes);
  size_t got = 0;
  while (got < bytes) {
    ssize_t n = getrandom(b.data() + got, bytes - got, 0);
    if (n > 0) got += static_cast<size_t>(n);
  }
  return ToHex(b.data(), b.size());
}

uint64_t RandomId() {
  for (;;) {
    uint64_t v = 0;
    if (getrandom(&v, sizeof v, 0) == sizeof v && v != 0) return v;
  }
}

std::string Describe(int status) {
  if (WIFSIGNALED(status)) return "killed by signal " + std::to_string(WTERMSIG(status));
  if (!WIFEXITED(status)) return "ended";
  const int code = WEXITSTATUS(status);
  const char* why = code == worker::kExitFault     ? " (a kernel fault)"
                    : code == worker::kExitTimeout ? " (a launch past its run-time limit)"
                                                   : "";
  return "exited with status " + std::to_string(code) + why;
}

}  // namespace

SessionServer::~SessionServer() {
  std::vector<pid_t> pids = exiting_;
  for (auto& [key, h] : hosts_) {
    h.control.Reset();  // a session process ends when its control channel closes
    if (h.pid > 0) pids.push_back(h.pid);
  }
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  for (pid_t pid : pids) {
    int status = 0;
    while (waitpid(pid, &status, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() > until) {
        kill(pid, SIGKILL);
        (void)waitpid(pid, &status, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
}

void SessionServer::Open(const RequestContext& ctx, const schema::SessionSpec& spec,
                         const std::string& claimed) {
  if (limits_.bin.empty()) {
    return core_.ReplyError(ctx, Error(Code::kUnavailable,
                                       "this broker runs no sessions (no session process)"));
  }
  if (!ctx.tenant.empty() && !claimed.empty() && claimed != ctx.tenant) {
    return core_.ReplyError(ctx, Error(Code::kForbidden,
                                       "the key's tenant is '" + ctx.tenant + "', not '" +
                                           claimed + "'"));
  }
  // As a job's: the key's tenant on CURVE, else the request's word ("default"
  // when it says none).
  const std::string tenant =
      !ctx.tenant.empty() ? ctx.tenant : claimed.empty() ? "default" : claimed;
  const uint64_t memory = spec.memory ? spec.memory : limits_.default_memory;
  uint32_t count = 0;
  uint64_t reserved = 0;
  for (const auto& [id, s] : sessions_) {
    if (s.tenant != tenant) continue;
    ++count;
    reserved += s.memory;
  }
  if (count >= limits_.per_tenant) {
    return core_.ReplyError(
        ctx, Error(Code::kResourceExhausted,
                   "tenant '" + tenant + "' has " + std::to_string(count) +
                       " sessions open, its limit (--max-sessions " +
                       std::to_string(limits_.per_tenant) + ")"));
  }
  if (memory > limits_.bytes_per_tenant || reserved > limits_.bytes_per_tenant - memory) {
    return core_.ReplyError(
        ctx, Error(Code::kResourceExhausted,
                   "tenant '" + tenant + "' holds " + std::to_string(reserved >> 20) +
                       " MiB of session memory in " + std::to_string(count) +
                       " sessions; " + std::to_string(memory >> 20) + " MiB more is over its " +
                       std::to_string(limits_.bytes_per_tenant >> 20) +
                       " MiB (--max-session-mb)"));
  }
  // A GPU of this host that matches, the one with the fewest sessions.
  const Worker* best = nullptr;
  size_t best_n = 0;
  const schema::Placement& pl = spec.placement;
  for (const auto& [wid, w] : core_.workers().all()) {
    if (!w.local || !w.drained.empty()) continue;
    if (!pl.arch.empty() && pl.arch != w.arch) continue;
    if (!pl.gpu.empty() && pl.gpu != w.device.uuid) continue;
    if (pl.min_free_bytes && w.device.free_bytes < pl.min_free_bytes) continue;
    size_t n = 0;
    for (const auto& [hk, h] : hosts_) {
      if (h.gpu == w.device.uuid) n += h.sessions.size();
    }
    if (!best || n < best_n) {
      best = &w;
      best_n = n;
    }
  }
  if (!best) {
    return core_.ReplyError(ctx, Error(Code::kUnavailable,
                                       "no GPU of the broker's host matches the session's "
                                       "placement"));
  }
  const std::string key = HostKey(tenant, best->device.uuid);
  Host* host = nullptr;
  if (auto it = hosts_.find(key); it != hosts_.end()) {
    host = &it->second;
  } else {
    // Each tenant with a session on a GPU has a process there, and a CUDA
    // context in it; on ipc a tenant is the caller's word, so the processes
    // are bounded in all (those ending count until they are gone).
    if (hosts_.size() + exiting_.size() >= limits_.processes) {
      return core_.ReplyError(
          ctx, Error(Code::kResourceExhausted,
                     "the broker runs " + std::to_string(hosts_.size() + exiting_.size()) +
                         " session processes, its limit in all (--max-session-processes " +
                         std::to_string(limits_.processes) + ")"));
    }
    auto started = Start(tenant, best->device.uuid, best->arch);
    if (!started.ok()) return core_.ReplyError(ctx, started.status());
    host = *started;
  }
  Session s;
  s.id = RandomId();
  while (sessions_.count(s.id)) s.id = RandomId();
  s.tenant = tenant;
  s.token = RandomHex(16);
  s.host = key;
  s.memory = memory;
  s.opened = core_.clock().Now();
  s.opening = ctx;
  host->sessions.insert(s.id);
  SessionMessage open;
  open.op = SessionOp::kOpen;
  open.session = s.id;
  open.token = s.token;
  open.memory = memory;
  open.idle_ms = spec.idle_ms ? spec.idle_ms : limits_.default_idle_ms;
  open.limit_ms = spec.limit_ms ? spec.limit_ms : limits_.default_limit_ms;
  sessions_.emplace(s.id, std::move(s));
  Send(*host, open);
}

StatusOr<SessionServer::Host*> SessionServer::Start(const std::string& tenant,
                                                      const std::string& gpu,
                                                      const std::string& arch) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    return Error(Code::kResourceExhausted, std::string("socketpair: ") + strerror(errno));
  }
  UniqueFd mine(sv[0]), theirs(sv[1]);
  if (theirs.get() == 3) {
    // dup2 onto itself would keep close-on-exec.
    UniqueFd moved(fcntl(theirs.get(), F_DUPFD_CLOEXEC, 4));
    if (!moved.valid()) return Error(Code::kResourceExhausted, "fcntl");
    theirs = std::move(moved);
  }
  const std::string path =
      core_.local_dir() + "/s" + RandomHex(8) + ".sock";
  std::vector<std::string> args = {limits_.bin,
                                   "--control-fd", "3",
                                   "--socket", path,
                                   "--tenant", tenant,
                                   "--device", gpu,
                                   "--spin-us", std::to_string(limits_.spin.count()),
                                   "--max-data-mb", std::to_string(limits_.max_data_mb),
                                   "--max-attach-mb", std::to_string(limits_.max_attach_mb),
                                   "--max-kernels", std::to_string(limits_.max_kernels),
                                   "--max-buffers", std::to_string(limits_.max_buffers),
                                   "--module-memory-mib", std::to_string(limits_.module_memory_mib),
                                   "--kernels-memory-mib", std::to_string(limits_.kernels_memory_mib),
                                   "--local-memory-mib", std::to_string(limits_.local_memory_mib)};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, theirs.get(), 3);
  // Nothing else of gpuqd's: connections accepted without O_CLOEXEC (the
  // metrics server's) stayed open in the process for its life.
  posix_spawn_file_actions_addclosefrom_np(&fa, 4);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, limits_.bin.c_str(), &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) {
    return Error(Code::kUnavailable,
                 "cannot start the session process " + limits_.bin + ": " + strerror(rc));
  }
  (void)fcntl(mine.get(), F_SETFL, fcntl(mine.get(), F_GETFL) | O_NONBLOCK);
  spdlog::info("session process {} started for tenant '{}' on {}", pid, tenant, gpu);
  Host& h = hosts_[HostKey(tenant, gpu)];
  h.tenant = tenant;
  h.gpu = gpu;
  h.arch = arch;
  h.path = path;
  h.pid = pid;
  h.control = std::move(mine);
  h.started = core_.clock().Now();
  h.generation = next_generation_++;
  return &h;
}

void SessionServer::Send(Host& h, const SessionMessage& m) {
  h.writer.Push(schema::EncodeSessionMessage(m));
  if (Status s = h.writer.Flush(h.control.get()); !s.ok()) {
    spdlog::warn("session process {}: {}", h.pid, s.ToString());
  }
}

void SessionServer::Close(const RequestContext& ctx, uint64_t id) {
  auto it = sessions_.find(id);
  if (it == sessions_.end() || !ctx.Sees(it->second.tenant)) {
    return core_.ReplyError(ctx, Error(Code::kNotFound, "no session " + std::to_string(id)));
  }
  Session& s = it->second;
  // One end is asked of the process; later closes wait for its answer with
  // the first, up to a bound (each costs the broker its request's context).
  const bool asked = !s.closing.empty();
  if (s.closing.size() >= kMaxClosesWaiting) {
    return core_.ReplyError(ctx, Error(Code::kResourceExhausted,
                                       std::to_string(s.closing.size()) + " closes of session " +
                                           std::to_string(id) + " already wait for its end"));
  }
  s.closing.push_back(ctx);
  auto h = hosts_.find(s.host);
  if (h == hosts_.end()) return Ended(id, Code::kSessionLost, "its process is gone");
  if (asked) return;
  SessionMessage end;
  end.op = SessionOp::kEnd;
  end.session = id;
  Send(h->second, end);
}

void SessionServer::PollItems(std::vector<zmq::pollitem_t>* items) const {
  for (const auto& [key, h] : hosts_) {
    short events = ZMQ_POLLIN;
    if (h.writer.pending()) events |= ZMQ_POLLOUT;
    items->push_back({nullptr, h.control.get(), events, 0});
  }
  for (const auto& [id, r] : relays_) {
    if (!r.fd.valid() || !r.closing.ok()) continue;  // ended, or ending
    // Answers are taken only while their client reads what it was sent:
    // past its bound they wait in the process (which then stops reading
    // requests), never in the broker.
    short events = Room(r) ? ZMQ_POLLIN : 0;
    if (r.writer.pending()) events |= ZMQ_POLLOUT;
    items->push_back({nullptr, r.fd.get(), events, 0});
  }
}

void SessionServer::OnPoll(const zmq::pollitem_t* items, size_t n) {
  std::vector<std::string> keys;
  for (const auto& [key, h] : hosts_) keys.push_back(key);
  std::vector<uint64_t> relayed;  // as PollItems listed them
  for (const auto& [id, r] : relays_) {
    if (r.fd.valid() && r.closing.ok()) relayed.push_back(id);
  }
  std::vector<std::string> gone;
  for (size_t i = 0; i < n && i < keys.size(); ++i) {
    if (!items[i].revents) continue;
    auto it = hosts_.find(keys[i]);
    if (it == hosts_.end() || it->second.control.get() != items[i].fd) continue;
    Host& h = it->second;
    if (items[i].revents & ZMQ_POLLOUT) (void)h.writer.Flush(h.control.get());
    if (!(items[i].revents & (ZMQ_POLLIN | ZMQ_POLLERR))) continue;
    Status st = h.reader.Fill(h.control.get());
    std::string frame;
    for (;;) {
      auto next = h.reader.Next(&frame);
      if (!next.ok()) {
        st = next.status();
        break;
      }
      if (!*next) break;
      SessionMessage m;
      Status d = schema::DecodeSessionMessage(frame, core_.options().limits, 0, &m);
      if (!d.ok()) {
        spdlog::warn("session process {}: a bad message: {}", h.pid, d.ToString());
        continue;
      }
      OnMessage(keys[i], h, m);
      if (!hosts_.count(keys[i])) break;  // its last session ended
    }
    if (!st.ok() && hosts_.count(keys[i])) gone.push_back(keys[i]);
  }
  for (size_t i = keys.size(), k = 0; i < n && k < relayed.size(); ++i, ++k) {
    if (!items[i].revents) continue;
    auto it = relays_.find(relayed[k]);
    if (it == relays_.end() || !it->second.fd.valid() || it->second.fd.get() != items[i].fd) {
      continue;
    }
    (void)OnRelay(it->second, items[i].revents);
  }
  for (const std::string& key : gone) Drop(key, "its process ended");
}

void SessionServer::OnMessage(const std::string& key, Host& h, SessionMessage& m) {
  switch (m.op) {
    case SessionOp::kOpened: {
      auto it = sessions_.find(m.session);
      if (it == sessions_.end() || it->second.host != key) return;
      Session& s = it->second;
      if (m.code != Code::kOk) {
        if (s.opening) core_.ReplyError(*s.opening, Status(m.code, m.error));
        s.opening.reset();
        Ended(m.session, m.code, m.error);
        return;
      }
      s.open = true;
      if (s.opening) {
        schema::ClientReply r;
        r.op = schema::ReplyOp::kSession;
        r.id = s.id;
        r.path = h.path;
        r.token = s.token;
        r.device = h.gpu;
        core_.Reply(*s.opening, std::move(r));
        s.opening.reset();
      }
      return;
    }
    case SessionOp::kEnded: {
      auto it = sessions_.find(m.session);
      if (it == sessions_.end() || it->second.host != key) return;
      Ended(m.session, m.code, m.error);
      return;
    }
    case SessionOp::kUsage: {
      auto it = sessions_.find(m.session);
      if (it == sessions_.end() || it->second.host != key) return;
      it->second.held = m.size;
      return;
    }
    case SessionOp::kCompile: {
      // The session process's kernel, for its GPU's architecture, from the
      // compile service (its cache, its sandbox, its fairness by tenant).
      compile::CompileRequest req;
      req.source = m.kernel.source;
      req.headers = m.kernel.headers;
      req.options = m.kernel.options;
      if (m.kernel.name_expression) req.name_expressions = {m.kernel.entry};
      req.arch = h.arch;
      const uint64_t rid = m.rid, generation = h.generation;
      const std::string entry = m.kernel.entry;
      core_.compiler().Submit(
          std::move(req), h.tenant,
          [this, key, generation, rid, entry](const Digest&, StatusOr<compile::EntryPtr> result,
                                              const compile::CompileInfo&) {
            {
              MutexLock lock(&mu_);
              compiled_.push_back(Compiled{key, generation, rid, entry, std::move(result)});
            }
            core_.Wake();
          });
      return;
    }
    default:
      spdlog::warn("session process {} sent '{}', which it never sends", h.pid,
                   schema::SessionOpName(m.op));
  }
}

void SessionServer::Tick() {
  relay_bytes_ = 0;
  for (const auto& [id, r] : relays_) relay_bytes_ += Queued(r);
  std::vector<Compiled> done;
  {
    MutexLock lock(&mu_);
    done.swap(compiled_);
  }
  for (Compiled& c : done) {
    auto it = hosts_.find(c.host);
    // Asked by a process that has ended since: a later one of the same
    // tenant and GPU numbers its requests again, and would take this
    // kernel for another it asked for.
    if (it == hosts_.end() || it->second.generation != c.generation) continue;
    SessionMessage r;
    r.op = SessionOp::kModule;
    r.rid = c.rid;
    if (!c.result.ok()) {
      r.code = c.result.status().code();
      r.error = c.result.status().message();
    } else {
      const compile::CacheEntry& e = **c.result;
      if (!e.ok) {
        r.code = e.code;
        r.error = "compile failed: " + e.log;
      } else if (const std::string symbol = e.Symbol(c.entry); !e.HasKernel(symbol)) {
        r.code = Code::kNotFound;
        r.error = "no kernel '" + c.entry + "' in the compiled source (is it extern \"C\" "
                  "__global__, or a name expression?)";
      } else if (symbol.size() > schema::Limits::kMaxLoweredNameBytes) {
        // Sent, the session process could not read the answer.
        r.code = Code::kInvalid;
        r.error = "the kernel '" + c.entry.substr(0, 256) + "' has a lowered name of " +
                  std::to_string(symbol.size()) + " bytes, over the " +
                  std::to_string(schema::Limits::kMaxLoweredNameBytes) + " a session takes";
      } else {
        r.symbol = symbol;
        if (!e.cubin.empty()) {
          r.image = e.cubin;
          r.image_kind = schema::ImageKind::kCubin;
        } else {
          r.image = e.ptx;
          r.image_kind = schema::ImageKind::kPtx;
        }
      }
    }
    Send(it->second, r);
  }
  // A relay lives as long as its client's connection: when that goes, so
  // does the relay, and the session with it (as a direct client's).
  // Answers read while their client's queue was full go once it has room:
  // sent unasked, so after the connections that have gone are known (a new
  // connection may have taken a routing id since; ClientConnections).
  bool drained = false;
  for (auto& [id, r] : relays_) {
    if (!r.fd.valid()) {
      // Ended: the calls that waited for their answers get why.
      if (Refusing(r)) {
        if (!drained) core_.connections().DrainEvents();
        drained = true;
        if (!AnswerRefused(r)) r.calls.clear();  // its client has gone
      }
      continue;
    }
    const bool due = r.reader.ready() || Refusing(r);
    if (due && !drained) {
      core_.connections().DrainEvents();
      drained = true;
    }
    if (due && !Answers(r)) continue;
    if (!r.closing.ok() && !r.reader.ready()) EndRelay(id, r.closing);
  }
  const MonoTime now = core_.clock().Now();
  for (auto it = relays_.begin(); it != relays_.end();) {
    const Relay& r = it->second;
    if (core_.connections().Sendable(r.conn) &&
        (r.ended.ok() || now - r.ended_at < std::chrono::minutes(1))) {
      ++it;
      continue;
    }
    it = relays_.erase(it);
  }
  for (auto it = exiting_.begin(); it != exiting_.end();) {
    int status = 0;
    const pid_t r = waitpid(*it, &status, WNOHANG);
    if (r == 0) {
      ++it;
      continue;
    }
    if (r > 0) spdlog::info("session process {} {}", *it, Describe(status));
    it = exiting_.erase(it);
  }
}

void SessionServer::Ended(uint64_t id, Code code, const std::string& why) {
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return;
  Session& s = it->second;
  if (s.opening) {
    core_.ReplyError(*s.opening, Status(code == Code::kOk ? Code::kSessionLost : code,
                                        "the session ended before it opened: " + why));
  }
  for (const RequestContext& c : s.closing) {
    schema::ClientReply r;
    r.op = schema::ReplyOp::kSession;
    r.id = id;
    core_.Reply(c, std::move(r));
  }
  const std::string key = s.host;
  sessions_.erase(it);
  auto h = hosts_.find(key);
  if (h == hosts_.end()) return;
  h->second.sessions.erase(id);
  if (h->second.sessions.empty()) {
    // The tenant's last session on this GPU: its process goes.
    if (h->second.pid > 0) exiting_.push_back(h->second.pid);
    hosts_.erase(h);
  }
}

void SessionServer::Drop(const std::string& key, const std::string& why) {
  auto h = hosts_.find(key);
  if (h == hosts_.end()) return;
  const pid_t pid = h->second.pid;
  std::string cause = why;
  int status = 0;
  // A process whose channel closed is ending: its status says how, if it
  // has ended already (the loop does not wait for it; Tick() reaps it).
  if (waitpid(pid, &status, WNOHANG) == pid) {
    cause = "its process " + Describe(status);
    h->second.pid = -1;
  }
  spdlog::warn("session process {} of tenant '{}' on {}: {}", pid, h->second.tenant,
               h->second.gpu, cause);
  const std::set<uint64_t> ids = h->second.sessions;
  if (h->second.pid > 0) exiting_.push_back(pid);
  h->second.pid = -1;
  for (uint64_t id : ids) Ended(id, Code::kSessionLost, cause);
  // (The last Ended() may have removed it already.)
  hosts_.erase(key);
}

// ---------------------------------------------------------------- relays

namespace {

bool SameToken(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

// The session requests a relay carries (hello and attach are the broker's
// own, or need the process's host).
bool Relayed(std::string_view op) {
  for (std::string_view o : {"alloc", "free", "write", "read", "copy", "fill", "launch", "close",
                             "detach"}) {
    if (op == o) return true;
  }
  return false;
}

}  // namespace

void SessionServer::Call(const RequestContext& ctx, uint64_t id, const std::string& token,
                         zmq::message_t& frame) {
  auto relay = relays_.find(id);
  Relay* r = relay == relays_.end() ? nullptr : &relay->second;
  const bool mine = r && r->conn.serial == ctx.conn.serial;
  if (mine && !r->ended.ok()) return Refuse(r, ctx, r->ended);  // behind those waiting
  if (mine && !r->closing.ok()) return Refuse(r, ctx, r->closing);  // it is ending
  if (mine && !r->unwritable.ok()) return Refuse(r, ctx, r->unwritable);
  auto it = sessions_.find(id);
  if (it == sessions_.end() || !ctx.Sees(it->second.tenant) || !it->second.open ||
      !SameToken(it->second.token, token)) {
    // Its own connection's call to a session that has ended: in order.
    if (mine && it == sessions_.end()) {
      return Refuse(r, ctx, Error(Code::kSessionLost, "the session has ended"));
    }
    const Status none = Error(Code::kNotFound, "no session " + std::to_string(id));
    return mine ? Refuse(r, ctx, none) : core_.ReplyError(ctx, none);
  }
  if (r && !mine) {
    // As the process answers a second connection's hello.
    return core_.ReplyError(ctx, Error(Code::kForbidden, "session " + std::to_string(id) +
                                                             " has its client already"));
  }
  const std::string_view bytes(static_cast<const char*>(frame.data()), frame.size());
  if (!r) {
    auto h = hosts_.find(it->second.host);
    if (h == hosts_.end()) {
      return core_.ReplyError(ctx, Error(Code::kSessionLost, "its process is gone"));
    }
    auto opened = OpenRelay(ctx, it->second, h->second);
    if (!opened.ok()) return core_.ReplyError(ctx, opened.status());
    r = *opened;
  }
  if (bytes.size() > MaxFrame()) {
    return Refuse(r, ctx, Error(Code::kTooLarge, "a session request is at most " +
                                                     std::to_string(MaxFrame() >> 20) + " MiB"));
  }
  // What the relay reads of a request: a map with an op it carries and a
  // rid, so that each answer it takes back is one call's. It looks at no
  // more elements than a request the process accepts holds (a launch of
  // 256 arguments), however many the bytes hold.
  constexpr size_t kLookAt = size_t{1} << 16;
  const std::optional<std::string_view> op = schema::PeekString(bytes, "op", kLookAt);
  if (op && !Relayed(*op)) {
    return Refuse(r, ctx, Error(Code::kUnknownCommand,
                                "no session request '" + std::string(*op) +
                                    "' through the broker (hello and attach are not relayed)"));
  }
  if (!op || schema::PeekRequestId(bytes, kLookAt) == 0) {
    return Refuse(r, ctx, Error(Code::kMalformed, "a session_call carries one session request "
                                                  "(a map with its op and a rid)"));
  }
  // What waits for the process is bounded, per session and in all: a client
  // that sends faster than its session takes requests is told so, in order.
  const size_t queued = Queued(*r);
  if (queued > 0 && queued + bytes.size() > 2 * MaxFrame()) {
    return Refuse(r, ctx, Error(Code::kResourceExhausted,
                                std::to_string(queued >> 20) +
                                    " MiB of this session's requests wait for its process; "
                                    "take answers before sending more"));
  }
  if (relay_bytes_ + bytes.size() > kRelayBytes) {
    return Refuse(r, ctx, Error(Code::kResourceExhausted,
                                "the broker holds " + std::to_string(relay_bytes_ >> 20) +
                                    " MiB of relayed session requests, its bound"));
  }
  if (r->forwarded >= kMaxRelayedCalls) {
    return Refuse(r, ctx, Error(Code::kResourceExhausted,
                                std::to_string(r->forwarded) +
                                    " calls of this session wait for their answers; take "
                                    "answers before sending more"));
  }
  if (!Admit(*r, ctx)) return;
  r->calls.push_back({ctx, Status::Ok()});
  ++r->forwarded;
  ++relayed_calls_;
  relayed_bytes_ += bytes.size();
  relay_bytes_ += bytes.size();
  if (!r->greeted) {
    // The process reads its hello alone (a packet, with nothing after it):
    // requests wait for its answer.
    r->held_bytes += bytes.size();
    r->held.push_back(std::move(frame));
    return;
  }
  r->writer.Push(std::move(frame));  // its bytes are not copied
  if (Status st = r->writer.Flush(r->fd.get(), kRelayTurn); !st.ok()) Unwritable(*r, st);
}

void SessionServer::Unwritable(Relay& r, const Status& st) {
  if (r.unwritable.ok()) {
    r.unwritable = Error(Code::kSessionLost, "the session's process is gone: " + st.message());
  }
  r.writer = RelayWriter();
  r.held.clear();
  r.held_bytes = 0;
}

void SessionServer::Refused(const RequestContext& ctx, std::optional<uint64_t> session,
                            const Status& st) {
  uint64_t id = session.value_or(0);
  if (!session) {
    // No id to read: the connection's relay, if it has exactly one.
    size_t mine = 0;
    for (const auto& [sid, r] : relays_) {
      if (r.conn.serial == ctx.conn.serial) ++mine, id = sid;
    }
    if (mine != 1) return core_.ReplyError(ctx, st);
  }
  auto relay = relays_.find(id);
  if (relay != relays_.end() && relay->second.conn.serial == ctx.conn.serial &&
      relay->second.ended.ok()) {
    return Refuse(&relay->second, ctx, st);
  }
  core_.ReplyError(ctx, st);
}

size_t SessionServer::Queued(const Relay& r) { return r.writer.queued() + r.held_bytes; }

bool SessionServer::Admit(Relay& r, const RequestContext& ctx) {
  if (r.calls.size() < 2 * kMaxRelayedCalls) return true;
  // A client that reads no answers while it sends: the relay ends (what it
  // holds is bounded) and so does the session.
  const Status full(Code::kSessionLost,
                    std::to_string(r.calls.size()) + " calls of this session (refusals among "
                    "them) waited for their answers, the broker's bound: the session ended "
                    "(read answers while sending)");
  EndRelay(r.session, full);
  core_.ReplyError(ctx, full);
  return false;
}

StatusOr<SessionServer::Relay*> SessionServer::OpenRelay(const RequestContext& ctx,
                                                          const Session& s, const Host& h) {
  UniqueFd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return Error(Code::kResourceExhausted, std::string("socket: ") + strerror(errno));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (h.path.size() >= sizeof addr.sun_path) return Error(Code::kInternal, "socket path too long");
  memcpy(addr.sun_path, h.path.c_str(), h.path.size() + 1);
  if (connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) {
    // A Unix socket connects at once or not at all (EAGAIN: its backlog is full).
    return Error(Code::kUnavailable,
                 std::string("cannot reach the session's process: ") + strerror(errno));
  }
  Relay& r = relays_.emplace(s.id, Relay(MaxFrame() + 4096)).first->second;
  r.session = s.id;
  r.conn = ctx.conn;
  r.fd = std::move(fd);
  SessionMessage hello;
  hello.op = SessionOp::kHello;
  hello.protocol = std::string(schema::kSessionProtocol);
  hello.session = s.id;
  hello.token = s.token;  // no rings: every frame on the socket
  r.writer.Push(zmq::message_t(schema::EncodeSessionMessage(hello)));
  return &r;
}

void SessionServer::Refuse(Relay* r, const RequestContext& ctx, const Status& st) {
  if (!r || r->calls.empty()) return core_.ReplyError(ctx, st);
  if (!Admit(*r, ctx)) return;
  r->calls.push_back({ctx, st});
}

bool SessionServer::AnswerRefused(Relay& r) {
  // Counted as answers are, and sent only while its client has room for
  // them as for answers: a burst of refusals could overflow ZeroMQ's queue
  // for the connection.
  while (!r.calls.empty() && !r.calls.front().refused.ok() && Room(r)) {
    const bool sent = core_.SendCountedError(r.calls.front().ctx, r.calls.front().refused);
    r.calls.pop_front();
    if (!sent) return false;
  }
  return true;
}

bool SessionServer::OnRelay(Relay& r, short revents) {
  const uint64_t id = r.session;
  if (revents & ZMQ_POLLOUT) {
    // A process that has gone may have said why before it went: that is
    // read (below, and on later turns up to its end) before the relay ends.
    if (Status st = r.writer.Flush(r.fd.get(), kRelayTurn); !st.ok()) Unwritable(r, st);
  }
  if (!(revents & (ZMQ_POLLIN | ZMQ_POLLERR))) return true;
  const Status st = r.reader.Fill(r.fd.get(), kRelayTurn);
  if (st.code() == Code::kTooLarge) {
    r.closing = Error(Code::kSessionLost, "the session's process sent " + st.message());
  } else if (!st.ok()) {
    r.closing = Error(Code::kSessionLost,
                      "the session ended (its process closed the connection; a kernel fault "
                      "or a kill there ends its tenant's sessions on that GPU)");
  }
  // The answers read before an end or a bad frame go first (Tick sends
  // those the client has no room for yet, then ends the relay).
  if (!Answers(r)) return false;
  if (!r.closing.ok() && !r.reader.ready()) {
    EndRelay(id, r.closing);
    return false;
  }
  return true;
}

bool SessionServer::Room(const Relay& r) const {
  // Bytes and messages: ZeroMQ queues at most sndhwm messages for a
  // connection, and an answer it cannot queue ends the session.
  const uint64_t room = std::min<uint64_t>(MaxFrame(), core_.options().max_unread_bytes / 2);
  return core_.ReplyBudget(r.conn) >= room &&
         core_.connections().QueuedFrames(r.conn) < kRelayFrames;
}

bool SessionServer::Answers(Relay& r) {
  const uint64_t id = r.session;
  const Status taken(Code::kSessionLost, "the session's client did not take its answers");
  zmq::message_t frame;
  while (Room(r)) {
    // The refusals whose turn it is go first; while some wait for room, so
    // do the answers after them.
    if (!AnswerRefused(r)) {
      EndRelay(id, taken);
      return false;
    }
    if (Refusing(r) || !r.reader.Next(&frame)) break;
    const std::string_view bytes(static_cast<const char*>(frame.data()), frame.size());
    const std::optional<std::string_view> op = schema::PeekString(bytes, "op");
    const uint64_t rid = schema::PeekRequestId(bytes);
    const bool error = op == std::optional<std::string_view>("error");
    if (!r.greeted && op == std::optional<std::string_view>("done") && rid == 0) {
      // The hello's answer: the requests held for it go.
      r.greeted = true;
      for (zmq::message_t& m : r.held) r.writer.Push(std::move(m));
      r.held.clear();
      r.held_bytes = 0;
      if (Status w = r.writer.Flush(r.fd.get(), kRelayTurn); !w.ok()) Unwritable(r, w);
      continue;
    }
    if (error && rid == 0) {
      // The session ended (or the hello was refused): why, for every call.
      SessionMessage m;
      Status why(Code::kSessionLost, "the session ended");
      if (schema::DecodeSessionMessage(bytes, core_.options().limits, 0, &m).ok()) {
        why = Status(m.code == Code::kOk ? Code::kSessionLost : m.code, m.error);
      }
      EndRelay(id, why);
      return false;
    }
    if (!r.greeted || r.calls.empty()) {
      EndRelay(id, Error(Code::kSessionLost, "the session's process answered a request never "
                                             "sent"));
      return false;
    }
    schema::ClientReply reply;
    reply.op = schema::ReplyOp::kSessionAnswer;
    reply.id = id;
    relayed_bytes_ += frame.size();
    Frames payload;
    payload.push_back(std::move(frame));  // as read: not copied
    const bool sent = core_.Reply(r.calls.front().ctx, std::move(reply), std::move(payload));
    r.calls.pop_front();
    --r.forwarded;
    if (!sent) {
      // Its client reads nothing (or has gone): the answers after this one
      // would be taken for the wrong calls.
      EndRelay(id, taken);
      return false;
    }
  }
  return true;
}

void SessionServer::EndRelay(uint64_t session, const Status& why) {
  auto it = relays_.find(session);
  if (it == relays_.end()) return;
  Relay& r = it->second;
  if (!r.ended.ok()) return;  // ended already: its calls have their answers
  // Every call still waiting is answered with why, counted and as its
  // client has room for them as for answers (Tick sends what waits for
  // room): up to twice kMaxRelayedCalls errors at once would pass the
  // connection's bound of unread replies.
  for (Relay::Pending& c : r.calls) {
    if (c.refused.ok()) c.refused = why;
  }
  r.forwarded = 0;
  r.fd.Reset();  // the process ends the session if it has not
  r.reader.Clear();
  r.writer = RelayWriter();
  r.held.clear();
  r.held_bytes = 0;
  r.ended = why;
  r.ended_at = core_.clock().Now();
  if (!AnswerRefused(r)) r.calls.clear();  // its client has gone
}

std::vector<SessionView> SessionServer::Views(const RequestContext* ctx) const {
  std::vector<SessionView> out;
  const MonoTime now = core_.clock().Now();
  for (const auto& [id, s] : sessions_) {
    if (ctx && !ctx->operator_ && !ctx->Sees(s.tenant)) continue;
    SessionView v;
    v.id = id;
    v.tenant = s.tenant;
    auto h = hosts_.find(s.host);
    if (h != hosts_.end()) {
      v.gpu = h->second.gpu;
      v.pid = static_cast<uint32_t>(std::max(h->second.pid, 0));
    }
    v.memory = s.memory;
    v.held = s.held;
    v.age_ms = static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::milliseconds>(now - s.opened).count());
    auto r = relays_.find(id);
    v.relayed = r != relays_.end() && r->second.ended.ok();
    out.push_back(std::move(v));
  }
  return out;
}

}  // namespace gpuq::broker
