// The job a client submits and what it gets back: the wire protocol's types
// (PROTOCOL.md), as plain structs, in namespace gpuq::schema. Part of the
// client's public surface with gpuq/client.h and gpuq/status.h.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace gpuq::schema {

enum class ScalarType : uint8_t { kU8, kI8, kU16, kI16, kU32, kI32, kU64, kI64, kF32, kF64 };
// kScratch and kBuffer belong to jobs of several launches (PROTOCOL.md,
// "Jobs of several launches"): a scratch buffer is declared among a job's
// buffers; a launch names one of the job's buffers with kBuffer.
enum class ArgKind : uint8_t { kScalar, kIn, kOut, kInOut, kScratch, kBuffer };

std::string_view ScalarTypeName(ScalarType t);
size_t ScalarSize(ScalarType t);

// One kernel argument, or one buffer of a job of several launches. Scalars
// carry their value as a bit pattern in the low ScalarSize(type) bytes of
// `bits` (two's complement or IEEE 754). Buffers name a payload frame (in,
// inout) or a size in bytes (out, scratch). A launch's kBuffer argument names
// the job's buffer `buffer`, at byte `offset` into it. An in, out or inout
// buffer with a `region` lives in that registered region (PROTOCOL.md,
// "Regions"): its bytes are [offset, offset + size) of it, copied from there
// to the GPU (in, inout) and back into it (out, inout), never sent.
struct Arg {
  ArgKind kind = ArgKind::kScalar;
  ScalarType type = ScalarType::kU32;
  uint64_t bits = 0;
  uint32_t frame = 0;   // in, inout
  uint64_t size = 0;    // out, scratch; a region range's
  uint32_t buffer = 0;  // buffer
  uint64_t offset = 0;  // buffer; a region range's
  uint64_t region = 0;  // in, out, inout: the region's id, 0 for none

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
  static Arg Scratch(uint64_t size) { return Buffer(ArgKind::kScratch, 0, size); }
  // The job's buffer `index` (a launch's argument), at `offset` bytes.
  static Arg Ref(uint32_t index, uint64_t offset = 0) {
    Arg a;
    a.kind = ArgKind::kBuffer;
    a.buffer = index;
    a.offset = offset;
    return a;
  }
  // Bytes [offset, offset + size) of registered region `region` as an in,
  // out or inout buffer (gpuq::Region makes these for its own ranges).
  static Arg InRegion(ArgKind k, uint64_t region, uint64_t offset, uint64_t size) {
    Arg a = Buffer(k, 0, size);
    a.region = region;
    a.offset = offset;
    return a;
  }
  bool in_region() const { return region != 0; }
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

// One launch of a job of several launches: a kernel of one of the job's
// sources (0: JobSpec::kernel; i ≥ 1: JobSpec::sources[i - 1]), its launch
// dimensions, and its arguments: scalars, and kBuffer arguments naming the
// job's buffers.
struct KernelLaunch {
  uint32_t source = 0;
  std::string entry;             // extern "C" name, or a C++ name expression
  bool name_expression = false;  // entry is a name expression
  LaunchSpec launch;
  std::vector<Arg> args;
  bool operator==(const KernelLaunch&) const = default;
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
  // A job of several launches (PROTOCOL.md, "Jobs of several launches"):
  // `launches` run in order on one stream over the job's `buffers` (in, out,
  // inout, scratch); kernel.entry, launch and args are then unused (empty).
  // `sources` are sources 1, 2, ... (their entry unused); `graph` asks the
  // worker to capture the launches into a CUDA graph and replay it for later
  // jobs of the same shape.
  std::vector<KernelSpec> sources;
  std::vector<Arg> buffers;
  std::vector<KernelLaunch> launches;
  bool graph = false;
  bool operator==(const JobSpec&) const = default;

  bool multi() const { return !launches.empty(); }
  // The job's buffers: its buffer arguments' list (args of a one-launch
  // job, buffers of a job of several), which payload frames, inputs and
  // outputs index.
  const std::vector<Arg>& buffer_list() const { return multi() ? buffers : args; }
  std::vector<Arg>& buffer_list() { return multi() ? buffers : args; }
  // Source i: 0 is `kernel`, i ≥ 1 is sources[i - 1].
  const KernelSpec& source(uint32_t i) const { return i == 0 ? kernel : sources[i - 1]; }
};

enum class JobState : uint8_t { kQueued, kDispatched, kDone, kFailed, kCanceled, kExpired };
std::string_view JobStateName(JobState s);
bool IsTerminal(JobState s);

struct Timing {
  uint64_t queue_us = 0, compile_us = 0, load_us = 0, h2d_us = 0,
           kernel_us = 0, d2h_us = 0, total_us = 0;
  bool cache_hit = false;
  // A job of several launches: each launch's time on the GPU (CUDA events),
  // in order; kernel_us spans them all. Empty for a job of one launch.
  std::vector<uint64_t> launch_us;
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

// A GPU's health, as its worker reads it from NVML (PROTOCOL.md, "GPU
// health"). `known` is false where the worker has no NVML (no driver, or a
// test double without it): every other field is then 0.
struct GpuHealth {
  bool known = false;
  uint32_t util_pct = 0;         // GPU utilization over NVML's last sample period, 0..100
  uint64_t mem_used_bytes = 0;   // device memory in use, by any process
  uint32_t temp_c = 0;           // GPU temperature, degrees Celsius
  uint32_t power_mw = 0;         // power draw, milliwatts
  uint64_t ecc_corrected = 0;    // ECC errors since the driver loaded (volatile counts)
  uint64_t ecc_uncorrected = 0;
  uint64_t xid_events = 0;       // critical Xid events the worker has seen
  uint32_t last_xid = 0;         // the latest one's Xid, 0 when none
  // Why the GPU must take no more work (a critical Xid, an uncorrectable
  // ECC error); empty while it is healthy. A drained GPU stays drained
  // until its worker registers again healthy.
  std::string drain;
  bool operator==(const GpuHealth&) const = default;
};

// What a tenant used over a time window (PROTOCOL.md, "usage"): its jobs
// that ended by outcome, the time they held GPUs (dispatch to result) and
// their kernels' time (CUDA events), and their input and output bytes.
struct TenantUsage {
  std::string tenant;
  uint64_t done = 0, failed = 0, canceled = 0, expired = 0;
  uint64_t gpu_us = 0, kernel_us = 0;
  uint64_t bytes_in = 0, bytes_out = 0;
  bool operator==(const TenantUsage&) const = default;
};

// A worker as `devices` lists it.
struct WorkerView {
  std::string worker;  // worker name (host:pid:ordinal)
  DeviceInfo device;
  uint32_t slots = 0, inflight = 0;
  uint64_t heartbeat_age_ms = 0;
  GpuHealth health;
  bool operator==(const WorkerView&) const = default;
};

}  // namespace gpuq::schema
