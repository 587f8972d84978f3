#include "tests/golden_messages.h"

#include <cstdint>
#include <cstring>

#include <msgpack.hpp>

#include "schema/codec.h"

namespace gpuq::testing {

using namespace schema;

namespace {

// A stats map (PROTOCOL.md, "Stats") with every key, in canonical order.
std::string SomeStats() {
  msgpack::sbuffer buf;
  msgpack::packer<msgpack::sbuffer> p(buf);
  auto key = [&](std::string_view k) {
    p.pack_str(static_cast<uint32_t>(k.size()));
    p.pack_str_body(k.data(), static_cast<uint32_t>(k.size()));
  };
  auto counts = [&](std::initializer_list<std::pair<std::string_view, uint64_t>> m) {
    p.pack_map(static_cast<uint32_t>(m.size()));
    for (const auto& [k, v] : m) {
      key(k);
      p.pack_uint64(v);
    }
  };
  p.pack_map(22);
  key("queued"), p.pack_uint64(3);
  key("queued_by_priority"), counts({{"5", 2}, {"9", 1}});
  key("queued_by_tenant"), counts({{"vm-7", 3}});
  key("inflight"), p.pack_uint64(2);
  key("inflight_by_worker"), counts({{"gpu-host-1:3112:0", 2}});
  key("compiling"), p.pack_uint64(0);
  key("submitted"), p.pack_uint64(120);
  key("rejected"), p.pack_uint64(1);
  key("requeued"), p.pack_uint64(0);
  key("quarantined"), p.pack_uint64(0);
  key("replies_dropped"), p.pack_uint64(0);
  key("session_calls"), p.pack_uint64(1200);
  key("session_call_bytes"), p.pack_uint64(5u << 20);
  key("finished"), counts({{"compile_error", 1}, {"done", 114}});
  key("latency_us");
  p.pack_map(2);
  for (const char* phase : {"queue", "total"}) {
    key(phase);
    counts({{"p50", 40}, {"p90", 80}, {"p99", 150}, {"count", 114}});
  }
  key("loop"), counts({{"iterations", 9120}, {"messages", 486}, {"busy_us", 52110},
                        {"idle_us", 3548000}});
  key("store"), counts({{"batches", 57}, {"writes", 236}, {"batch_p50_us", 180},
                         {"batch_p90_us", 420}, {"batch_p99_us", 900}});
  key("cache"), counts({{"hits", 113}, {"misses", 2}, {"entries", 2}, {"bytes", 18432}});
  key("workers");
  p.pack_array(1);
  p.pack_map(6);
  key("worker"), key("gpu-host-1:3112:0");
  key("device"), key("NVIDIA H100 80GB HBM3");
  key("uuid"), key("GPU-5f1b2c3d-0a1b-2c3d-4e5f-60718293a4b5");
  key("slots"), p.pack_uint32(8);
  key("inflight"), p.pack_uint32(2);
  key("heartbeat_age_ms"), p.pack_uint64(120);
  key("regions");
  p.pack_array(1);
  p.pack_map(5);
  key("region"), p.pack_uint64(0x5eed0000cafe0001ull);
  key("tenant"), key("vm-7");
  key("size"), p.pack_uint64(64ull << 20);
  key("jobs"), p.pack_uint64(2);
  key("ended"), p.pack_false();
  key("sessions");
  p.pack_array(1);
  p.pack_map(8);
  key("session"), p.pack_uint64(0x5e55000000000001ull);
  key("tenant"), key("vm-7");
  key("gpu"), key("GPU-5f1b2c3d-0a1b-2c3d-4e5f-60718293a4b5");
  key("memory"), p.pack_uint64(1ull << 30);
  key("held"), p.pack_uint64(8ull << 20);
  key("age_ms"), p.pack_uint64(91000);
  key("pid"), p.pack_uint32(4242);
  key("relayed"), p.pack_true();
  key("uptime_s"), p.pack_double(3600.5);
  return std::string(buf.data(), buf.size());
}

GpuHealth SomeHealth() {
  GpuHealth h;
  h.known = true;
  h.util_pct = 87;
  h.mem_used_bytes = 12884901888ull;
  h.temp_c = 61;
  h.power_mw = 412000;
  h.ecc_corrected = 3;
  h.ecc_uncorrected = 0;
  h.xid_events = 1;
  h.last_xid = 79;
  return h;
}

DeviceInfo H100() {
  DeviceInfo d;
  d.ordinal = 0;
  d.name = "NVIDIA H100 80GB HBM3";
  d.uuid = "GPU-5f1b2c3d-0a1b-2c3d-4e5f-60718293a4b5";
  d.cc_major = 9;
  d.cc_minor = 0;
  d.total_bytes = 85045231616ull;
  d.free_bytes = 84500000000ull;
  d.sm_count = 132;
  d.clock_khz = 1980000;
  d.l2_bytes = 52428800;
  d.managed_memory = true;
  d.max_threads_per_block = 1024;
  d.max_block = {1024, 1024, 64};
  d.max_grid = {2147483647, 65535, 65535};
  d.max_shared_per_block = 49152;
  d.max_shared_optin = 232448;
  return d;
}

JobSpec Saxpy() {
  JobSpec j;
  j.key = "vm-17/job-0042";
  j.tenant = "guest-17";
  j.priority = 7;
  j.deadline_ms = 5000;
  j.time_limit_ms = 2000;
  j.kernel.source =
      "extern \"C\" __global__ void saxpy(float a, const float* x, float* y, int n) {\n"
      "  int i = blockIdx.x * blockDim.x + threadIdx.x;\n"
      "  if (i < n) y[i] = a * x[i] + y[i];\n}\n";
  j.kernel.entry = "saxpy";
  j.kernel.options = {"--use_fast_math"};
  j.launch.grid = {4, 1, 1};
  j.launch.block = {256, 1, 1};
  j.args = {Arg::F32(2.5f), Arg::In(0), Arg::InOut(1), Arg::I32(1024)};
  j.placement.arch = "sm_90";
  return j;
}

std::string Bytes(size_t n, uint8_t seed) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<char>(seed + i * 7);
  return s;
}

Timing SomeTiming() {
  Timing t;
  t.queue_us = 12;
  t.compile_us = 3;
  t.load_us = 21;
  t.h2d_us = 9;
  t.kernel_us = 4;
  t.d2h_us = 8;
  t.total_us = 71;
  t.cache_hit = true;
  return t;
}

}  // namespace

