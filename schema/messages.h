// The messages of protocol version 1, as plain structs. schema/PROTOCOL.md is
// the specification; this header mirrors it field for field. The codec
// (schema/codec.h) converts between these structs and frames.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "util/status.h"

namespace gpuq::schema {

// Frame 0 of every message names the protocol and its version.
inline constexpr std::string_view kClientProtocol = "GPUQ/1";
inline constexpr std::string_view kWorkerProtocol = "GPUQW/2";

// Limits on every size and count a message may carry (PROTOCOL.md,
// "Limits"). A decoder given a message over any of them rejects it with
// Code::kTooLarge and changes nothing.
struct Limits {
  size_t max_header_bytes = 16u << 20;   // the msgpack header frame
  size_t max_source_bytes = 1u << 20;    // kernel source
  size_t max_headers = 64;               // named headers with the job
  size_t max_total_source_bytes = 4u << 20;  // source + all headers
  size_t max_name_bytes = 1024;          // entry, header names
  size_t max_options = 64;
  size_t max_option_bytes = 256;
  size_t max_args = 256;
  size_t max_payload_frames = 257;       // buffers (+1 module image)
  uint64_t max_buffer_bytes = 4ull << 30;
  size_t max_key_bytes = 128;            // idempotency key
  size_t max_tenant_bytes = 64;
  size_t max_text_bytes = 1u << 20;      // error text, compile log
  size_t max_list = 4096;                // devices, outputs, misc lists
};

enum class ScalarType : uint8_t { kU8, kI8, kU16, kI16, kU32, kI32, kU64, kI64, kF32, kF64 };
enum class ArgKind : uint8_t { kScalar, kIn, kOut, kInOut };

std::string_view ScalarTypeName(ScalarType t);
size_t ScalarSize(ScalarType t);

// One kernel argument. Scalars carry their value as a bit pattern in the low
// ScalarSize(type) bytes of `bits` (two's complement or IEEE 754). Buffers
// name a payload frame (in, inout) or an output size in bytes (out).
struct Arg {
  ArgKind kind = ArgKind::kScalar;
  ScalarType type = ScalarType::kU32;
  uint64_t bits = 0;
  uint32_t frame = 0;  // in, inout
  uint64_t size = 0;   // out

