// libFuzzer target: every decoder of the wire protocol on arbitrary input.
// The first byte picks the decoders and the payload frame sizes; the rest is
// the header frame (or, with bit 7, a module image for the ELF reader). A decoder must return a Status for any input, never
// crash, leak, hang or read out of bounds; what decodes must re-encode and
// decode to the same message; a session message's fast path must answer as
// its general decoder does.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "schema/codec.h"
#include "worker/module_image.h"

using namespace gpuq::schema;

namespace {

template <typename T, typename Decode, typename Encode>
void RoundTrip(std::string_view header, const std::vector<uint64_t>& sizes, Decode decode,
               Encode encode) {
  Limits limits;
  T first;
  if (!decode(header, sizes, limits, &first).ok()) return;
  T second;
  const std::string again = encode(first);
  if (!decode(again, sizes, limits, &second).ok() || !(first == second)) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t selector = data[0];
  std::string_view header(reinterpret_cast<const char*>(data + 1), size - 1);
  std::vector<uint64_t> sizes(selector >> 2 & 7, 4096);
  (void)PeekRequestId(header);
  switch (selector & 3) {
    case 0:
      RoundTrip<ClientRequest>(header, sizes, DecodeClientRequest, EncodeClientRequest);
      break;
    case 1:
      RoundTrip<ClientReply>(header, sizes, DecodeClientReply, EncodeClientReply);
      break;
    case 2:
    case 3:
      // The worker protocol: a batch, or one message of either direction.
      if (IsBatch(header)) {
        RoundTrip<Batch>(header, sizes, DecodeBatch, EncodeBatch);
      } else if ((selector & 3) == 2) {
        RoundTrip<WorkerMessage>(header, sizes, DecodeWorkerMessage, EncodeWorkerMessage);
      } else {
        RoundTrip<BrokerMessage>(header, sizes, DecodeBrokerMessage, EncodeBrokerMessage);
      }
      break;
  }
  if (selector & 0x80) {
    // A module image, read for the device memory it takes before it loads
    // (worker/module_image.h): an answer or kInvalid, nothing read outside.
    (void)gpuq::worker::ModuleDeviceBytes(header);
  }
  if (selector & 0x20) {
    // The region channel's messages (one packet each, no payload frames).
    RoundTrip<RegionMessage>(
        header, sizes,
        [](std::string_view h, const std::vector<uint64_t>&, const Limits& l, RegionMessage* m) {
          return DecodeRegionMessage(h, l, m);
        },
        EncodeRegionMessage);
  }
  if (selector & 0x40) {
    // The session channel's messages (one frame each, no payload frames).
    RoundTrip<SessionMessage>(
        header, sizes,
        [](std::string_view h, const std::vector<uint64_t>&, const Limits& l, SessionMessage* m) {
          return DecodeSessionMessage(h, l, 1u << 20, m);
        },
        EncodeSessionMessage);
    // Its fast path for launches by handle answers as the general decoder.
    SessionMessage fast, slow;
    const gpuq::Status f = DecodeSessionMessage(header, Limits{}, 1u << 20, &fast);
    const gpuq::Status s = DecodeSessionMessageSlowly(header, Limits{}, 1u << 20, &slow);
    if (f.code() != s.code() || f.message() != s.message()) std::abort();
    if (s.ok() ? !(fast == slow) : fast.rid != slow.rid || fast.op != slow.op) std::abort();
  }
  (void)PeekBool(header, "local_out");
  return 0;
}
