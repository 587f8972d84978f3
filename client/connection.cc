#include "client/connection.h"

#include <random>

namespace gpuq::client_internal {

StatusOr<zmq::socket_t> ConnectDealer(zmq::context_t& ctx, const std::string& endpoint,
                                      const ClientOptions& options, char tag) {
  try {
    zmq::socket_t s(ctx, zmq::socket_type::dealer);
    std::random_device rd;
    std::string id(16, '\0');
    for (char& c : id) c = static_cast<char>(rd());
    id[0] = tag;
    s.set(zmq::sockopt::routing_id, zmq::buffer(id));
    s.set(zmq::sockopt::linger, 0);
    s.set(zmq::sockopt::sndhwm, 1000000);
    s.set(zmq::sockopt::rcvhwm, 1000000);
    if (!options.server_key.empty()) {
      s.set(zmq::sockopt::curve_serverkey, options.server_key);
      s.set(zmq::sockopt::curve_publickey, options.public_key);
      s.set(zmq::sockopt::curve_secretkey, options.secret_key);
    }
    s.connect(endpoint);
    return s;
  } catch (const zmq::error_t& e) {
    return Error(Code::kUnavailable, "connect " + endpoint + ": " + e.what());
  }
}

JobResult ToResult(schema::ClientReply& r, std::vector<zmq::message_t>& frames) {
  JobResult out;
  out.id = r.id;
  out.state = r.state;
  out.code = r.code;
  out.error = std::move(r.error);
  out.device = std::move(r.device);
  out.attempts = r.attempts;
  out.timing = r.timing;
  out.output_args = std::move(r.outputs);
  for (size_t i = 2; i < frames.size(); ++i) out.outputs.emplace_back(frames[i].to_string());
  return out;
}

}  // namespace gpuq::client_internal
