#include "broker/regions.h"

#include <spdlog/spdlog.h>
#include <sys/random.h>

#include <algorithm>

#include "broker/core.h"
#include "schema/codec.h"
#include "util/sealed_memfd.h"
#include "util/unix_socket.h"

namespace gpuq::broker {

using schema::Arg;
using schema::ArgKind;
using schema::RegionMessage;
using schema::RegionOp;

namespace {

bool InRegion(const Arg& a) {
  return a.in_region() &&
         (a.kind == ArgKind::kIn || a.kind == ArgKind::kOut || a.kind == ArgKind::kInOut);
}

std::string Range(const Arg& a) {
  return "[" + std::to_string(a.offset) + ", " + std::to_string(a.offset + a.size) + ")";
}

}  // namespace

bool NamesRegions(const schema::JobSpec& spec) {
  for (const Arg& a : spec.buffer_list()) {
    if (InRegion(a)) return true;
  }
  return false;
}

// ---------------------------------------------------------------- table

StatusOr<uint64_t> RegionTable::Add(const std::string& tenant, uint64_t size, UniqueFd fd,
                                    int owner) {
  // Counted only once taken: a refused tenant's name leaves nothing behind.
  const auto held = by_tenant_.find(tenant);
  const uint32_t count = held == by_tenant_.end() ? 0 : held->second.first;
  const uint64_t bytes = held == by_tenant_.end() ? 0 : held->second.second;
  if (count >= limits_.regions_per_tenant) {
    return Status(Code::kResourceExhausted,
                  "tenant '" + tenant + "' holds " + std::to_string(count) +
                      " regions, its limit (--max-regions)");
  }
  if (size > limits_.bytes_per_tenant || bytes > limits_.bytes_per_tenant - size) {
    return Status(Code::kResourceExhausted,
                  "tenant '" + tenant + "' holds regions of " + std::to_string(bytes) +
                      " bytes; " + std::to_string(size) + " more would pass its limit of " +
                      std::to_string(limits_.bytes_per_tenant) + " (--max-region-mb)");
  }
  if (regions_.size() >= limits_.regions) {
    return Status(Code::kResourceExhausted,
                  "the broker holds " + std::to_string(regions_.size()) +
                      " regions, its limit in all (--max-regions-total)");
  }
  if (size > limits_.bytes || total_bytes_ > limits_.bytes - size) {
    return Status(Code::kResourceExhausted,
                  "the broker holds regions of " + std::to_string(total_bytes_) + " bytes; " +
                      std::to_string(size) + " more would pass its limit in all of " +
                      std::to_string(limits_.bytes) + " (--max-region-mb-total)");
  }
  uint64_t id = 0;
  while (id == 0 || regions_.count(id)) {
    if (getrandom(&id, sizeof id, 0) != sizeof id) {
      return Status(Code::kInternal, "getrandom failed");
    }
  }
  Region& r = regions_[id];
  r.id = id;
  r.tenant = tenant;
  r.size = size;
  r.fd = std::make_shared<const UniqueFd>(std::move(fd));
  r.owner = owner;
  auto& [n, b] = by_tenant_[tenant];
  ++n;
  b += size;
  total_bytes_ += size;
  return id;
}

Status RegionTable::Check(const std::string& tenant, const std::vector<Arg>& buffers) const {
  std::vector<std::pair<uint64_t, const Arg*>> own_writes;
  for (size_t i = 0; i < buffers.size(); ++i) {
    const Arg& a = buffers[i];
    if (!InRegion(a)) continue;
    auto which = [&] { return "buffer " + std::to_string(i) + ": region " + std::to_string(a.region); };
    auto it = regions_.find(a.region);
    // Another tenant's region reads as no region at all.
    if (it == regions_.end() || it->second.tenant != tenant) {
      return Status(Code::kNotFound, which() + " is not a region of tenant '" + tenant + "'");
    }
    const Region& r = it->second;
    if (r.ended) return Status(Code::kNotFound, which() + " has ended (" + r.why + ")");
    if (a.offset > r.size || a.size > r.size - a.offset) {
      return Status(Code::kInvalid, which() + ": range " + Range(a) + " is outside its " +
                                        std::to_string(r.size) + " bytes");
    }
    if (a.kind == ArgKind::kIn) continue;
    const uint64_t end = a.offset + a.size;
    // The write nearest below or at `offset`, and the next: the ranges held
    // never overlap, so these two are the only candidates.
    auto next = r.writes.upper_bound(a.offset);
    if (next != r.writes.begin()) {
      auto prev = std::prev(next);
      if (prev->second.first > a.offset) {
        return Status(Code::kInvalid, which() + ": range " + Range(a) +
                                          " overlaps bytes that job " +
                                          std::to_string(prev->second.second) + " writes");
      }
    }
    if (next != r.writes.end() && next->first < end) {
      return Status(Code::kInvalid, which() + ": range " + Range(a) +
                                        " overlaps bytes that job " +
                                        std::to_string(next->second.second) + " writes");
    }
    own_writes.emplace_back(a.region, &a);
  }
  std::sort(own_writes.begin(), own_writes.end(), [](const auto& x, const auto& y) {
    return x.first != y.first ? x.first < y.first : x.second->offset < y.second->offset;
  });
  for (size_t k = 1; k < own_writes.size(); ++k) {
    const auto& [ra, a] = own_writes[k - 1];
    const auto& [rb, b] = own_writes[k];
    if (ra == rb && a->offset + a->size > b->offset) {
      return Status(Code::kInvalid, "region " + std::to_string(ra) + ": the job writes " +
                                        Range(*a) + " and " + Range(*b) + ", which overlap");
    }
  }
  return Status::Ok();
}

void RegionTable::Use(uint64_t job, const std::vector<Arg>& buffers) {
  for (const Arg& a : buffers) {
    if (!InRegion(a)) continue;
    auto it = regions_.find(a.region);
    if (it == regions_.end()) continue;
    Region& r = it->second;
    r.jobs.insert(job);
    const bool writes = a.kind != ArgKind::kIn;
    if (writes) r.writes.emplace(a.offset, std::make_pair(a.offset + a.size, job));
    uses_[job].push_back({a.region, a.offset, a.offset + a.size, writes});
  }
}

std::vector<uint64_t> RegionTable::Release(uint64_t job) {
  std::vector<uint64_t> gone;
  auto u = uses_.find(job);
  if (u == uses_.end()) return gone;
  for (const Use_& use : u->second) {
    auto it = regions_.find(use.region);
    if (it == regions_.end()) continue;
    Region& r = it->second;
    if (use.writes) {
      auto w = r.writes.find(use.offset);
      if (w != r.writes.end() && w->second.second == job) r.writes.erase(w);
    }
    r.jobs.erase(job);
    if (r.ended && r.jobs.empty()) {
      Uncount(r);
      gone.push_back(r.id);
      regions_.erase(it);
    }
  }
  uses_.erase(u);
  return gone;
}

std::set<uint64_t> RegionTable::End(uint64_t id, const std::string& why, bool* gone) {
  *gone = false;
  auto it = regions_.find(id);
  if (it == regions_.end() || it->second.ended) return {};
  Region& r = it->second;
  r.ended = true;
  r.why = why;
  if (r.jobs.empty()) {
    Uncount(r);
    regions_.erase(it);
    *gone = true;
    return {};
  }
  return r.jobs;
}

void RegionTable::Uncount(const Region& r) {
  auto it = by_tenant_.find(r.tenant);
  if (it == by_tenant_.end()) return;
  auto& [count, bytes] = it->second;
  --count;
  bytes -= r.size;
  if (count == 0) by_tenant_.erase(it);
  total_bytes_ -= r.size;
}

bool RegionTable::Live(uint64_t job) const {
  auto u = uses_.find(job);
  if (u == uses_.end()) return false;
  for (const Use_& use : u->second) {
    auto it = regions_.find(use.region);
    if (it == regions_.end() || it->second.ended) return false;
  }
  return true;
}

const RegionTable::Region* RegionTable::Find(uint64_t id) const {
  auto it = regions_.find(id);
  return it == regions_.end() ? nullptr : &it->second;
}


// ---------------------------------------------------------------- channel

Status RegionServer::Listen(const std::string& path) {
  GPUQ_ASSIGN_OR_RETURN(listener_, ListenSeqpacket(path));
  path_ = path;
  return Status::Ok();
}

void RegionServer::PollItems(std::vector<zmq::pollitem_t>* items) const {
  if (!listener_.valid()) return;
  // Paused after an accept failed for want of descriptors: the listener
  // stays readable, and would keep the loop from sleeping.
  if (core_.clock().Now() >= accept_paused_until_) {
    items->push_back({nullptr, listener_.get(), ZMQ_POLLIN, 0});
  }
  for (const auto& [fd, c] : conns_) {
    items->push_back(
        {nullptr, fd, static_cast<short>(ZMQ_POLLIN | (c.out.empty() ? 0 : ZMQ_POLLOUT)), 0});
  }
}

void RegionServer::OnPoll(const zmq::pollitem_t* items, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (!items[i].revents) continue;
    if (items[i].fd == listener_.get()) {
      Accept();
      continue;
    }
    auto it = conns_.find(items[i].fd);
    if (it == conns_.end()) continue;
    Conn& c = it->second;
    if (items[i].revents & ZMQ_POLLOUT) Flush(c);
    if ((items[i].revents & (ZMQ_POLLIN | ZMQ_POLLERR)) && !OnReadable(c)) c.broken = true;
  }
  Sweep();
}

