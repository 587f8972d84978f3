// The golden messages of schema/golden/: one canonical example of every
// command and reply, built here from structs. gpuq-golden writes them; the
// codec tests check that the files decode to these structs and re-encode
// byte for byte.
#pragma once

#include <ostream>
#include <string>
#include <variant>
#include <vector>

#include "schema/messages.h"

namespace gpuq::testing {

// A Batch's payload is the frames of its messages (headers included).
// A region channel message (PROTOCOL.md, "Regions") has no protocol frame on
// the wire (its connection's hello names the protocol); its golden file has
// one, GPUQR/1, so that every golden file has the same shape; so does a
// session channel message (PROTOCOL.md, "Sessions"), with GPUQS/1.
using AnyMessage = std::variant<schema::ClientRequest, schema::ClientReply,
                                schema::WorkerMessage, schema::BrokerMessage, schema::Batch,
                                schema::RegionMessage, schema::SessionMessage>;

struct GoldenMessage {
  std::string name;                  // file name without .bin
  AnyMessage message;
  std::vector<std::string> payload;  // payload frames
};

std::vector<GoldenMessage> GoldenMessages();

// For test names and failure messages.
inline void PrintTo(const GoldenMessage& g, std::ostream* os) { *os << g.name; }

// The frames of a golden message: protocol name, header, payload.
std::vector<std::string> EncodeFrames(const GoldenMessage& g);

// A golden file holds one message: each frame as a little-endian u32 length
// and then its bytes (schema/golden/README.md).
std::string PackFrames(const std::vector<std::string>& frames);
bool UnpackFrames(const std::string& file, std::vector<std::string>* frames);

}  // namespace gpuq::testing
