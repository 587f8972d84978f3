#include "broker/auth.h"

#include <pthread.h>
#include <spdlog/spdlog.h>

#include <zmq_addon.hpp>

namespace gpuq::broker {
namespace {

// One ZMTP property: name length (1 byte), name, value length (4 bytes,
// big-endian), value.
std::string Property(std::string_view name, std::string_view value) {
  std::string p;
  p.push_back(static_cast<char>(name.size()));
  p.append(name);
  const uint32_t n = static_cast<uint32_t>(value.size());
  for (int shift : {24, 16, 8, 0}) p.push_back(static_cast<char>((n >> shift) & 0xff));
  p.append(value);
  return p;
}

}  // namespace

StatusOr<std::unique_ptr<ZapHandler>> ZapHandler::Start(
    zmq::context_t& ctx, std::map<std::string, AllowedKey> clients,
    std::map<std::string, AllowedKey> workers) {
  zmq::socket_t socket(ctx, zmq::socket_type::rep);
  try {
    socket.bind("inproc://zeromq.zap.01");
  } catch (const zmq::error_t& e) {
    return Error(Code::kInternal, std::string("ZAP handler: ") + e.what());
  }
  return std::unique_ptr<ZapHandler>(
      new ZapHandler(std::move(socket), std::move(clients), std::move(workers)));
}

ZapHandler::ZapHandler(zmq::socket_t socket, std::map<std::string, AllowedKey> clients,
                       std::map<std::string, AllowedKey> workers)
    : socket_(std::move(socket)),
      clients_(std::move(clients)),
      workers_(std::move(workers)),
      thread_([this] { Loop(); }) {}

ZapHandler::~ZapHandler() {
  stop_ = true;
  thread_.join();
}

void ZapHandler::Loop() {
  pthread_setname_np(pthread_self(), "gpuq-zap");
  while (!stop_) {
    zmq::pollitem_t item = {socket_.handle(), 0, ZMQ_POLLIN, 0};
    zmq::poll(&item, 1, std::chrono::milliseconds(100));
    if (!(item.revents & ZMQ_POLLIN)) continue;
    std::vector<zmq::message_t> req;
    if (!zmq::recv_multipart(socket_, std::back_inserter(req))) continue;
    // [version, request id, domain, address, identity, mechanism, credentials...]
    std::string status = "400", text = "key not allowed", user, metadata;
    if (req.size() >= 7 && req[5].to_string_view() == "CURVE" && req[6].size() == 32) {
      char z85[41];
      zmq_z85_encode(z85, static_cast<const uint8_t*>(req[6].data()), 32);
      const bool workers = req[2].to_string_view() == kWorkerDomain;
      const auto& allowed = workers ? workers_ : clients_;
      auto it = allowed.find(z85);
      if (it != allowed.end()) {
        status = "200";
        text = "OK";
        user = it->second.name;
        if (it->second.operator_) metadata = Property("X-Operator", "1");
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
    reply.emplace_back(metadata.data(), metadata.size());
    zmq::send_multipart(socket_, reply);
  }
}

Peer PeerOf(const zmq::message_t& frame) {
  Peer p;
  // zmq_msg_gets takes a non-const message but does not change it.
  auto* m = const_cast<zmq_msg_t*>(frame.handle());
  if (const char* user = zmq_msg_gets(m, "User-Id")) p.tenant = user;
  if (const char* op = zmq_msg_gets(m, "X-Operator")) p.operator_ = std::string_view(op) == "1";
  return p;
}

}  // namespace gpuq::broker