void RegionServer::Sweep() {
  std::vector<int> broken;
  for (const auto& [fd, c] : conns_) {
    if (c.broken) broken.push_back(fd);
  }
  for (int fd : broken) Close(fd);
}

void RegionServer::Accept() {
  for (;;) {
    auto c = AcceptSeqpacket(listener_.get());
    if (!c.ok()) {
      spdlog::warn("region channel: {}; new connections wait 100 ms", c.status().ToString());
      accept_paused_until_ = core_.clock().Now() + std::chrono::milliseconds(100);
      return;
    }
    if (!c->valid()) return;
    if (conns_.size() >= core_.options().regions.connections) {
      // Over the bound: closed at once (a client sees its channel end).
      if (!refused_logged_) {
        spdlog::warn("region channel: {} connections, its bound; new ones are closed",
                     conns_.size());
        refused_logged_ = true;
      }
      continue;
    }
    refused_logged_ = false;
    const int fd = c->get();
    Conn& conn = conns_[fd];
    conn.fd = std::move(*c);
    conn.accepted = core_.clock().Now();
  }
}

void RegionServer::Tick() {
  const MonoTime now = core_.clock().Now();
  bool any = false;
  for (auto& [fd, c] : conns_) {
    if (!c.hello && now - c.accepted >= kHelloWithin) {
      c.broken = true;
      any = true;
    }
  }
  if (!any) return;
  spdlog::info("region channel: connections that said no hello within {} s are closed",
               kHelloWithin.count());
  Sweep();
}

