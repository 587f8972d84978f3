// The messages of protocol version 1, as plain structs. schema/PROTOCOL.md is
// the specification; this header and include/gpuq/types.h (the types a
// client sees: jobs, arguments, states, timing, devices) mirror it field for
// field. The codec (schema/codec.h) converts between these structs and frames.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "gpuq/status.h"
#include "gpuq/types.h"

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
  // Jobs of several launches (PROTOCOL.md, "Jobs of several launches").
  size_t max_launches = 256;             // launches per job
  size_t max_job_buffers = 256;          // buffers per job (in, out, inout, scratch)
  size_t max_sources = 16;               // sources per job, the job's own included
  uint64_t max_scratch_bytes = 16ull << 30;  // scratch bytes per job, in all

  // The limits a worker decodes jobs with: those of jobs of several launches
  // at the highest a broker may be configured with (it applied its own), the
  // payload frames those buffers and every source's module image may take,
  // and entries as long as the lowered C++ names the broker sends (a
  // template's can pass a client's 1 KiB bound on names). A job the worker
  // could not decode was dropped, and the broker waited its time limit and
  // gave the worker up, with every job it held.
  static Limits ForWorkers() {
    Limits l;
    l.max_launches = 4096;
    l.max_job_buffers = 4096;
    l.max_sources = 64;
    l.max_scratch_bytes = UINT64_MAX;
    l.max_payload_frames = l.max_job_buffers + l.max_sources;
    l.max_name_bytes = kMaxLoweredNameBytes;
    return l;
  }
  // The longest lowered kernel name the broker sends a worker; a job whose
  // kernel's is longer fails `invalid` at the broker.
  static constexpr size_t kMaxLoweredNameBytes = 64u << 10;
};

// ---------------------------------------------------------------- client side

enum class ClientOp : uint8_t {
  kSubmit, kStatus, kResult, kCancel, kStats, kDevices, kUsage, kSessionOpen, kSessionClose,
  kSessionCall
};
std::string_view ClientOpName(ClientOp op);

// What a client asks of a new session (PROTOCOL.md, "Sessions").
struct SessionSpec {
  Placement placement;
  uint64_t idle_ms = 0;  // ends after this long without a request; 0: the broker's default
  uint64_t memory = 0;   // device bytes it may hold; 0: the broker's default
  // A launch's run-time limit on the GPU; 0: the broker's default (a job's)
  uint64_t limit_ms = 0;
  bool operator==(const SessionSpec&) const = default;
};

// A request from a client. `job` is meaningful for submit, `id` for status,
// result, cancel and session_close, `session` for session_open.
struct ClientRequest {
  ClientOp op = ClientOp::kStats;
  uint64_t rid = 0;  // request id, chosen by the client, echoed in the reply
  uint64_t id = 0;
  JobSpec job;
  // usage: whose ("" the asker's own, or every tenant's for an operator),
  // and the window [since_ms, until_ms) in Unix ms (until 0: now).
  // session_open: whose session, off CURVE (on CURVE the key's tenant).
  std::string tenant;
  uint64_t since_ms = 0, until_ms = 0;
  SessionSpec session;
  // session_call: the session's token (its one payload frame is a session
  // request, PROTOCOL.md, "Sessions through the broker").
  std::string token;
  bool operator==(const ClientRequest&) const = default;
};

enum class ReplyOp : uint8_t {
  kAccepted, kError, kStatus, kResult, kCanceled, kStats, kDevices, kUsage, kSession,
  kSessionAnswer
};
std::string_view ReplyOpName(ReplyOp op);


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
  // usage: by tenant, sorted by name
  std::vector<TenantUsage> usage;
  // session (id is the session's): where its process listens and the token
  // that opens it; device as above
  std::string path, token;
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
  // heartbeat: the jobs (id, attempt) that have begun to run and not ended;
  // unset where the worker does not say (then the broker measures a job's
  // run-time limit from its dispatch).
  struct Running {
    uint64_t id = 0;
    uint32_t attempt = 0;
    bool operator==(const Running&) const = default;
  };
  std::optional<std::vector<Running>> running;
  // ready, heartbeat: the GPU's health (absent where the worker has no NVML)
  GpuHealth health;
  // disconnect
  std::string reason;
  bool operator==(const WorkerMessage&) const = default;
};

enum class ImageKind : uint8_t { kNone, kCubin, kPtx };

// A module of a job of several launches: its kernel cache key, and whether
// its image travels with the message (in payload order).
struct ModuleRef {
  std::string key;  // 64 hex digits
  ImageKind image = ImageKind::kNone;
  bool operator==(const ModuleRef&) const = default;
};

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
  // job of several launches (module, entry, launch and args then unused):
  // the images of `modules` that travel come first among the payload frames,
  // in order; each launch's `source` indexes `modules`, and its entry is the
  // lowered symbol.
  std::vector<ModuleRef> modules;
  std::vector<KernelLaunch> launches;
  std::vector<Arg> buffers;
  bool graph = false;
  // error, disconnect
  Code code = Code::kOk;
  std::string error;
  bool operator==(const BrokerMessage&) const = default;
};

// ---------------------------------------------------------------- regions

