// What the two C++ clients (Client, AsyncClient) share: the DEALER socket to
// the broker and the conversion of a result reply. Internal to client/.
#pragma once

#include <string>
#include <vector>
#include <zmq.hpp>

#include "gpuq/client.h"

namespace gpuq::client_internal {

// A DEALER connected to `endpoint` with a random routing id starting with
// `tag` (the broker pushes results to that id, also after reconnects;
// ZeroMQ reserves ids that start with a zero byte), large high-water marks,
// and CURVE when `options` carry keys. kUnavailable when it cannot connect.
StatusOr<zmq::socket_t> ConnectDealer(zmq::context_t& ctx, const std::string& endpoint,
                                      const ClientOptions& options, char tag);

// A status or result reply, with its payload frames (from frame 2 on), as a
// JobResult; takes the reply's strings and the frames' bytes.
JobResult ToResult(schema::ClientReply& reply, std::vector<zmq::message_t>& frames);

}  // namespace gpuq::client_internal
