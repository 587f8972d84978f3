#include "broker/sessions.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/random.h>
#include <sys/socket.h>
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
                                   "--max-attach-mb", std::to_string(limits_.max_attach_mb)};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, theirs.get(), 3);
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
  s.closing.push_back(ctx);
  auto h = hosts_.find(s.host);
  if (h == hosts_.end()) return Ended(id, Code::kSessionLost, "its process is gone");
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
}

void SessionServer::OnPoll(const zmq::pollitem_t* items, size_t n) {
  std::vector<std::string> keys;
  for (const auto& [key, h] : hosts_) keys.push_back(key);
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
      const uint64_t rid = m.rid;
      const std::string entry = m.kernel.entry;
      core_.compiler().Submit(
          std::move(req), h.tenant,
          [this, key, rid, entry](const Digest&, StatusOr<compile::EntryPtr> result,
                                  const compile::CompileInfo&) {
            {
              MutexLock lock(&mu_);
              compiled_.push_back(Compiled{key, rid, entry, std::move(result)});
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
  std::vector<Compiled> done;
  {
    MutexLock lock(&mu_);
    done.swap(compiled_);
  }
  for (Compiled& c : done) {
    auto it = hosts_.find(c.host);
    if (it == hosts_.end()) continue;
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
    out.push_back(std::move(v));
  }
  return out;
}

}  // namespace gpuq::broker