std::vector<GoldenMessage> GoldenMessages() {
  std::vector<GoldenMessage> g;

  // client -> broker
  {
    ClientRequest r;
    r.op = ClientOp::kSubmit;
    r.rid = 1;
    r.job = Saxpy();
    g.push_back({"client_submit_saxpy", r, {Bytes(4096, 1), Bytes(4096, 2)}});
  }
  {
    // Local buffers: x as a payload frame, y (payload index 1) as a file of
    // the broker's local directory; the output asked for as a file.
    ClientRequest r;
    r.op = ClientOp::kSubmit;
    r.rid = 13;
    r.job = Saxpy();
    r.job.files = {{"c-5f1b2c3d0a1b2c3d4e5f60718293a4b5", 4096}};
    r.job.local_out = true;
    g.push_back({"client_submit_local_files", r, {Bytes(4096, 1)}});
  }
  {
    ClientRequest r;
    r.op = ClientOp::kSubmit;
    r.rid = 2;
    JobSpec& j = r.job;
    j.kernel.source =
        "#include \"ops.h\"\n"
        "template <typename T> __global__ void fill(T* out, T v, unsigned long long n) {\n"
        "  extern __shared__ unsigned char smem[];\n"
        "  auto i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) out[i] = op(v);\n}\n";
    j.kernel.entry = "fill<double>";
    j.kernel.name_expression = true;
    j.kernel.headers = {{"ops.h", "template <typename T> __device__ T op(T v) { return v; }\n"}};
    j.launch.grid = {2, 2, 2};
    j.launch.block = {8, 8, 4};
    j.launch.shared_bytes = 65536;
    j.args = {Arg::Out(8192), Arg::F64(-0.5),
              Arg::Scalar(ScalarType::kU64, 1024)};
    j.placement.gpu = "GPU-5f1b2c3d-0a1b-2c3d-4e5f-60718293a4b5";
    j.placement.min_free_bytes = 1ull << 30;
    g.push_back({"client_submit_template", r, {}});
  }
  {
    // A job of several launches: a two-pass sum over an input, a scratch
    // buffer of partial sums between the passes, one kernel from a second
    // source, and a CUDA graph.
    ClientRequest r;
    r.op = ClientOp::kSubmit;
    r.rid = 8;
    JobSpec& j = r.job;
    j.key = "vm-17/step-9";
    j.tenant = "guest-17";
    j.kernel.source =
        "template <typename T> __global__ void partial(const T* x, T* part, unsigned n) {\n"
        "  /* each block sums its slice into part[blockIdx.x] */ }\n";
    j.kernel.options = {"-std=c++17"};
    j.sources.push_back({});
    j.sources[0].source =
        "extern \"C\" __global__ void total(const float* part, float* out, unsigned n) {}\n";
    j.buffers = {Arg::In(0), Arg::Scratch(1024), Arg::Out(4)};
    KernelLaunch first;
    first.entry = "partial<float>";
    first.name_expression = true;
    first.launch.grid = {256, 1, 1};
    first.launch.block = {256, 1, 1};
    first.launch.shared_bytes = 1024;
    first.args = {Arg::Ref(0), Arg::Ref(1), Arg::U32(256)};
    KernelLaunch second;
    second.source = 1;
    second.entry = "total";
    second.launch.grid = {1, 1, 1};
    second.launch.block = {256, 1, 1};
    second.args = {Arg::Ref(1), Arg::Ref(2), Arg::U32(256)};
    KernelLaunch third = second;
    third.args = {Arg::Ref(1, 512), Arg::Ref(2), Arg::U32(128)};
    j.launches = {first, second, third};
    j.graph = true;
    g.push_back({"client_submit_launches", r, {Bytes(1024, 4)}});
  }
  {
    // Buffers in a registered region (PROTOCOL.md, "Regions"): x read from
    // one range, y read and written in another, and nothing sent.
    ClientRequest r;
    r.op = ClientOp::kSubmit;
    r.rid = 9;
    JobSpec& j = r.job;
    j.tenant = "guest-17";
    j.kernel.source =
        "extern \"C\" __global__ void saxpy(float a, const float* x, float* y, unsigned n) {\n"
        "  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;\n"
        "  if (i < n) y[i] = a * x[i] + y[i];\n"
        "}\n";
    j.kernel.entry = "saxpy";
    j.launch.grid = {4096, 1, 1};
    j.launch.block = {256, 1, 1};
    const uint64_t region = 0x5eed0000cafe0001ull, bytes = 4096 * 256 * 4;
    j.args = {Arg::F32(2.0f), Arg::InRegion(ArgKind::kIn, region, 0, bytes),
              Arg::InRegion(ArgKind::kInOut, region, bytes, bytes), Arg::U32(4096 * 256)};
    g.push_back({"client_submit_region", r, {}});
  }
  {
    ClientRequest r;
    r.op = ClientOp::kSubmit;
    r.rid = 3;
    r.job.kernel.source = "extern \"C\" __global__ void k(unsigned char a, signed char b, "
                          "unsigned short c, short d, unsigned e, int f, unsigned long long g, "
                          "long long h, float i, double j) {}\n";
    r.job.kernel.entry = "k";
    r.job.args = {Arg::Scalar(ScalarType::kU8, 255),
                  Arg::Scalar(ScalarType::kI8, static_cast<uint8_t>(-128)),
                  Arg::Scalar(ScalarType::kU16, 65535),
                  Arg::Scalar(ScalarType::kI16, static_cast<uint16_t>(-32768)),
                  Arg::U32(4294967295u),
                  Arg::I32(-2147483647 - 1),
                  Arg::Scalar(ScalarType::kU64, ~0ull),
                  Arg::Scalar(ScalarType::kI64, 1ull << 63),
                  Arg::F32(-1.0e-3f),
                  Arg::F64(6.02214076e23)};
    g.push_back({"client_submit_scalars", r, {}});
  }
  for (auto [op, name] : {std::pair{ClientOp::kStatus, "client_status"},
                          std::pair{ClientOp::kResult, "client_result"},
                          std::pair{ClientOp::kCancel, "client_cancel"}}) {
    ClientRequest r;
    r.op = op;
    r.rid = 10;
    r.id = 4242;
    g.push_back({name, r, {}});
  }
  {
    ClientRequest r;
    r.op = ClientOp::kStats;
    r.rid = 11;
    g.push_back({"client_stats", r, {}});
    r.op = ClientOp::kDevices;
    r.rid = 12;
    g.push_back({"client_devices", r, {}});
  }
  {
    ClientRequest r;
    r.op = ClientOp::kUsage;
    r.rid = 9;
    r.tenant = "guest-17";
    r.since_ms = 1795996800000;  // 2026-11-30T00:00Z
    r.until_ms = 1796083200000;
    g.push_back({"client_usage", r, {}});
  }

  // broker -> client
  {
    ClientReply r;
    r.op = ReplyOp::kAccepted;
    r.rid = 1;
    r.id = 4242;
    g.push_back({"reply_accepted", r, {}});
    r.existing = true;
    g.push_back({"reply_accepted_existing", r, {}});
  }
  {
    ClientReply r;
    r.op = ReplyOp::kError;
    r.rid = 1;
    r.code = Code::kQueueFull;
    r.error = "tenant guest-17 has 10000 queued jobs, its limit";
    r.retry_after_ms = 250;
    g.push_back({"reply_error_queue_full", r, {}});
  }
  {
    ClientReply r;
    r.op = ReplyOp::kStatus;
    r.rid = 10;
    r.id = 4242;
    r.state = JobState::kDispatched;
    r.attempts = 1;
    r.device = "GPU-5f1b2c3d-0a1b-2c3d-4e5f-60718293a4b5";
    g.push_back({"reply_status", r, {}});
  }
  {
    ClientReply r;
    r.op = ReplyOp::kResult;
    r.rid = 0;
    r.id = 4242;
    r.state = JobState::kDone;
    r.attempts = 1;
    r.device = "GPU-5f1b2c3d-0a1b-2c3d-4e5f-60718293a4b5";
    r.timing = SomeTiming();
    r.outputs = {2};
    g.push_back({"reply_result_done", r, {Bytes(4096, 3)}});
  }
  {
    // The end of client_submit_launches: its one out buffer (buffer 2),
    // and each launch's time.
    ClientReply r;
    r.op = ReplyOp::kResult;
    r.rid = 0;
    r.id = 4260;
    r.state = JobState::kDone;
    r.attempts = 1;
    r.device = "GPU-5f1b2c3d-0a1b-2c3d-4e5f-60718293a4b5";
    r.timing = SomeTiming();
    r.timing.launch_us = {9, 3, 2};
    r.timing.kernel_us = 14;
    r.outputs = {2};
    g.push_back({"reply_result_launches", r, {Bytes(4, 3)}});
  }
  {
    ClientReply r;
    r.op = ReplyOp::kResult;
    r.rid = 0;
    r.id = 4245;
    r.state = JobState::kDone;
    r.attempts = 1;
    r.device = "GPU-5f1b2c3d-0a1b-2c3d-4e5f-60718293a4b5";
    r.timing = SomeTiming();
    r.outputs = {2};
    r.files = {{"/var/lib/gpuq/jobs.db.blobs/j4245.o0", 4096}};
    g.push_back({"reply_result_local_file", r, {}});
  }
  {
    ClientReply r;
    r.op = ReplyOp::kResult;
    r.rid = 0;
    r.id = 4243;
    r.state = JobState::kFailed;
    r.code = Code::kCompileError;
    r.error = "k.cu(1): error: identifier \"x\" is undefined\n";
    r.attempts = 0;  // never dispatched: it failed to compile
    g.push_back({"reply_result_compile_error", r, {}});
  }
  {
    ClientReply r;
    r.op = ReplyOp::kCanceled;
    r.rid = 10;
    r.id = 4242;
    r.state = JobState::kCanceled;
    g.push_back({"reply_canceled", r, {}});
  }
  {
    ClientReply r;
    r.op = ReplyOp::kStats;
    r.rid = 11;
    r.stats = SomeStats();
    g.push_back({"reply_stats", r, {}});
  }
  {
    ClientReply r;
    r.op = ReplyOp::kDevices;
    r.rid = 12;
    r.workers = {{"gpu-host-1:3112:0", H100(), 8, 2, 120, {}}};
    g.push_back({"reply_devices", r, {}});
  }
  {
    ClientReply r;
    r.op = ReplyOp::kUsage;
    r.rid = 9;
    TenantUsage u;
    u.tenant = "guest-17";
    u.done = 1200;
    u.failed = 3;
    u.canceled = 1;
    u.expired = 0;
    u.gpu_us = 48210377;
    u.kernel_us = 30118452;
    u.bytes_in = 9830400;
    u.bytes_out = 4915200;
    r.usage = {u};
    g.push_back({"reply_usage", r, {}});
  }
  {
    ClientReply r;
    r.op = ReplyOp::kDevices;
    r.rid = 15;
    r.workers = {{"gpu-host-1:3112:0", H100(), 8, 0, 120, SomeHealth()}};
    r.workers[0].health.drain = "critical Xid 79 (GPU has fallen off the bus)";
    g.push_back({"reply_devices_health", r, {}});
  }
  {
    ClientReply r;
    r.op = ReplyOp::kDevices;
    r.rid = 14;
    r.workers = {{"gpu-host-1:3112:0", H100(), 8, 2, 120, {}}};
    r.local_dir = "/var/lib/gpuq/jobs.db.blobs";
    g.push_back({"reply_devices_local", r, {}});
  }

  // worker -> broker
  {
    WorkerMessage m;
    m.op = WorkerOp::kReady;
    m.worker = "gpu-host-1:3112:0";
    m.device = H100();
    m.slots = 8;
    m.module_slots = 256;
    m.token = "9f2c4e6a8b0d1f3e5a7c9e1b3d5f7a90";
    g.push_back({"worker_ready", m, {}});
  }
  {
    WorkerMessage m;
    m.op = WorkerOp::kReady;
    m.worker = "gpu-host-1:3113:1";
    m.device = H100();
    m.slots = 8;
    m.module_slots = 256;
    m.local_dir = "/var/lib/gpuq/jobs.db.blobs";
    m.token = "0a1b2c3d4e5f60718293a4b5c6d7e8f9";
    g.push_back({"worker_ready_local", m, {}});
  }
  {
    WorkerMessage m;
    m.op = WorkerOp::kResult;
    m.id = 4242;
    m.attempt = 1;
    m.state = JobState::kDone;
    m.timing = SomeTiming();
    m.outputs = {2};
    g.push_back({"worker_result_done", m, {Bytes(4096, 3)}});
  }
  {
    WorkerMessage m;
    m.op = WorkerOp::kResult;
    m.id = 4245;
    m.attempt = 1;
    m.state = JobState::kDone;
    m.timing = SomeTiming();
    m.outputs = {2};
    m.files = {{"w-4245-1-2", 4096}};
    g.push_back({"worker_result_local_file", m, {}});
  }
  {
    WorkerMessage m;
    m.op = WorkerOp::kResult;
    m.id = 4244;
    m.attempt = 2;
    m.state = JobState::kFailed;
    m.code = Code::kKernelFault;
    m.error = "CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access was encountered";
    g.push_back({"worker_result_fault", m, {}});
  }
  {
    WorkerMessage m;
    m.op = WorkerOp::kHeartbeat;
    m.free_bytes = 84000000000ull;
    m.inflight = 3;
    g.push_back({"worker_heartbeat", m, {}});
  }
  {
    WorkerMessage m;
    m.op = WorkerOp::kHeartbeat;
    m.free_bytes = 84000000000ull;
    m.inflight = 3;
    m.token = "9f2c4e6a8b0d1f3e5a7c9e1b3d5f7a90";
    m.running = std::vector<WorkerMessage::Running>{{41, 1}, {43, 2}};
    g.push_back({"worker_heartbeat_liveness", m, {}});
  }
  {
    WorkerMessage m;
    m.op = WorkerOp::kHeartbeat;
    m.free_bytes = 84000000000ull;
    m.inflight = 3;
    m.token = "9f2c4e6a8b0d1f3e5a7c9e1b3d5f7a90";
    m.health = SomeHealth();
    g.push_back({"worker_heartbeat_health", m, {}});
  }
  {
    // Two results in one message: a done one with its output frame, and a
    // failed one.
    WorkerMessage done;
    done.op = WorkerOp::kResult;
    done.id = 4250;
    done.attempt = 3;
    done.state = JobState::kDone;
    done.timing = SomeTiming();
    done.outputs = {0};
    WorkerMessage failed;
    failed.op = WorkerOp::kResult;
    failed.id = 4251;
    failed.attempt = 3;
    failed.state = JobState::kFailed;
    failed.code = Code::kLaunchError;
    failed.error = "CUDA_ERROR_INVALID_VALUE: too many resources requested for launch";
    Batch b;
    b.parts = {2, 1};
    g.push_back({"worker_batch_results", b,
                 {EncodeWorkerMessage(done), Bytes(16, 5), EncodeWorkerMessage(failed)}});
  }
  {
    WorkerMessage m;
    m.op = WorkerOp::kDisconnect;
    m.reason = "sticky CUDA error: CUDA_ERROR_ILLEGAL_ADDRESS";
    g.push_back({"worker_disconnect", m, {}});
  }

  // broker -> worker
  {
    BrokerMessage m;
    m.op = BrokerOp::kJob;
    m.id = 4242;
    m.attempt = 1;
    m.module = "078f1398ea2b7a94c25cc6aaa4fd44042c7b7281d37a0f023c801a86f71339b6";
    m.entry = "saxpy";
    m.image = ImageKind::kCubin;
    m.launch.grid = {4, 1, 1};
    m.launch.block = {256, 1, 1};
    m.args = {Arg::F32(2.5f), Arg::In(1), Arg::InOut(2), Arg::I32(1024)};
    m.time_limit_ms = 2000;
    g.push_back({"broker_job", m, {Bytes(64, 9), Bytes(4096, 1), Bytes(4096, 2)}});
  }
  {
    // The job of client_submit_launches, to a worker that holds the first
    // module and not the second.
    BrokerMessage m;
    m.op = BrokerOp::kJob;
    m.id = 4260;
    m.attempt = 1;
    m.modules = {{"6b1c6f3a0e2d4c5b8a7f9e0d1c2b3a4f5e6d7c8b9a0f1e2d3c4b5a6f7e8d9c0b",
                  ImageKind::kNone},
                 {"078f1398ea2b7a94c25cc6aaa4fd44042c7b7281d37a0f023c801a86f71339b6",
                  ImageKind::kCubin}};
    m.buffers = {Arg::In(1), Arg::Scratch(1024), Arg::Out(4)};
    KernelLaunch first;
    first.entry = "_Z7partialIfEvPKT_PS0_j";
    first.launch.grid = {256, 1, 1};
    first.launch.block = {256, 1, 1};
    first.launch.shared_bytes = 1024;
    first.args = {Arg::Ref(0), Arg::Ref(1), Arg::U32(256)};
    KernelLaunch second;
    second.source = 1;
    second.entry = "total";
    second.launch.grid = {1, 1, 1};
    second.launch.block = {256, 1, 1};
    second.args = {Arg::Ref(1), Arg::Ref(2), Arg::U32(256)};
    KernelLaunch third = second;
    third.args = {Arg::Ref(1, 512), Arg::Ref(2), Arg::U32(128)};
    m.launches = {first, second, third};
    m.graph = true;
    m.time_limit_ms = 10000;
    g.push_back({"broker_job_launches", m, {Bytes(64, 9), Bytes(1024, 4)}});
  }
  {
    BrokerMessage m;
    m.op = BrokerOp::kJob;
    m.id = 4245;
    m.attempt = 1;
    m.module = "078f1398ea2b7a94c25cc6aaa4fd44042c7b7281d37a0f023c801a86f71339b6";
    m.entry = "saxpy";
    m.launch.grid = {4, 1, 1};
    m.launch.block = {256, 1, 1};
    m.args = {Arg::F32(2.5f), Arg::In(0), Arg::InOut(1), Arg::I32(1024)};
    m.time_limit_ms = 2000;
    m.files = {{"/var/lib/gpuq/jobs.db.blobs/j4245.i1", 4096}};
    m.out_dir = "/var/lib/gpuq/jobs.db.blobs";
    g.push_back({"broker_job_local_files", m, {Bytes(4096, 1)}});
  }
  {
    // Two jobs of one module in one message: the first brings the image.
    BrokerMessage first;
    first.op = BrokerOp::kJob;
    first.id = 4250;
    first.attempt = 3;
    first.module = "078f1398ea2b7a94c25cc6aaa4fd44042c7b7281d37a0f023c801a86f71339b6";
    first.entry = "k";
    first.image = ImageKind::kCubin;
    first.launch.grid = {1, 1, 1};
    first.launch.block = {32, 1, 1};
    first.args = {Arg::Out(16)};
    BrokerMessage second = first;
    second.id = 4251;
    second.image = ImageKind::kNone;
    Batch b;
    b.parts = {2, 1};
    g.push_back({"broker_batch_jobs", b,
                 {EncodeBrokerMessage(first), Bytes(64, 9), EncodeBrokerMessage(second)}});
  }
  {
    BrokerMessage m;
    m.op = BrokerOp::kHeartbeat;
    g.push_back({"broker_heartbeat", m, {}});
  }
  {
    BrokerMessage m;
    m.op = BrokerOp::kError;
    m.code = Code::kBadVersion;
    m.error = "protocol GPUQW/3 is not supported; this peer speaks GPUQW/2";
    g.push_back({"broker_error", m, {}});
  }
  {
    BrokerMessage m;
    m.op = BrokerOp::kDisconnect;
    m.error = "broker shutting down";
    g.push_back({"broker_disconnect", m, {}});
  }
  // The region channel (PROTOCOL.md, "Regions").
  {
    RegionMessage m;
    m.op = RegionOp::kHello;
    m.protocol = std::string(kRegionProtocol);
    g.push_back({"region_hello", m, {}});
    m.worker = true;
    m.token = "9f86d081884c7d659a2feaa0c55ad015";
    g.push_back({"region_hello_worker", m, {}});
  }
  {
    RegionMessage m;
    m.op = RegionOp::kRegister;
    m.rid = 1;
    m.tenant = "guest-17";
    m.size = 64ull << 20;
    g.push_back({"region_register", m, {}});
    m = {};
    m.op = RegionOp::kRegistered;
    m.rid = 1;
    m.region = 0x5eed0000cafe0001ull;
    m.size = 64ull << 20;
    g.push_back({"region_registered", m, {}});
    m = {};
    m.op = RegionOp::kUnregister;
    m.rid = 2;
    m.region = 0x5eed0000cafe0001ull;
    g.push_back({"region_unregister", m, {}});
    m.op = RegionOp::kUnregistered;
    g.push_back({"region_unregistered", m, {}});
    m = {};
    m.op = RegionOp::kError;
    m.rid = 3;
    m.code = Code::kResourceExhausted;
    m.error = "tenant 'guest-17' holds 64 regions, its limit (--max-regions)";
    g.push_back({"region_error", m, {}});
    m = {};
    m.op = RegionOp::kRegion;
    m.region = 0x5eed0000cafe0001ull;
    m.size = 64ull << 20;
    g.push_back({"region_region", m, {}});
    m = {};
    m.op = RegionOp::kDrop;
    m.region = 0x5eed0000cafe0001ull;
    g.push_back({"region_drop", m, {}});
  }
  // Sessions (PROTOCOL.md, "Sessions"): the broker's requests and reply,
  // then the session channel.
  {
    ClientRequest r;
    r.op = ClientOp::kSessionOpen;
    r.rid = 41;
    r.tenant = "guest-17";
    r.session.placement.arch = "sm_90";
    r.session.idle_ms = 60000;
    r.session.memory = 1ull << 30;
    r.session.limit_ms = 5000;
    g.push_back({"client_session_open", r, {}});
    r = {};
    r.op = ClientOp::kSessionClose;
    r.rid = 42;
    r.id = 0x5e55000000000001ull;
    g.push_back({"client_session_close", r, {}});
    ClientReply rep;
    rep.op = ReplyOp::kSession;
    rep.rid = 41;
    rep.id = 0x5e55000000000001ull;
    rep.device = "GPU-5a1c3f0e-8d2b-4c6a-9e71-0b3d5f7a9c21";
    rep.path = "/var/lib/gpuq/jobs.db.blobs/s3f2a9c1d7e5b8a06.sock";
    rep.token = "c0ffee0123456789abcdef0123456789";
    g.push_back({"reply_session", rep, {}});
    // Sessions through the broker: a session request in a session_call,
    // its answer in the call's reply.
    SessionMessage alloc;
    alloc.op = SessionOp::kAlloc;
    alloc.rid = 1;
    alloc.size = 4096;
    r = {};
    r.op = ClientOp::kSessionCall;
    r.rid = 1;
    r.id = 0x5e55000000000001ull;
    r.token = "c0ffee0123456789abcdef0123456789";
    g.push_back({"client_session_call", r, {schema::EncodeSessionMessage(alloc)}});
    SessionMessage done;
    done.op = SessionOp::kDone;
    done.rid = 1;
    done.buffer = 0x3a7f0001;
    rep = {};
    rep.op = ReplyOp::kSessionAnswer;
    rep.rid = 1;
    rep.id = 0x5e55000000000001ull;
    g.push_back({"reply_session_answer", rep, {schema::EncodeSessionMessage(done)}});
  }
  {
    const uint64_t session = 0x5e55000000000001ull;
    SessionMessage m;
    m.op = SessionOp::kHello;
    m.protocol = std::string(kSessionProtocol);
    m.session = session;
    m.token = "c0ffee0123456789abcdef0123456789";
    g.push_back({"session_hello", m, {}});
    m.op = SessionOp::kAttach;
    m.size = 1 << 20;
    g.push_back({"session_attach", m, {}});
    m = {};
    m.op = SessionOp::kDone;
    m.region = 1;
    g.push_back({"session_done_attach", m, {}});
    m = {};
    m.op = SessionOp::kDetach;
    m.rid = 9;
    m.region = 1;
    g.push_back({"session_detach", m, {}});
    m = {};
    m.op = SessionOp::kWrite;
    m.rid = 7;
    m.buffer = 7340033;
    m.offset = 0;
    m.region = 1;
    m.region_offset = 4096;
    m.size = 8192;
    g.push_back({"session_write_region", m, {}});
    m.op = SessionOp::kRead;
    m.rid = 8;
    m.region_offset = 65536;
    g.push_back({"session_read_region", m, {}});
    m = {};
    m = {};
    m.op = SessionOp::kAlloc;
    m.rid = 1;
    m.size = 4096;
    g.push_back({"session_alloc", m, {}});
    m = {};
    m.op = SessionOp::kDone;
    m.rid = 1;
    m.buffer = 7340033;
    g.push_back({"session_done_alloc", m, {}});
    m = {};
    m.op = SessionOp::kWrite;
    m.rid = 2;
    m.buffer = 7340033;
    m.offset = 16;
    m.data = std::string("\x00\x00\x80\x3f\x00\x00\x00\x40", 8);
    g.push_back({"session_write", m, {}});
    m = {};
    m.op = SessionOp::kLaunch;
    m.rid = 3;
    m.kernel.source =
        "extern \"C\" __global__ void saxpy(float a, const float* x, float* y, unsigned n) {\n"
        "  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;\n"
        "  if (i < n) y[i] = a * x[i] + y[i];\n}\n";
    m.kernel.entry = "saxpy";
    m.launch.grid = {4, 1, 1};
    m.launch.block = {256, 1, 1};
    m.args = {Arg::F32(2.0f), Arg::Ref(7340033), Arg::Ref(7340034, 64), Arg::U32(1024)};
    g.push_back({"session_launch", m, {}});
    m.rid = 5;
    m.untimed = true;
    g.push_back({"session_launch_untimed", m, {}});
    m.rid = 6;
    m.untimed = false;
    m.kernel = {};
    m.kernel_ref = 1;
    g.push_back({"session_launch_by_handle", m, {}});
    // Buffers of the launch's own: x in, y in and out, a scratch.
    m.rid = 7;
    m.args = {Arg::F32(2.0f), Arg::In(0), Arg::InOut(1), Arg::U32(2), Arg::Scratch(256)};
    m.inputs = {std::string("\x00\x00\x80\x3f\x00\x00\x00\x40", 8),
                std::string("\x00\x00\x40\x40\x00\x00\x80\x40", 8)};
    g.push_back({"session_launch_own_buffers", m, {}});
    m = {};
    m.op = SessionOp::kDone;
    m.rid = 7;
    m.kernel_ns = 4160;
    m.outputs = {std::string("\x00\x00\xa0\x40\x00\x00\x00\x41", 8)};
    g.push_back({"session_done_launch_outputs", m, {}});
    m = {};
    m.op = SessionOp::kDone;
    m.rid = 3;
    m.kernel_ns = 5312;
    g.push_back({"session_done_launch", m, {}});
    m.kernel_ref = 1;
    g.push_back({"session_done_launch_handle", m, {}});
    m = {};
    m.op = SessionOp::kRead;
    m.rid = 4;
    m.buffer = 7340034;
    m.offset = 0;
    m.size = 8;
    g.push_back({"session_read", m, {}});
    m = {};
    m.op = SessionOp::kDone;
    m.rid = 4;
    m.data = std::string("\x00\x00\x40\x40\x00\x00\x80\x40", 8);
    g.push_back({"session_done_read", m, {}});
    m = {};
    m.op = SessionOp::kCopy;
    m.rid = 5;
    m.buffer = 7340034;
    m.offset = 0;
    m.src = 7340033;
    m.src_offset = 16;
    m.size = 8;
    g.push_back({"session_copy", m, {}});
    m = {};
    m.op = SessionOp::kFill;
    m.rid = 6;
    m.buffer = 7340033;
    m.offset = 0;
    m.size = 4096;
    m.value = 0;
    g.push_back({"session_fill", m, {}});
    m = {};
    m.op = SessionOp::kFree;
    m.rid = 7;
    m.buffer = 7340033;
    g.push_back({"session_free", m, {}});
    m = {};
    m.op = SessionOp::kError;
    m.rid = 8;
    m.code = Code::kNotFound;
    m.error = "no buffer 7340033 in this session";
    g.push_back({"session_error", m, {}});
    m = {};
    m.op = SessionOp::kClose;
    m.rid = 9;
    g.push_back({"session_close", m, {}});
    m = {};
    m.op = SessionOp::kOpen;
    m.session = session;
    m.token = "c0ffee0123456789abcdef0123456789";
    m.memory = 1ull << 30;
    m.idle_ms = 60000;
    m.limit_ms = 5000;
    g.push_back({"session_open", m, {}});
    m = {};
    m.op = SessionOp::kOpened;
    m.session = session;
    g.push_back({"session_opened", m, {}});
    m = {};
    m.op = SessionOp::kCompile;
    m.rid = 1;
    m.kernel.source = "extern \"C\" __global__ void empty() {}\n";
    m.kernel.entry = "empty";
    m.kernel.options = {"-use_fast_math"};
    g.push_back({"session_compile", m, {}});
    m = {};
    m.op = SessionOp::kModule;
    m.rid = 1;
    m.image = std::string("\x7f""ELF\x02\x01\x01\x33", 8);
    m.image_kind = ImageKind::kCubin;
    m.symbol = "empty";
    g.push_back({"session_module", m, {}});
    m = {};
    m.op = SessionOp::kUsage;
    m.session = session;
    m.size = 8192;
    g.push_back({"session_usage", m, {}});
    m = {};
    m.op = SessionOp::kEnd;
    m.session = session;
    g.push_back({"session_end", m, {}});
    m = {};
    m.op = SessionOp::kEnded;
    m.session = session;
    m.code = Code::kSessionLost;
    m.error = "idle for 60000 ms, its timeout";
    g.push_back({"session_ended", m, {}});
  }
  return g;
}