  static Arg U32(uint32_t v) { return Scalar(ScalarType::kU32, v); }
  static Arg I32(int32_t v) {
    return Scalar(ScalarType::kI32, static_cast<uint32_t>(v));
  }
  static Arg F32(float v);
  static Arg F64(double v);
  static Arg Scalar(ScalarType t, uint64_t bits) {
    Arg a;
    a.type = t;
    a.bits = bits;
    return a;
  }
  static Arg In(uint32_t frame) { return Buffer(ArgKind::kIn, frame, 0); }
  static Arg InOut(uint32_t frame) { return Buffer(ArgKind::kInOut, frame, 0); }
  static Arg Out(uint64_t size) { return Buffer(ArgKind::kOut, 0, size); }
  static Arg Buffer(ArgKind k, uint32_t frame, uint64_t size) {
    Arg a;
    a.kind = k;
    a.frame = frame;
    a.size = size;
    return a;
  }
  bool operator==(const Arg&) const = default;
};

struct Dim3 {
  uint32_t x = 1, y = 1, z = 1;
  uint64_t Count() const { return uint64_t{x} * y * z; }
  bool operator==(const Dim3&) const = default;
};

struct LaunchSpec {
  Dim3 grid, block;
  uint32_t shared_bytes = 0;  // dynamic shared memory
  bool operator==(const LaunchSpec&) const = default;
};

struct NamedHeader {
  std::string name, content;
  bool operator==(const NamedHeader&) const = default;
};

struct KernelSpec {
  std::string source;
  std::string entry;             // extern "C" name, or a C++ name expression
  bool name_expression = false;  // entry is a name expression ("f<int>")
  std::vector<std::string> options;
  std::vector<NamedHeader> headers;
  bool operator==(const KernelSpec&) const = default;
};

struct Placement {
  std::string arch;             // "sm_90": only devices of this architecture
  std::string gpu;              // a device UUID: only that device
  uint64_t min_free_bytes = 0;  // only devices with this much free memory
  bool operator==(const Placement&) const = default;
};

// The largest deadline and run-time limit a job may ask for: a year, and a
// week (values beyond would overflow the broker's clocks).
inline constexpr uint64_t kMaxDeadlineMs = 366ull * 24 * 3600 * 1000;
inline constexpr uint64_t kMaxTimeLimitMs = 7ull * 24 * 3600 * 1000;

inline constexpr uint32_t kDefaultPriority = 5;
inline constexpr uint32_t kMaxPriority = 9;

// A buffer passed as a file of the broker's local directory instead of a
// payload frame (PROTOCOL.md, "Local buffers"): for peers on the broker's
// host. The files of a message continue its payload frames: with n frames,
// buffer index n + i is files[i].
struct LocalFile {
  std::string name;  // from clients and workers: a plain file name; to them: a full path
  uint64_t size = 0;
  bool operator==(const LocalFile&) const = default;
};

struct JobSpec {
  std::string key;     // client idempotency key (optional)
  std::string tenant;  // optional; bound to the CURVE key on tcp
  uint32_t priority = kDefaultPriority;  // 0..9, higher first
  uint64_t deadline_ms = 0;    // must start within this; 0 = none
  uint64_t time_limit_ms = 0;  // run-time limit; 0 = broker default
  KernelSpec kernel;
  LaunchSpec launch;
  std::vector<Arg> args;
  Placement placement;
  std::vector<LocalFile> files;  // inputs as files of the local directory
  bool local_out = false;        // return large outputs as files of it
  bool operator==(const JobSpec&) const = default;
};

enum class JobState : uint8_t { kQueued, kDispatched, kDone, kFailed, kCanceled, kExpired };
std::string_view JobStateName(JobState s);
bool IsTerminal(JobState s);

struct Timing {
  uint64_t queue_us = 0, compile_us = 0, load_us = 0, h2d_us = 0,
           kernel_us = 0, d2h_us = 0, total_us = 0;
  bool cache_hit = false;
  bool operator==(const Timing&) const = default;
};

struct DeviceInfo {
  uint32_t ordinal = 0;
  std::string name, uuid;
  uint32_t cc_major = 0, cc_minor = 0;
  uint64_t total_bytes = 0, free_bytes = 0;
  uint32_t sm_count = 0, clock_khz = 0, l2_bytes = 0;
  bool managed_memory = false;
  uint32_t max_threads_per_block = 0;
  Dim3 max_block, max_grid;
  uint32_t max_shared_per_block = 0, max_shared_optin = 0;
  std::string Arch() const;  // "sm_90"
  bool operator==(const DeviceInfo&) const = default;
};

// ---------------------------------------------------------------- client side

enum class ClientOp : uint8_t { kSubmit, kStatus, kResult, kCancel, kStats, kDevices };
std::string_view ClientOpName(ClientOp op);

// A request from a client. `job` is meaningful for submit, `id` for status,
// result and cancel.
struct ClientRequest {
  ClientOp op = ClientOp::kStats;
  uint64_t rid = 0;  // request id, chosen by the client, echoed in the reply
  uint64_t id = 0;
  JobSpec job;
  bool operator==(const ClientRequest&) const = default;
};

enum class ReplyOp : uint8_t { kAccepted, kError, kStatus, kResult, kCanceled, kStats, kDevices };
std::string_view ReplyOpName(ReplyOp op);

struct WorkerView {
  std::string worker;  // worker name (host:pid:ordinal)
  DeviceInfo device;
  uint32_t slots = 0, inflight = 0;
  uint64_t heartbeat_age_ms = 0;
  bool operator==(const WorkerView&) const = default;
};

// A reply from the broker to a client. rid is 0 for a result pushed when a
// job ends.
struct ClientReply {
  ReplyOp op = ReplyOp::kError;
  uint64_t rid = 0;
  uint64_t id = 0;
  // accepted
  bool existing = false;  // the idempotency key named an existing job
  // error; result (failure reason)
  Code code = Code::kOk;
  std::string error;
  uint64_t retry_after_ms = 0;
  // status, result, canceled
  JobState state = JobState::kQueued;
  uint32_t attempts = 0;
  std::string device;  // UUID of the device that ran it
  Timing timing;
  std::vector<uint32_t> outputs;  // arg index of each output payload frame, then file
  std::vector<LocalFile> files;   // result: outputs as files (full paths)
  // stats: a msgpack map, encoded as is (PROTOCOL.md, "stats")
  std::string stats;
  // devices
  std::vector<WorkerView> workers;
  std::string local_dir;  // to clients on the broker's host: its local directory
  bool operator==(const ClientReply&) const = default;
};

// ---------------------------------------------------------------- worker side

// A batch (worker protocol): several messages sent as one multipart message,
// [protocol, batch header, message 1's header and payload, message 2's...].
// parts[i] is the number of frames of message i (its header and payload).
struct Batch {
  std::vector<uint32_t> parts;
  bool operator==(const Batch&) const = default;
};
inline constexpr size_t kMaxBatchParts = 1024;

enum class WorkerOp : uint8_t { kReady, kResult, kHeartbeat, kDisconnect };
std::string_view WorkerOpName(WorkerOp op);

struct WorkerMessage {
  WorkerOp op = WorkerOp::kHeartbeat;
  // ready
  std::string worker;
  DeviceInfo device;
  uint32_t slots = 0;         // jobs it may hold at once (initial credits)
  uint32_t module_slots = 0;  // modules it keeps loaded (LRU, see spec)
  std::string local_dir;      // the broker's local directory, if this worker can use it
  // ready, heartbeat: the worker's token, which names it on its liveness
  // connection (a heartbeat with a token may come on another connection).
  std::string token;
  // result
  uint64_t id = 0;
  uint32_t attempt = 0;
  JobState state = JobState::kDone;
  Code code = Code::kOk;
  std::string error;
  Timing timing;
  std::vector<uint32_t> outputs;
  std::vector<LocalFile> files;  // outputs written to the job's out_dir (plain names)
  // heartbeat
  uint64_t free_bytes = 0;
  uint32_t inflight = 0;
  // disconnect
  std::string reason;
  bool operator==(const WorkerMessage&) const = default;
};

enum class ImageKind : uint8_t { kNone, kCubin, kPtx };

enum class BrokerOp : uint8_t { kJob, kHeartbeat, kDisconnect, kError };
std::string_view BrokerOpName(BrokerOp op);

struct BrokerMessage {
  BrokerOp op = BrokerOp::kHeartbeat;
  // job
  uint64_t id = 0;
  uint32_t attempt = 0;
  std::string module;     // kernel cache key, 64 hex digits
  std::string entry;      // lowered symbol name to launch
  ImageKind image = ImageKind::kNone;  // module image in payload frame 0
  LaunchSpec launch;
  std::vector<Arg> args;  // buffer frames index the payload frames, then files
  uint64_t time_limit_ms = 0;
  std::vector<LocalFile> files;  // inputs as files (full paths)
  std::string out_dir;           // write large outputs as files here
  // error, disconnect
  Code code = Code::kOk;
  std::string error;
  bool operator==(const BrokerMessage&) const = default;
};

}  // namespace gpuq::schema
