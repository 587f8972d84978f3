// Encoding and decoding of protocol version 1 (schema/PROTOCOL.md).
//
// A message is frames: [protocol name, msgpack header, payload...]. The
// codec deals with the header; payload frames are never copied into it, and
// the decoders only need the payload frames' sizes to check references.
//
// Encoders write the canonical form: map keys in the order of PROTOCOL.md's
// tables, optional keys left out when they hold their default, integers in
// their smallest msgpack form. Decoders accept keys in any order, reject
// unknown and duplicate keys, wrong types, values out of range and anything
// over `Limits`, each with a Status whose code goes on the wire. All
// functions are thread-safe (no shared state) and never throw.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "schema/messages.h"
#include "util/status.h"

namespace gpuq::schema {

// kBadVersion when `frame` names another version of `expected`'s protocol,
// kMalformed when it names no gpuq protocol at all.
Status CheckProtocolFrame(std::string_view frame, std::string_view expected);

std::string EncodeClientRequest(const ClientRequest& m);
std::string EncodeClientReply(const ClientReply& m);
std::string EncodeWorkerMessage(const WorkerMessage& m);
std::string EncodeBrokerMessage(const BrokerMessage& m);

// `payload_sizes` holds the size of each payload frame, in order. On failure
// `out` is unchanged, except for a submit that decoded but failed its checks
// (ValidateJob): then out->op is kSubmit and out->job.files holds the local
// files it named, which are the broker's to remove.
Status DecodeClientRequest(std::string_view header,
                           std::span<const uint64_t> payload_sizes,
                           const Limits& limits, ClientRequest* out);
Status DecodeClientReply(std::string_view header,
                         std::span<const uint64_t> payload_sizes,
                         const Limits& limits, ClientReply* out);
Status DecodeWorkerMessage(std::string_view header,
                           std::span<const uint64_t> payload_sizes,
                           const Limits& limits, WorkerMessage* out);
Status DecodeBrokerMessage(std::string_view header,
                           std::span<const uint64_t> payload_sizes,
                           const Limits& limits, BrokerMessage* out);

// The header of a batch (worker protocol); `payload_sizes` are the frames
// after it. kMalformed unless every part has at least its header frame and
// the parts add up to the frames; kTooLarge over kMaxBatchParts.
// The region channel's messages (PROTOCOL.md, "Regions").
std::string EncodeRegionMessage(const RegionMessage& m);
Status DecodeRegionMessage(std::string_view bytes, const Limits& limits, RegionMessage* out);

// Session channel messages (PROTOCOL.md, "Sessions"): one frame's bytes.
// `max_data` bounds a write's or a read's data and a module's image.
std::string EncodeSessionMessage(const SessionMessage& m);
// The same with the frame's length in front: what goes on the channel.
std::string EncodeSessionFrame(const SessionMessage& m);
// EncodeSessionMessage without its fast paths for a launch by handle and a
// plain done: the same bytes. For tests that hold them to it.
std::string EncodeSessionMessageSlowly(const SessionMessage& m);
Status DecodeSessionMessage(std::string_view bytes, const Limits& limits, size_t max_data,
                            SessionMessage* out);
// DecodeSessionMessage without its fast path for a launch that names its
// kernel by handle (read straight from the bytes, no msgpack object tree):
// every answer of the one is the other's. For tests that hold them to it.
Status DecodeSessionMessageSlowly(std::string_view bytes, const Limits& limits,
                                  size_t max_data, SessionMessage* out);

std::string EncodeBatch(const Batch& b);
Status DecodeBatch(std::string_view header, std::span<const uint64_t> payload_sizes,
                   const Limits& limits, Batch* out);
// Whether a worker-protocol header is a batch's (its op is "batch"), read
// without decoding it whole.
bool IsBatch(std::string_view header);

// The job map alone (the broker's job store keeps it), in the same form as
// inside a submit header.
std::string EncodeJobSpec(const JobSpec& job);
Status DecodeJobSpec(std::string_view bytes, std::span<const uint64_t> payload_sizes,
                     const Limits& limits, JobSpec* out);

// The elements a peek below looks at, at most, before it gives up (as if the
// key were absent): more than the largest request the decoders accept holds
// (256 launches of 256 arguments), so that the work of a look is bounded by
// that and not by the bytes a peer sends (a frame of a billion nils).
inline constexpr size_t kPeekItems = size_t{1} << 21;

// Reads only the top-level "rid" of a client request header, so that an
// error reply to an otherwise undecodable request can still be matched by
// the client: trailing bytes, fields over their limits, bin or ext do not
// hide it. Returns 0 when there is none (0 is never a request's rid), or
// when it is not among the first `max_items` elements.
uint64_t PeekRequestId(std::string_view header, size_t max_items = kPeekItems);
// The boolean value of a top-level key of a msgpack map (a header, or a job
// map as the job store keeps it), read as PeekRequestId reads the rid;
// nullopt when it has none.
std::optional<bool> PeekBool(std::string_view map, std::string_view key,
                             size_t max_items = kPeekItems);
// The unsigned value of a top-level key, read the same way.
std::optional<uint64_t> PeekUint(std::string_view map, std::string_view key,
                                 size_t max_items = kPeekItems);
// The string value of a top-level key, read the same way (a view into `map`).
std::optional<std::string_view> PeekString(std::string_view map, std::string_view key,
                                           size_t max_items = kPeekItems);

// A local buffer's name from a client or worker: 1 to 128 of [A-Za-z0-9._-],
// not starting with '.'. Never a path.
bool IsPlainFileName(std::string_view name);

// Semantic checks of a job that the decoder also applies (kInvalid): launch
// dimensions within CUDA's limits for every architecture, a non-empty source
// and entry, priority in range, each payload frame used by exactly one
// buffer argument.
Status ValidateJob(const JobSpec& job, std::span<const uint64_t> payload_sizes,
                   const Limits& limits);

}  // namespace gpuq::schema