std::vector<std::string> EncodeFrames(const GoldenMessage& g) {
  std::vector<std::string> frames;
  std::visit(
      [&](const auto& m) {
        using T = std::decay_t<decltype(m)>;
        if constexpr (std::is_same_v<T, ClientRequest>) {
          frames = {std::string(kClientProtocol), EncodeClientRequest(m)};
        } else if constexpr (std::is_same_v<T, ClientReply>) {
          frames = {std::string(kClientProtocol), EncodeClientReply(m)};
        } else if constexpr (std::is_same_v<T, WorkerMessage>) {
          frames = {std::string(kWorkerProtocol), EncodeWorkerMessage(m)};
        } else if constexpr (std::is_same_v<T, Batch>) {
          frames = {std::string(kWorkerProtocol), EncodeBatch(m)};
        } else if constexpr (std::is_same_v<T, RegionMessage>) {
          frames = {std::string(kRegionProtocol), EncodeRegionMessage(m)};
        } else if constexpr (std::is_same_v<T, SessionMessage>) {
          frames = {std::string(kSessionProtocol), EncodeSessionMessage(m)};
        } else {
          frames = {std::string(kWorkerProtocol), EncodeBrokerMessage(m)};
        }
      },
      g.message);
  frames.insert(frames.end(), g.payload.begin(), g.payload.end());
  return frames;
}

std::string PackFrames(const std::vector<std::string>& frames) {
  std::string out;
  for (const auto& f : frames) {
    uint32_t n = static_cast<uint32_t>(f.size());
    for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>(n >> (8 * i)));
    out += f;
  }
  return out;
}

bool UnpackFrames(const std::string& file, std::vector<std::string>* frames) {
  frames->clear();
  size_t off = 0;
  while (off < file.size()) {
    if (file.size() - off < 4) return false;
    uint32_t n = 0;
    for (int i = 0; i < 4; ++i) n |= uint32_t(uint8_t(file[off + i])) << (8 * i);
    off += 4;
    if (file.size() - off < n) return false;
    frames->push_back(file.substr(off, n));
    off += n;
  }
  return true;
}

}  // namespace gpuq::testing
