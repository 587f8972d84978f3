// ZeroMQ frames the broker hands on without copying their bytes.
#pragma once

#include <string>
#include <utility>
#include <zmq.hpp>

namespace gpuq::broker {

// Another message of the same bytes: a large message's are shared, not
// copied (ZeroMQ counts its references).
inline zmq::message_t Share(zmq::message_t& m) {
  zmq::message_t copy;
  copy.copy(m);
  return copy;
}

// A message that owns `s`, moved in, not copied; freed when ZeroMQ is done
// with it.
inline zmq::message_t Owning(std::string s) {
  if (s.empty()) return zmq::message_t();
  auto* owned = new std::string(std::move(s));
  return zmq::message_t(
      owned->data(), owned->size(),
      [](void*, void* hint) { delete static_cast<std::string*>(hint); }, owned);
}

}  // namespace gpuq::broker
