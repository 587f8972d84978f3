// The client connections of this broker's lifetime.
//
// A ROUTER names a peer by its routing id. A peer may choose that id itself,
// a later connection may take it once the first has gone, and a restarted
// broker hands out the ids of the last lifetime again. So the broker never
// sends to a bare routing id: it addresses a Connection (a routing id and a
// serial this registry gives each connection it sees), and a reply or push
// goes out only while that connection still holds the id. A job submitted
// before a restart has no connection: its result is fetched, never pushed.
//
// The registry learns that a connection has gone from the socket monitor
// (ZMQ_EVENT_DISCONNECTED, by file descriptor) and tells a new connection
// from an old one of the same id by the descriptor its messages come from
// (ZMQ_SRCFD). A descriptor is reused by the kernel: ZeroMQ queues a
// connection's disconnect before it closes the descriptor, so the registry
// drains the monitor before it takes in a connection it has not seen, and a
// late disconnect never ends the next holder of the descriptor. An id can pass to another connection only after the ROUTER
// has dropped the first one's pipe, which happens after the disconnect event
// is queued; the loop drains the monitor before it sends what it did not
// just receive a request for (pushes, and replies after a commit), so it
// never takes the new holder for the old.
//
// It also bounds what a connection may leave unread: the bytes of payload
// frames queued in ZeroMQ for it (counted when sent, released by the frame's
// free function once ZeroMQ is done with them).
//
// Owned by the broker loop thread; only the byte counters are touched by
// ZeroMQ's I/O threads (atomics).
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <zmq.hpp>

#include "util/status.h"

namespace gpuq::broker {

struct ConnectionRef {
  std::string routing_id;
  uint64_t serial = 0;  // 0: no connection (a job resumed after a restart)
  bool valid() const { return serial != 0; }
};

class ClientConnections {
 public:
  // Starts monitoring `router` for disconnects. `ctx` outlives this.
  Status Monitor(zmq::context_t& ctx, zmq::socket_t& router, const std::string& name);
  // The monitor's socket: poll it for input and then call DrainEvents().
  zmq::socket_t& events() { return monitor_; }
  void DrainEvents();

  // The connection a client message came from: frame 0 its routing id,
  // `fd` the descriptor ZeroMQ read it from (ZMQ_SRCFD).
  ConnectionRef Seen(const std::string& routing_id, int fd);
  // Whether `c` was still connected and held its routing id when the
  // monitor was last drained.
  bool Sendable(const ConnectionRef& c) const;
  size_t size() const { return by_id_.size(); }

  // Bytes of payload frames queued for `c` and not yet written out, and
  // those frames.
  uint64_t QueuedBytes(const ConnectionRef& c) const;
  uint64_t QueuedFrames(const ConnectionRef& c) const;
  // Wraps `frame` for sending to `c`: its bytes count as queued until
  // ZeroMQ releases the returned message.
  zmq::message_t Counted(const ConnectionRef& c, zmq::message_t frame);

  // What a connection has queued in ZeroMQ (released by the frames' free
  // function, on ZeroMQ's I/O thread).
  struct Queued {
    std::atomic<uint64_t> bytes{0}, frames{0};
  };

 private:
  struct Conn {
    uint64_t serial = 0;
    int fd = -1;
    std::shared_ptr<Queued> queued = std::make_shared<Queued>();
  };
  zmq::socket_t monitor_;
  uint64_t next_serial_ = 1;
  std::map<std::string, Conn> by_id_;
  std::map<int, std::set<std::string>> by_fd_;
};

}  // namespace gpuq::broker