bool RegionServer::OnReadable(Conn& c) {
  // A few messages per turn, so that one connection cannot hold the loop.
  for (int k = 0; k < 16 && !c.broken; ++k) {
    auto p = RecvPacket(c.fd.get(), schema::kMaxRegionMessageBytes, /*dontwait=*/true);
    if (!p.ok()) {
      ReplyError(c, 0, p.status());
      continue;
    }
    if (p->none) return true;
    if (p->eof) return false;
    RegionMessage m;
    if (Status s = schema::DecodeRegionMessage(p->bytes, core_.options().limits, &m); !s.ok()) {
      ReplyError(c, 0, s);
      continue;
    }
    OnMessage(c, m, std::move(p->fd));
  }
  return true;
}

void RegionServer::OnMessage(Conn& c, RegionMessage& m, UniqueFd fd) {
  const bool carries = m.op == RegionOp::kRegister;
  if (fd.valid() != carries) {
    return ReplyError(c, m.rid, Status(Code::kInvalid, carries ? "register carries the memfd "
                                                                  "(SCM_RIGHTS)"
                                                                : "only register carries a "
                                                                  "descriptor"));
  }
  if (!c.hello) {
    if (m.op != RegionOp::kHello || m.protocol != schema::kRegionProtocol) {
      return ReplyError(c, m.rid, Status(Code::kBadVersion,
                                         "the first message is hello with protocol " +
                                             std::string(schema::kRegionProtocol)));
    }
    c.hello = true;
    c.worker = m.worker;
    if (!c.worker) return;
    if (m.token.empty()) {
      c.broken = true;  // a worker's hello names its token
      return;
    }
    c.token = m.token;
    // Regions go only to a worker the worker endpoint knows, on this host,
    // by this token: now if it has registered, else when it does.
    pending_[c.token] = c.fd.get();
    return Verify(c.token);
  }
  if (c.worker) {
    c.broken = true;  // a worker only listens here
    return;
  }
  if (m.rid == 0) return ReplyError(c, 0, Status(Code::kMalformed, "rid must be at least 1"));
  switch (m.op) {
    case RegionOp::kRegister: {
      const std::string tenant = m.tenant.empty() ? "default" : m.tenant;
      if (m.size == 0) return ReplyError(c, m.rid, Status(Code::kInvalid, "a region is at least 1 byte"));
      if (Status s = CheckSealedMemfd(fd.get(), m.size); !s.ok()) return ReplyError(c, m.rid, s);
      auto id = core_.regions().Add(tenant, m.size, std::move(fd), c.fd.get());
      if (!id.ok()) return ReplyError(c, m.rid, id.status());
      c.regions.insert(*id);
      // Handed to the workers now, so that they map and lock it before the
      // first job that names it.
      const RegionTable::Region& r = *core_.regions().Find(*id);
      for (const auto& [token, wfd] : workers_) {
        auto w = conns_.find(wfd);
        if (w != conns_.end()) SendRegion(w->second, r);
      }
      spdlog::info("region {} registered: tenant {}, {} bytes", *id, tenant, m.size);
      RegionMessage reply;
      reply.op = RegionOp::kRegistered;
      reply.rid = m.rid;
      reply.region = *id;
      reply.size = m.size;
      return Reply(c, reply);
    }
    case RegionOp::kUnregister: {
      if (!c.regions.count(m.region)) {
        return ReplyError(c, m.rid, Status(Code::kNotFound,
                                           "region " + std::to_string(m.region) +
                                               " is not one this connection registered"));
      }
      c.regions.erase(m.region);
      EndRegion(m.region, "unregistered");
      RegionMessage reply;
      reply.op = RegionOp::kUnregistered;
      reply.rid = m.rid;
      reply.region = m.region;
      return Reply(c, reply);
    }
    default:
      return ReplyError(c, m.rid, Status(Code::kInvalid, "a client sends register or unregister, "
                                                         "not " +
                                                             std::string(RegionOpName(m.op))));
  }
}

