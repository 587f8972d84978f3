// What the two C++ clients (Client, AsyncClient) share: the DEALER socket to
// the broker and the conversion of a result reply. Internal to client/.
#pragma once

#include <chrono>
#include <map>
#include <set>
#include <string>
#include <vector>
#include <zmq.hpp>

#include "gpuq/client.h"
#include "schema/messages.h"
#include "util/fd.h"

namespace gpuq::client_internal {

// A DEALER connected to `endpoint` with a random routing id starting with
// `tag` (the broker pushes results to that id, also after reconnects;
// ZeroMQ reserves ids that start with a zero byte), large high-water marks,
// and CURVE when `options` carry keys. kUnavailable when it cannot connect.
StatusOr<zmq::socket_t> ConnectDealer(zmq::context_t& ctx, const std::string& endpoint,
                                      const ClientOptions& options, char tag);

// Sends one message of the client protocol: its version frame, `header`,
// then `payload`. A signal that interrupts a frame's send does not end it
// (each frame is sent again until it is taken: a message is never left
// partial); kUnavailable when ZeroMQ refuses it.
Status SendRequest(zmq::socket_t& socket, std::string_view header,
                   const std::vector<std::string_view>& payload = {});

// zmq::poll that a signal does not end: EINTR is an empty poll (other
// errors throw, as zmq::poll's do).
void PollOnce(zmq::pollitem_t* items, size_t count, std::chrono::milliseconds timeout);

// A status or result reply, with its payload frames (from frame 2 on), as a
// JobResult; takes the reply's strings and the frames' bytes, and reads the
// outputs that came as local files. A file that cannot be read makes the
// result failed with kIoError.
JobResult ToResult(schema::ClientReply& reply, std::vector<zmq::message_t>& frames);

// Local buffers: writes each input of `min_bytes` or more to a new file of
// `dir` and names it in `spec->files` (renumbering the arguments' frames);
// the other inputs go to `frames`. Asks for local outputs when one will be
// that large. Returns the full paths of the files it made.
// The local input buffers a Client has made and not yet had consumed: the
// address of each mapping -> its file's name and size.
struct LocalBuffers {
  struct Entry {
    std::string name;
    size_t size = 0;
  };
  std::map<const char*, Entry> live;
};

// An input that is a live local buffer is named, not written again, and
// leaves `buffers` (consumed).
StatusOr<std::vector<std::string>> UseLocalFiles(const std::string& dir, size_t min_bytes,
                                                 const std::vector<std::string_view>& inputs,
                                                 schema::JobSpec* spec,
                                                 std::vector<std::string_view>* frames,
                                                 LocalBuffers* buffers = nullptr);

// A Client's region channel (PROTOCOL.md, "Regions"): one connection for
// all its regions, shared with them (a region may outlive its Client); the
// broker ends every region registered on it when it closes.
struct RegionChannel {
  UniqueFd fd;
  uint64_t rid = 0;
  std::chrono::milliseconds timeout{10000};
  // Registers that timed out: a region their late answers name is
  // unregistered at once (it had no owner here, and counted against the
  // tenant's bounds until the channel closed).
  std::set<uint64_t> abandoned;
  // Sends `m` (with `pass` unless -1) and waits for its reply: kTimeout,
  // or the broker's error as a Status.
  StatusOr<schema::RegionMessage> Call(schema::RegionMessage m, int pass = -1);
  // A reply to a call that stopped waiting; false if the channel failed.
  bool Late(const schema::RegionMessage& r);
  // One message that has come (false: none has); the channel is closed
  // when the broker's end has gone.
  StatusOr<bool> ReadOne(schema::RegionMessage* r);
};

}  // namespace gpuq::client_internal