// The region channel (PROTOCOL.md, "Regions"): a Unix seqpacket socket in the
// broker's local directory, where a client on the broker's host hands over
// memory it shares (a sealed memfd, as SCM_RIGHTS) and the local workers are
// handed it. One message per packet, a msgpack map; `register` and `region`
// carry exactly one descriptor, every other message none.
inline constexpr std::string_view kRegionProtocol = "GPUQR/1";
inline constexpr size_t kMaxRegionMessageBytes = 4096;

enum class RegionOp : uint8_t {
  kHello,         // first message of a connection: protocol, role (and worker token)
  kRegister,      // client: rid, tenant, size (+ the descriptor)
  kUnregister,    // client: rid, region
  kRegistered,    // broker to client: rid, region, size
  kUnregistered,  // broker to client: rid, region
  kError,         // broker to client: rid, code, error
  kRegion,        // broker to worker: region, size (+ the descriptor)
  kDrop,          // broker to worker: region
};
std::string_view RegionOpName(RegionOp op);

struct RegionMessage {
  RegionOp op = RegionOp::kHello;
  uint64_t rid = 0;
  // hello: "GPUQR/1"; `worker` true for a worker's channel (with its token)
  std::string protocol;
  bool worker = false;
  std::string token;
  std::string tenant;   // register
  uint64_t region = 0;  // unregister, registered, unregistered, region, drop
  uint64_t size = 0;    // register, registered, region
  Code code = Code::kOk;  // error
  std::string error;
  bool operator==(const RegionMessage&) const = default;
};

// ---------------------------------------------------------------- sessions

// The session channel (PROTOCOL.md, "Sessions"): a stream socket from a
// client of the GPU's host to its session's process, and the control
// channel between the broker and that process. Every message is a frame: a
// 4-byte little-endian length, then a msgpack map.
inline constexpr std::string_view kSessionProtocol = "GPUQS/1";
inline constexpr size_t kMaxSessionControlBytes = 1u << 20;  // a frame without data or image

enum class SessionOp : uint8_t {
  // client to session process
  kHello,   // protocol, session, token
  kAlloc,   // rid, size
  kFree,    // rid, buffer
  kWrite,   // rid, buffer, offset, data (or region, region_offset, size)
  kRead,    // rid, buffer, offset, size (and region, region_offset)
  kCopy,    // rid, buffer, offset, src, src_offset, size
  kFill,    // rid, buffer, offset, size, value
  kLaunch,  // rid, kernel, launch, args
  kClose,   // rid
  // session process to client, one per request, in the order asked
  kDone,    // rid; alloc: buffer; read: data; launch: kernel_ns
  kError,   // rid, code, error (rid 0: the session ended)
  // broker to session process
  kOpen,    // session, token, memory, idle_ms, limit_ms
  kEnd,     // session
  kModule,  // rid, image, image kind, symbol (or code, error)
  // session process to broker
  kOpened,   // session (or an error with code, error)
  kEnded,    // session, code, error: why it ended
  kCompile,  // rid, kernel (its entry the one name to lower)
  kUsage,    // session, size: the device bytes it holds now
  // client to session process, the first message of a connection of its
  // own: a region's memfd (SCM_RIGHTS) to attach; done carries `region`
  kAttach,  // protocol, session, token, size
  // client to session process: the region goes once the copies that use it
  // are answered
  kDetach,  // rid, region
};
std::string_view SessionOpName(SessionOp op);

struct SessionMessage {
  SessionOp op = SessionOp::kHello;
  uint64_t rid = 0;
  std::string protocol;  // hello
  uint64_t session = 0;
  std::string token;  // hello, open
  uint32_t buffer = 0;
  uint64_t offset = 0, size = 0;
  uint32_t src = 0;
  uint64_t src_offset = 0;
  uint32_t value = 0;  // fill: the byte
  std::string data;    // write; done of read
  KernelSpec kernel;   // launch, compile
  LaunchSpec launch;
  // scalars, the session's buffers (["buf", handle] or ["buf", [handle, offset]]),
  // and the launch's own: ["in", i] and ["inout", i] of `inputs`, ["out", size],
  // ["scratch", size]
  std::vector<Arg> args;
  std::vector<std::string> inputs;   // launch: its in and inout buffers' bytes
  std::vector<std::string> outputs;  // done of launch: its out and inout buffers', in argument order
  bool untimed = false;    // launch: no CUDA events, so no kernel_ns in its answer
  // launch: the session's handle of a kernel an earlier launch named by
  // its source, instead of the source; done of a launch: that handle
  uint32_t kernel_ref = 0;
  // write, read: bytes of the session's attached region `region` from
  // `region_offset` instead of `data`; done of attach: the region's handle
  uint32_t region = 0;
  uint64_t region_offset = 0;
  uint64_t kernel_ns = 0;  // done of launch: its time on the GPU (CUDA events)
  // hello: 1 asks for the shared-memory rings; done of hello: their
  // capacity each (the memfd travels with it)
  uint64_t ring = 0;
  uint64_t memory = 0, idle_ms = 0;  // open
  uint64_t limit_ms = 0;             // open: a launch's run-time limit (0: none)
  std::string image;                 // module
  ImageKind image_kind = ImageKind::kNone;
  std::string symbol;
  Code code = Code::kOk;  // error, ended, opened and module when they fail
  std::string error;
  bool operator==(const SessionMessage&) const = default;
};

}  // namespace gpuq::schema