void RegionServer::WorkerReady(const std::string& token) { Verify(token); }

void RegionServer::Verify(const std::string& token) {
  auto p = pending_.find(token);
  if (p == pending_.end()) return;
  const Worker* w = core_.workers().FindByToken(token);
  if (!w || !w->local) return;  // not (yet) a worker of this host
  auto c = conns_.find(p->second);
  pending_.erase(p);
  if (c == conns_.end()) return;
  if (auto old = workers_.find(token); old != workers_.end() && old->second != c->first) {
    if (auto o = conns_.find(old->second); o != conns_.end()) o->second.broken = true;
  }
  workers_[token] = c->first;
  c->second.verified = true;
  // Every live region, so that any job may go to this worker.
  for (const auto& [id, r] : core_.regions().all()) {
    if (!r.ended) SendRegion(c->second, r);
  }
  spdlog::info("region channel: worker {} attached", w->name);
}

void RegionServer::Reply(Conn& c, const RegionMessage& m) {
  // A client that does not read its replies fills its socket: past that it
  // hears nothing more.
  if (Status s = SendPacket(c.fd.get(), schema::EncodeRegionMessage(m), -1, true); !s.ok()) {
    spdlog::warn("region channel: a reply was not sent: {}", s.ToString());
  }
}

void RegionServer::ReplyError(Conn& c, uint64_t rid, const Status& s) {
  RegionMessage r;
  r.op = RegionOp::kError;
  r.rid = rid;
  r.code = s.code() == Code::kOk ? Code::kInternal : s.code();
  r.error = s.message().substr(0, 1024);
  Reply(c, r);
}

