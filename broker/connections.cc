#include "broker/connections.h"

#include <cstring>

namespace gpuq::broker {
namespace {

// Holds a frame while ZeroMQ sends it, and its connection's count.
struct CountedFrame {
  zmq::message_t frame;
  std::shared_ptr<ClientConnections::Queued> queued;
};

void ReleaseCounted(void*, void* hint) {
  auto* c = static_cast<CountedFrame*>(hint);
  c->queued->bytes.fetch_sub(c->frame.size(), std::memory_order_relaxed);
  c->queued->frames.fetch_sub(1, std::memory_order_relaxed);
  delete c;
}

}  // namespace

Status ClientConnections::Monitor(zmq::context_t& ctx, zmq::socket_t& router,
                                  const std::string& name) {
  const std::string addr = "inproc://gpuq-monitor-" + name;
  try {
    if (zmq_socket_monitor(router.handle(), addr.c_str(), ZMQ_EVENT_DISCONNECTED) != 0) {
      return Error(Code::kInternal, std::string("zmq_socket_monitor: ") + zmq_strerror(zmq_errno()));
    }
    monitor_ = zmq::socket_t(ctx, zmq::socket_type::pair);
    monitor_.set(zmq::sockopt::linger, 0);
    monitor_.connect(addr);
  } catch (const zmq::error_t& e) {
    return Error(Code::kInternal, std::string("socket monitor: ") + e.what());
  }
  return Status::Ok();
}

void ClientConnections::DrainEvents() {
  if (!monitor_) return;
  for (;;) {
    // [event (u16) + value (u32: the fd)], [address]
    zmq::message_t event, address;
    if (!monitor_.recv(event, zmq::recv_flags::dontwait)) return;
    if (event.more()) (void)monitor_.recv(address);
    if (event.size() < 6) continue;
    uint16_t kind;
    int32_t fd;
    std::memcpy(&kind, event.data(), 2);
    std::memcpy(&fd, static_cast<const char*>(event.data()) + 2, 4);
    if (kind != ZMQ_EVENT_DISCONNECTED) continue;
    auto it = by_fd_.find(fd);
    if (it == by_fd_.end()) continue;
    for (const std::string& id : it->second) {
      auto c = by_id_.find(id);
      if (c != by_id_.end() && c->second.fd == fd) by_id_.erase(c);
    }
    by_fd_.erase(it);
  }
}

ConnectionRef ClientConnections::Seen(const std::string& routing_id, int fd) {
  auto it = by_id_.find(routing_id);
  if (it == by_id_.end() || it->second.fd != fd) {
    // A connection new to the registry. Its descriptor may be one a
    // connection that has gone had: that one's disconnect was queued on the
    // monitor before the descriptor was closed, so before this connection
    // existed. Taken now, it ends the old connection, not this one.
    DrainEvents();
    it = by_id_.find(routing_id);
    if (it != by_id_.end()) by_fd_[it->second.fd].erase(routing_id);
    Conn& c = by_id_[routing_id];
    c = Conn();
    c.serial = next_serial_++;
    c.fd = fd;
    by_fd_[fd].insert(routing_id);
    return {routing_id, c.serial};
  }
  return {routing_id, it->second.serial};
}

bool ClientConnections::Sendable(const ConnectionRef& c) const {
  if (!c.valid()) return false;
  auto it = by_id_.find(c.routing_id);
  return it != by_id_.end() && it->second.serial == c.serial;
}

uint64_t ClientConnections::QueuedBytes(const ConnectionRef& c) const {
  auto it = by_id_.find(c.routing_id);
  if (it == by_id_.end() || it->second.serial != c.serial) return 0;
  return it->second.queued->bytes.load(std::memory_order_relaxed);
}

uint64_t ClientConnections::QueuedFrames(const ConnectionRef& c) const {
  auto it = by_id_.find(c.routing_id);
  if (it == by_id_.end() || it->second.serial != c.serial) return 0;
  return it->second.queued->frames.load(std::memory_order_relaxed);
}

zmq::message_t ClientConnections::Counted(const ConnectionRef& c, zmq::message_t frame) {
  auto it = by_id_.find(c.routing_id);
  if (it == by_id_.end() || frame.size() == 0) return frame;
  auto* holder = new CountedFrame{std::move(frame), it->second.queued};
  holder->queued->bytes.fetch_add(holder->frame.size(), std::memory_order_relaxed);
  holder->queued->frames.fetch_add(1, std::memory_order_relaxed);
  return zmq::message_t(holder->frame.data(), holder->frame.size(), &ReleaseCounted, holder);
}

}  // namespace gpuq::broker
