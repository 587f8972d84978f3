#include <zmq_addon.hpp>

#include "tests/broker_fixture.h"
#include "tests/fake_device.h"

namespace gpuq::testing {
namespace {

std::vector<std::string> ReceiveFrames(zmq::socket_t& s, std::chrono::milliseconds timeout) {
  zmq::pollitem_t item = {s.handle(), 0, ZMQ_POLLIN, 0};
  zmq::poll(&item, 1, timeout);
  std::vector<std::string> out;
  if (!(item.revents & ZMQ_POLLIN)) return out;
  std::vector<zmq::message_t> frames;
  if (!zmq::recv_multipart(s, std::back_inserter(frames))) return out;
  for (auto& f : frames) out.push_back(f.to_string());
  return out;
}

void SendStrings(zmq::socket_t& s, const std::vector<std::string>& frames) {
  std::vector<zmq::message_t> m;
  for (const auto& f : frames) m.emplace_back(f.data(), f.size());
  zmq::send_multipart(s, m);
}

std::vector<uint64_t> Sizes(const std::vector<std::string>& payload) {
  std::vector<uint64_t> sizes;
  for (const auto& p : payload) sizes.push_back(p.size());
  return sizes;
}

}  // namespace

RawClient::RawClient(const std::string& endpoint, const std::string& routing_id, int rcvhwm)
    : socket_(ctx_, zmq::socket_type::dealer) {
  socket_.set(zmq::sockopt::linger, 0);
  if (!routing_id.empty()) socket_.set(zmq::sockopt::routing_id, routing_id);
  if (rcvhwm > 0) {
    socket_.set(zmq::sockopt::rcvhwm, rcvhwm);
    socket_.set(zmq::sockopt::rcvbuf, 4096);
  }
  socket_.connect(endpoint);
}

RawClient::RawClient(const std::string& endpoint, const std::string& server_key,
                     const std::string& public_key, const std::string& secret_key)
    : socket_(ctx_, zmq::socket_type::dealer) {
  socket_.set(zmq::sockopt::linger, 0);
  socket_.set(zmq::sockopt::curve_serverkey, server_key);
  socket_.set(zmq::sockopt::curve_publickey, public_key);
  socket_.set(zmq::sockopt::curve_secretkey, secret_key);
  socket_.connect(endpoint);
}

void RawClient::Send(const schema::ClientRequest& request,
                     const std::vector<std::string>& payload) {
  std::vector<std::string> frames = {std::string(schema::kClientProtocol),
                                     schema::EncodeClientRequest(request)};
  frames.insert(frames.end(), payload.begin(), payload.end());
  SendStrings(socket_, frames);
}

void RawClient::SendFrames(const std::vector<std::string>& frames) {
  SendStrings(socket_, frames);
}

std::optional<RawClient::Reply> RawClient::Receive(std::chrono::milliseconds timeout) {
  std::vector<std::string> frames = ReceiveFrames(socket_, timeout);
  if (frames.size() < 2) return std::nullopt;
  Reply r;
  r.payload.assign(frames.begin() + 2, frames.end());
  Status s = schema::DecodeClientReply(frames[1], Sizes(r.payload), {}, &r.header);
  EXPECT_TRUE(s.ok()) << s.ToString() << " (a reply)";
  return r;
}

RawWorker::RawWorker(const std::string& endpoint) : socket_(ctx_, zmq::socket_type::dealer) {
  socket_.set(zmq::sockopt::linger, 0);
  socket_.connect(endpoint);
}

void RawWorker::Ready(const std::string& arch, uint32_t slots, const std::string& uuid) {
  schema::WorkerMessage m;
  m.op = schema::WorkerOp::kReady;
  m.worker = "raw:0:0";
  m.device = FakeDevice("raw test worker", uuid, arch);
  m.slots = slots;
  m.module_slots = 16;
  m.token = "0123456789abcdef0123456789abcdef";
  Send(m);
}

void RawWorker::Send(const schema::WorkerMessage& m, const std::vector<std::string>& payload) {
  std::vector<std::string> frames = {std::string(schema::kWorkerProtocol),
                                     schema::EncodeWorkerMessage(m)};
  frames.insert(frames.end(), payload.begin(), payload.end());
  SendStrings(socket_, frames);
}

void RawWorker::Heartbeat(std::optional<std::vector<schema::WorkerMessage::Running>> running) {
  schema::WorkerMessage m;
  m.op = schema::WorkerOp::kHeartbeat;
  m.free_bytes = 1ull << 34;
  m.running = std::move(running);
  Send(m);
}

std::optional<RawWorker::Message> RawWorker::Receive(std::chrono::milliseconds timeout) {
  const auto until = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    if (!received_.empty()) {
      Message m = std::move(received_.front());
      received_.pop_front();
      return m;
    }
    Heartbeat();
    const auto now = std::chrono::steady_clock::now();
    if (now >= until) return std::nullopt;
    const auto slice = std::min<std::chrono::milliseconds>(
        std::chrono::duration_cast<std::chrono::milliseconds>(until - now),
        std::chrono::milliseconds(50));
    std::vector<std::string> frames = ReceiveFrames(socket_, slice);
    if (frames.size() < 2) continue;
    // A batch is its messages, in order.
    std::vector<std::vector<std::string>> messages;
    if (schema::IsBatch(frames[1])) {
      std::vector<std::string> rest(frames.begin() + 2, frames.end());
      schema::Batch b;
      Status s = schema::DecodeBatch(frames[1], Sizes(rest), {}, &b);
      EXPECT_TRUE(s.ok()) << s.ToString();
      size_t next = 0;
      for (uint32_t n : b.parts) {
        std::vector<std::string> one = {frames[0]};
        for (uint32_t i = 0; i < n; ++i) one.push_back(rest[next++]);
        messages.push_back(std::move(one));
      }
    } else {
      messages.push_back(std::move(frames));
    }
    for (auto& f : messages) {
      Message m;
      m.payload.assign(f.begin() + 2, f.end());
      Status s = schema::DecodeBrokerMessage(f[1], Sizes(m.payload), {}, &m.header);
      EXPECT_TRUE(s.ok()) << s.ToString();
      if (m.header.op == schema::BrokerOp::kHeartbeat) continue;
      received_.push_back(std::move(m));
    }
  }
}

void RawWorker::Done(const Message& message, char fill, size_t drop) {
  const schema::BrokerMessage& job = message.header;
  schema::WorkerMessage r;
  r.op = schema::WorkerOp::kResult;
  r.id = job.id;
  r.attempt = job.attempt;
  r.state = schema::JobState::kDone;
  std::vector<std::string> payload;
  for (size_t i = 0; i < job.args.size(); ++i) {
    const schema::Arg& a = job.args[i];
    if (a.kind != schema::ArgKind::kOut && a.kind != schema::ArgKind::kInOut) continue;
    r.outputs.push_back(static_cast<uint32_t>(i));
    const size_t size = a.kind == schema::ArgKind::kOut ? a.size
                        : a.frame < message.payload.size() ? message.payload[a.frame].size()
                                                           : 0;
    payload.push_back(std::string(size, fill));
  }
  for (size_t i = 0; i < drop && !r.outputs.empty(); ++i) {
    r.outputs.pop_back();
    payload.pop_back();
  }
  Send(r, payload);
}

}  // namespace gpuq::testing