void RegionServer::Enqueue(Conn& w, const RegionMessage& m,
                           std::shared_ptr<const UniqueFd> pass) {
  if (w.broken) return;
  if (m.op == RegionOp::kDrop) {
    // A region dropped before it was handed over is not handed over at
    // all: a worker slow to read its channel holds no descriptor, and no
    // place in its queue, for regions that came and went meanwhile.
    for (auto it = w.out.begin(); it != w.out.end(); ++it) {
      if (it->region == m.region) {
        w.out.erase(it);
        return;
      }
    }
  }
  // In order, behind what waits: a region's drop never passes its region.
  if (w.out.size() >= kMaxQueued) {
    spdlog::warn("region channel: worker {} does not read its channel; it is closed",
                 w.token.substr(0, 8));
    w.broken = true;
    return;
  }
  Outgoing o;
  o.bytes = schema::EncodeRegionMessage(m);
  if (m.op == RegionOp::kRegion) o.region = m.region;
  o.fd = std::move(pass);
  w.out.push_back(std::move(o));
  Flush(w);
}

void RegionServer::Flush(Conn& w) {
  while (!w.out.empty() && !w.broken) {
    Outgoing& o = w.out.front();
    Status s = SendPacket(w.fd.get(), o.bytes, o.fd ? o.fd->get() : -1, /*dontwait=*/true);
    if (s.code() == Code::kUnavailable) return;  // full: when it can take more (POLLOUT)
    if (!s.ok()) {
      // A worker whose channel fails takes no job that names a region until
      // it connects again.
      spdlog::warn("region channel: worker {} not reached ({}); its channel is closed",
                   w.token.substr(0, 8), s.ToString());
      w.broken = true;
      return;
    }
    w.out.pop_front();
  }
}

void RegionServer::SendRegion(Conn& w, const RegionTable::Region& r) {
  RegionMessage m;
  m.op = RegionOp::kRegion;
  m.region = r.id;
  m.size = r.size;
  Enqueue(w, m, r.fd);
}

void RegionServer::Dropped(uint64_t id) {
  RegionMessage m;
  m.op = RegionOp::kDrop;
  m.region = id;
  for (const auto& [token, fd] : workers_) {
    auto c = conns_.find(fd);
    if (c != conns_.end()) Enqueue(c->second, m, nullptr);
  }
  spdlog::info("region {} dropped", id);
}

void RegionServer::EndRegion(uint64_t id, const std::string& why) {
  bool gone = false;
  const std::set<uint64_t> jobs = core_.regions().End(id, why, &gone);
  if (gone) Dropped(id);
  // Jobs not yet running never will: they would read or write memory that
  // is no longer the client's to give. Those running finish first.
  for (uint64_t jid : jobs) core_.RegionEnded(jid, id, why);
}

void RegionServer::Close(int fd) {
  auto it = conns_.find(fd);
  if (it == conns_.end()) return;
  Conn c = std::move(it->second);
  conns_.erase(it);
  if (c.worker) {
    auto w = workers_.find(c.token);
    if (w != workers_.end() && w->second == fd) {
      workers_.erase(w);
      core_.WorkerChannelClosed(c.token);
    }
    auto p = pending_.find(c.token);
    if (p != pending_.end() && p->second == fd) pending_.erase(p);
    return;
  }
  for (uint64_t id : c.regions) EndRegion(id, "its client went away");
}

}  // namespace gpuq::broker
