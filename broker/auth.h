// CURVE authentication for the broker's endpoints: a ZAP handler (RFC 27) on
// a thread of its own that admits the allowed public keys of clients and of
// workers and binds each client connection to its key's tenant. The tenant
// reaches the broker as each message's "User-Id" property, and an operator
// key as the property "X-Operator" ("1"): schema/PROTOCOL.md, "Security".
#pragma once

#include <atomic>
#include <map>
#include <string>
#include <thread>
#include <zmq.hpp>

#include "util/curve_keys.h"
#include "util/status.h"

namespace gpuq::broker {

// The ZAP domains of the two endpoints.
inline constexpr char kClientDomain[] = "clients";
inline constexpr char kWorkerDomain[] = "workers";

class ZapHandler {
 public:
  // Binds inproc://zeromq.zap.01 on `ctx` (before any CURVE socket binds)
  // and starts answering. The key maps are copied.
  static StatusOr<std::unique_ptr<ZapHandler>> Start(zmq::context_t& ctx,
                                                     std::map<std::string, AllowedKey> clients,
                                                     std::map<std::string, AllowedKey> workers);
  ~ZapHandler();

 private:
  ZapHandler(zmq::socket_t socket, std::map<std::string, AllowedKey> clients,
             std::map<std::string, AllowedKey> workers);
  void Loop();

  zmq::socket_t socket_;  // owned by the thread once started
  const std::map<std::string, AllowedKey> clients_, workers_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// The tenant bound to a client message's connection and whether its key is
// an operator's; empty tenant off CURVE.
struct Peer {
  std::string tenant;
  bool operator_ = false;
};
Peer PeerOf(const zmq::message_t& frame);

}  // namespace gpuq::broker
