#include "schema/codec.h"

#include <msgpack.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <new>

namespace gpuq::schema {

// ---------------------------------------------------------------- names

namespace {

constexpr std::string_view kScalarNames[] = {"u8",  "i8",  "u16", "i16", "u32",
                                             "i32", "u64", "i64", "f32", "f64"};
constexpr size_t kScalarSizes[] = {1, 1, 2, 2, 4, 4, 8, 8, 4, 8};
constexpr std::string_view kStateNames[] = {"queued", "dispatched", "done",
                                            "failed", "canceled",   "expired"};
constexpr std::string_view kClientOpNames[] = {
    "submit", "status", "result", "cancel", "stats", "devices", "usage", "session_open",
    "session_close", "session_call"};
constexpr std::string_view kReplyOpNames[] = {"accepted", "error",   "status",
                                              "result",   "canceled", "stats",
                                              "devices",  "usage",   "session",
                                              "session_answer"};
constexpr std::string_view kSessionOpNames[] = {
    "hello", "alloc", "free", "write",  "read",  "copy",   "fill",    "launch", "close",
    "done",  "error", "open", "end",    "module", "opened", "ended", "compile", "usage",
    "attach", "detach"};
constexpr std::string_view kWorkerOpNames[] = {"ready", "result", "heartbeat",
                                               "disconnect"};
constexpr std::string_view kBrokerOpNames[] = {"job", "heartbeat", "disconnect",
                                               "error"};
constexpr std::string_view kImageNames[] = {"none", "cubin", "ptx"};
constexpr std::string_view kRegionOpNames[] = {"hello",        "register", "unregister",
                                               "registered",   "unregistered", "error",
                                               "region",       "drop"};

template <typename E, size_t N>
bool Lookup(const std::string_view (&names)[N], std::string_view s, E* out) {
  for (size_t i = 0; i < N; ++i) {
    if (names[i] == s) {
      *out = static_cast<E>(i);
      return true;
    }
  }
  return false;
}

}  // namespace

std::string_view ScalarTypeName(ScalarType t) {
  return kScalarNames[static_cast<size_t>(t)];
}
size_t ScalarSize(ScalarType t) { return kScalarSizes[static_cast<size_t>(t)]; }
std::string_view JobStateName(JobState s) {
  return kStateNames[static_cast<size_t>(s)];
}
bool IsTerminal(JobState s) {
  return s != JobState::kQueued && s != JobState::kDispatched;
}
std::string_view ClientOpName(ClientOp op) {
  return kClientOpNames[static_cast<size_t>(op)];
}
std::string_view ReplyOpName(ReplyOp op) {
  return kReplyOpNames[static_cast<size_t>(op)];
}
std::string_view WorkerOpName(WorkerOp op) {
  return kWorkerOpNames[static_cast<size_t>(op)];
}
std::string_view BrokerOpName(BrokerOp op) {
  return kBrokerOpNames[static_cast<size_t>(op)];
}
std::string_view RegionOpName(RegionOp op) {
  return kRegionOpNames[static_cast<size_t>(op)];
}
std::string_view SessionOpName(SessionOp op) {
  return kSessionOpNames[static_cast<size_t>(op)];
}

Arg Arg::F32(float v) {
  return Scalar(ScalarType::kF32, std::bit_cast<uint32_t>(v));
}
Arg Arg::F64(double v) {
  return Scalar(ScalarType::kF64, std::bit_cast<uint64_t>(v));
}

std::string DeviceInfo::Arch() const {
  return "sm_" + std::to_string(cc_major) + std::to_string(cc_minor);
}

Status CheckProtocolFrame(std::string_view frame, std::string_view expected) {
  if (frame == expected) return Status::Ok();
  auto slash = expected.find('/');
  if (frame.substr(0, slash + 1) == expected.substr(0, slash + 1)) {
    return Error(Code::kBadVersion, "protocol " + std::string(frame.substr(0, 32)) +
                                        " is not supported; this peer speaks " +
                                        std::string(expected));
  }
  return Error(Code::kMalformed, "first frame must name the protocol (" +
                                     std::string(expected) + ")");
}

// ---------------------------------------------------------------- encoding

namespace {

// The bytes of an encoded header: a string grown as it is written, handed
// out whole (msgpack's sbuffer starts every message with an 8 KiB block).
struct StringBuffer {
  StringBuffer() { bytes.reserve(256); }
  void write(const char* p, size_t n) { bytes.append(p, n); }
  size_t size() const { return bytes.size(); }
  char* data() { return bytes.data(); }
  std::string bytes;
};

// A packer that knows its buffer (MapWriter moves bytes within it).
struct Packer : msgpack::packer<StringBuffer> {
  explicit Packer(StringBuffer& b) : msgpack::packer<StringBuffer>(b), buf(b) {}
  StringBuffer& buf;
};

void PackStr(Packer& p, std::string_view s) {
  p.pack_str(static_cast<uint32_t>(s.size()));
  p.pack_str_body(s.data(), static_cast<uint32_t>(s.size()));
}

// msgpack-c's pack_float/pack_double write integral values as integers
// (-0.0f as 0), which loses the sign of zero and the value's wire type.
// Floats are written here as msgpack float32 / float64, always.
void PackFloat32(Packer& p, float v) {
  const uint32_t bits = std::bit_cast<uint32_t>(v);
  const char raw[5] = {'\xca', char(bits >> 24), char(bits >> 16), char(bits >> 8), char(bits)};
  p.pack_str_body(raw, sizeof raw);  // appends raw bytes
}

void PackFloat64(Packer& p, double v) {
  const uint64_t bits = std::bit_cast<uint64_t>(v);
  char raw[9] = {'\xcb'};
  for (int i = 0; i < 8; ++i) raw[1 + i] = char(bits >> (56 - 8 * i));
  p.pack_str_body(raw, sizeof raw);
}

void PackDim3(Packer& p, const Dim3& d) {
  p.pack_array(3);
  p.pack_uint32(d.x);
  p.pack_uint32(d.y);
  p.pack_uint32(d.z);
}

void PackFiles(Packer& p, const std::vector<LocalFile>& files) {
  p.pack_array(static_cast<uint32_t>(files.size()));
  for (const LocalFile& f : files) {
    p.pack_array(2);
    PackStr(p, f.name);
    p.pack_uint64(f.size);
  }
}

void PackU32List(Packer& p, const std::vector<uint32_t>& v) {
  p.pack_array(static_cast<uint32_t>(v.size()));
  for (uint32_t x : v) p.pack_uint32(x);
}

// Counts the keys of a map before it is written: the msgpack map header needs
// the count first. Each optional field is (present?, writer).
// Writes a map whose size is known only at the end: each present field is
// packed as it comes, and Write() puts the map header (in its smallest form)
// in front of them.
class MapWriter {
 public:
  explicit MapWriter(Packer& p) : p_(p), start_(p.buf.size()) {}
  template <typename F>
  MapWriter& Field(std::string_view key, bool present, F&& write) {
    if (present) {
      PackStr(p_, key);
      write();
      ++count_;
    }
    return *this;
  }
  void Write() {
    const size_t body_end = p_.buf.size();
    p_.pack_map(count_);
    char* d = p_.buf.data();
    std::rotate(d + start_, d + body_end, d + p_.buf.size());
  }

 private:
  Packer& p_;
  size_t start_;
  uint32_t count_ = 0;
};

void PackArg(Packer& p, const Arg& a) {
  p.pack_array(2);
  if (a.in_region() &&
      (a.kind == ArgKind::kIn || a.kind == ArgKind::kInOut || a.kind == ArgKind::kOut)) {
    PackStr(p, a.kind == ArgKind::kIn ? "in" : a.kind == ArgKind::kOut ? "out" : "inout");
    p.pack_map(3);
    PackStr(p, "region");
    p.pack_uint64(a.region);
    PackStr(p, "offset");
    p.pack_uint64(a.offset);
    PackStr(p, "size");
    p.pack_uint64(a.size);
    return;
  }
  switch (a.kind) {
    case ArgKind::kIn:
      PackStr(p, "in");
      p.pack_uint32(a.frame);
      return;
    case ArgKind::kInOut:
      PackStr(p, "inout");
      p.pack_uint32(a.frame);
      return;
    case ArgKind::kOut:
      PackStr(p, "out");
      p.pack_uint64(a.size);
      return;
    case ArgKind::kScratch:
      PackStr(p, "scratch");
      p.pack_uint64(a.size);
      return;
    case ArgKind::kBuffer:
      PackStr(p, "buf");
      if (a.offset == 0) {
        p.pack_uint32(a.buffer);
      } else {
        p.pack_array(2);
        p.pack_uint32(a.buffer);
        p.pack_uint64(a.offset);
      }
      return;
    case ArgKind::kScalar:
      break;
  }
  PackStr(p, ScalarTypeName(a.type));
  switch (a.type) {
    case ScalarType::kU8:
    case ScalarType::kU16:
    case ScalarType::kU32:
    case ScalarType::kU64: {
      uint64_t v = a.bits;
      if (ScalarSize(a.type) < 8) v &= (uint64_t{1} << (8 * ScalarSize(a.type))) - 1;
      p.pack_uint64(v);
      return;
    }
    case ScalarType::kI8:
      p.pack_int64(static_cast<int8_t>(a.bits));
      return;
    case ScalarType::kI16:
      p.pack_int64(static_cast<int16_t>(a.bits));
      return;
    case ScalarType::kI32:
      p.pack_int64(static_cast<int32_t>(a.bits));
      return;
    case ScalarType::kI64:
      p.pack_int64(static_cast<int64_t>(a.bits));
      return;
    case ScalarType::kF32:
      PackFloat32(p, std::bit_cast<float>(static_cast<uint32_t>(a.bits)));
      return;
    case ScalarType::kF64:
      PackFloat64(p, std::bit_cast<double>(a.bits));
      return;
  }
}

void PackArgs(Packer& p, const std::vector<Arg>& args) {
  p.pack_array(static_cast<uint32_t>(args.size()));
  for (const Arg& a : args) PackArg(p, a);
}

void PackLaunchFields(MapWriter& w, Packer& p, const LaunchSpec& l, bool present = true) {
  w.Field("grid", present, [&] { PackDim3(p, l.grid); })
      .Field("block", present, [&] { PackDim3(p, l.block); })
      .Field("shared", present && l.shared_bytes != 0, [&] { p.pack_uint32(l.shared_bytes); });
}

// A source's options and headers (src itself is written by the caller).
void PackSourceExtras(MapWriter& w, Packer& p, const KernelSpec& k) {
  w.Field("opts", !k.options.empty(),
          [&] {
            p.pack_array(static_cast<uint32_t>(k.options.size()));
            for (auto& o : k.options) PackStr(p, o);
          })
      .Field("headers", !k.headers.empty(), [&] {
        p.pack_array(static_cast<uint32_t>(k.headers.size()));
        for (auto& h : k.headers) {
          p.pack_array(2);
          PackStr(p, h.name);
          PackStr(p, h.content);
        }
      });
}

// A launch of a job of several launches. `index_key` names the index of
// its kernel's source: "source" in a submit, "module" to a worker.
void PackKernelLaunches(Packer& p, const std::vector<KernelLaunch>& launches,
                        std::string_view index_key) {
  p.pack_array(static_cast<uint32_t>(launches.size()));
  for (const KernelLaunch& l : launches) {
    MapWriter w(p);
    w.Field(index_key, index_key == "module" || l.source != 0,
            [&] { p.pack_uint32(l.source); })
        .Field("entry", true, [&] { PackStr(p, l.entry); })
        .Field("expr", l.name_expression, [&] { p.pack_true(); });
    PackLaunchFields(w, p, l.launch);
    w.Field("args", true, [&] { PackArgs(p, l.args); }).Write();
  }
}

void PackJob(Packer& p, const JobSpec& j) {
  MapWriter w(p);
  const bool one = !j.multi();
  w.Field("key", !j.key.empty(), [&] { PackStr(p, j.key); })
      .Field("tenant", !j.tenant.empty(), [&] { PackStr(p, j.tenant); })
      .Field("priority", j.priority != kDefaultPriority,
             [&] { p.pack_uint32(j.priority); })
      .Field("deadline_ms", j.deadline_ms != 0, [&] { p.pack_uint64(j.deadline_ms); })
      .Field("limit_ms", j.time_limit_ms != 0, [&] { p.pack_uint64(j.time_limit_ms); })
      .Field("src", true, [&] { PackStr(p, j.kernel.source); })
      .Field("entry", one, [&] { PackStr(p, j.kernel.entry); })
      .Field("expr", one && j.kernel.name_expression, [&] { p.pack_true(); });
  PackSourceExtras(w, p, j.kernel);
  PackLaunchFields(w, p, j.launch, one);
  const Placement& pl = j.placement;
  w.Field("args", one, [&] { PackArgs(p, j.args); })
      .Field("place", pl != Placement{}, [&] {
        MapWriter pw(p);
        pw.Field("arch", !pl.arch.empty(), [&] { PackStr(p, pl.arch); })
            .Field("gpu", !pl.gpu.empty(), [&] { PackStr(p, pl.gpu); })
            .Field("min_free", pl.min_free_bytes != 0,
                   [&] { p.pack_uint64(pl.min_free_bytes); })
            .Write();
      })
      .Field("files", !j.files.empty(), [&] { PackFiles(p, j.files); })
      .Field("local_out", j.local_out, [&] { p.pack_true(); })
      .Field("sources", !j.sources.empty(),
             [&] {
               p.pack_array(static_cast<uint32_t>(j.sources.size()));
               for (const KernelSpec& k : j.sources) {
                 MapWriter sw(p);
                 sw.Field("src", true, [&] { PackStr(p, k.source); });
                 PackSourceExtras(sw, p, k);
                 sw.Write();
               }
             })
      .Field("buffers", !one, [&] { PackArgs(p, j.buffers); })
      .Field("launches", !one, [&] { PackKernelLaunches(p, j.launches, "source"); })
      .Field("graph", j.graph, [&] { p.pack_true(); })
      .Write();
}

void PackTiming(Packer& p, const Timing& t) {
  p.pack_map(t.launch_us.empty() ? 8 : 9);
  PackStr(p, "queue");
  p.pack_uint64(t.queue_us);
  PackStr(p, "compile");
  p.pack_uint64(t.compile_us);
  PackStr(p, "load");
  p.pack_uint64(t.load_us);
  PackStr(p, "h2d");
  p.pack_uint64(t.h2d_us);
  PackStr(p, "kernel");
  p.pack_uint64(t.kernel_us);
  PackStr(p, "d2h");
  p.pack_uint64(t.d2h_us);
  PackStr(p, "total");
  p.pack_uint64(t.total_us);
  PackStr(p, "cache_hit");
  t.cache_hit ? p.pack_true() : p.pack_false();
  if (!t.launch_us.empty()) {
    PackStr(p, "launches");
    p.pack_array(static_cast<uint32_t>(t.launch_us.size()));
    for (uint64_t us : t.launch_us) p.pack_uint64(us);
  }
}

void PackHealth(Packer& p, const GpuHealth& h) {
  p.pack_map(h.drain.empty() ? 8 : 9);
  PackStr(p, "util_pct");
  p.pack_uint32(h.util_pct);
  PackStr(p, "mem_used");
  p.pack_uint64(h.mem_used_bytes);
  PackStr(p, "temp_c");
  p.pack_uint32(h.temp_c);
  PackStr(p, "power_mw");
  p.pack_uint32(h.power_mw);
  PackStr(p, "ecc_corrected");
  p.pack_uint64(h.ecc_corrected);
  PackStr(p, "ecc_uncorrected");
  p.pack_uint64(h.ecc_uncorrected);
  PackStr(p, "xid_events");
  p.pack_uint64(h.xid_events);
  PackStr(p, "last_xid");
  p.pack_uint32(h.last_xid);
  if (!h.drain.empty()) {
    PackStr(p, "drain");
    PackStr(p, h.drain);
  }
}

void PackDevice(Packer& p, const DeviceInfo& d) {
  p.pack_map(15);
  PackStr(p, "ordinal");
  p.pack_uint32(d.ordinal);
  PackStr(p, "name");
  PackStr(p, d.name);
  PackStr(p, "uuid");
  PackStr(p, d.uuid);
  PackStr(p, "cc");
  p.pack_array(2);
  p.pack_uint32(d.cc_major);
  p.pack_uint32(d.cc_minor);
  PackStr(p, "total_bytes");
  p.pack_uint64(d.total_bytes);
  PackStr(p, "free_bytes");
  p.pack_uint64(d.free_bytes);
  PackStr(p, "sms");
  p.pack_uint32(d.sm_count);
  PackStr(p, "clock_khz");
  p.pack_uint32(d.clock_khz);
  PackStr(p, "l2_bytes");
  p.pack_uint32(d.l2_bytes);
  PackStr(p, "managed");
  d.managed_memory ? p.pack_true() : p.pack_false();
  PackStr(p, "max_threads");
  p.pack_uint32(d.max_threads_per_block);
  PackStr(p, "max_block");
  PackDim3(p, d.max_block);
  PackStr(p, "max_grid");
  PackDim3(p, d.max_grid);
  PackStr(p, "max_shared");
  p.pack_uint32(d.max_shared_per_block);
  PackStr(p, "max_shared_optin");
  p.pack_uint32(d.max_shared_optin);
}

std::string Take(StringBuffer& b) { return std::move(b.bytes); }

}  // namespace

std::string EncodeClientRequest(const ClientRequest& m) {
  StringBuffer buf;
  Packer p(buf);
  bool has_id = m.op == ClientOp::kStatus || m.op == ClientOp::kResult ||
                m.op == ClientOp::kCancel || m.op == ClientOp::kSessionClose ||
                m.op == ClientOp::kSessionCall;
  MapWriter w(p);
  w.Field("op", true, [&] { PackStr(p, ClientOpName(m.op)); })
      .Field("rid", true, [&] { p.pack_uint64(m.rid); })
      .Field("id", has_id, [&] { p.pack_uint64(m.id); })
      .Field("job", m.op == ClientOp::kSubmit, [&] { PackJob(p, m.job); })
      .Field("tenant",
             (m.op == ClientOp::kUsage || m.op == ClientOp::kSessionOpen) && !m.tenant.empty(),
             [&] { PackStr(p, m.tenant); })
      .Field("token", m.op == ClientOp::kSessionCall, [&] { PackStr(p, m.token); })
      .Field("since_ms", m.op == ClientOp::kUsage && m.since_ms != 0,
             [&] { p.pack_uint64(m.since_ms); })
      .Field("until_ms", m.op == ClientOp::kUsage && m.until_ms != 0,
             [&] { p.pack_uint64(m.until_ms); })
      .Field("session", m.op == ClientOp::kSessionOpen,
             [&] {
               const SessionSpec& ss = m.session;
               const Placement& pl = ss.placement;
               MapWriter sw(p);
               sw.Field("arch", !pl.arch.empty(), [&] { PackStr(p, pl.arch); })
                   .Field("gpu", !pl.gpu.empty(), [&] { PackStr(p, pl.gpu); })
                   .Field("min_free", pl.min_free_bytes != 0,
                          [&] { p.pack_uint64(pl.min_free_bytes); })
                   .Field("idle_ms", ss.idle_ms != 0, [&] { p.pack_uint64(ss.idle_ms); })
                   .Field("memory", ss.memory != 0, [&] { p.pack_uint64(ss.memory); })
                   .Field("limit_ms", ss.limit_ms != 0, [&] { p.pack_uint64(ss.limit_ms); })
                   .Write();
             })
      .Write();
  return Take(buf);
}

std::string EncodeClientReply(const ClientReply& m) {
  StringBuffer buf;
  Packer p(buf);
  const ReplyOp op = m.op;
  bool has_id = op == ReplyOp::kAccepted || op == ReplyOp::kStatus ||
                op == ReplyOp::kResult || op == ReplyOp::kCanceled ||
                op == ReplyOp::kSession || op == ReplyOp::kSessionAnswer ||
                (op == ReplyOp::kError && m.id != 0);
  bool has_state =
      op == ReplyOp::kStatus || op == ReplyOp::kResult || op == ReplyOp::kCanceled;
  bool failed = op == ReplyOp::kError || m.code != Code::kOk;
  bool has_run = op == ReplyOp::kStatus || op == ReplyOp::kResult;
  MapWriter w(p);
  w.Field("op", true, [&] { PackStr(p, ReplyOpName(op)); })
      .Field("rid", true, [&] { p.pack_uint64(m.rid); })
      .Field("id", has_id, [&] { p.pack_uint64(m.id); })
      .Field("existing", op == ReplyOp::kAccepted && m.existing,
             [&] { p.pack_true(); })
      .Field("state", has_state, [&] { PackStr(p, JobStateName(m.state)); })
      .Field("code", failed && (op == ReplyOp::kError || has_state),
             [&] { PackStr(p, CodeName(m.code)); })
      .Field("error", failed && (op == ReplyOp::kError || has_state),
             [&] { PackStr(p, m.error); })
      .Field("retry_after_ms", op == ReplyOp::kError && m.retry_after_ms != 0,
             [&] { p.pack_uint64(m.retry_after_ms); })
      .Field("attempts", has_run, [&] { p.pack_uint32(m.attempts); })
      .Field("device", (has_run || op == ReplyOp::kSession) && !m.device.empty(),
             [&] { PackStr(p, m.device); })
      .Field("path", op == ReplyOp::kSession && !m.path.empty(), [&] { PackStr(p, m.path); })
      .Field("token", op == ReplyOp::kSession && !m.token.empty(),
             [&] { PackStr(p, m.token); })
      .Field("timing", op == ReplyOp::kResult, [&] { PackTiming(p, m.timing); })
      .Field("outputs", op == ReplyOp::kResult, [&] { PackU32List(p, m.outputs); })
      .Field("files", op == ReplyOp::kResult && !m.files.empty(),
             [&] { PackFiles(p, m.files); })
      .Field("stats", op == ReplyOp::kStats,
             [&] {
               if (m.stats.empty()) {
                 p.pack_map(0);
               } else {
                 buf.write(m.stats.data(), m.stats.size());
               }
             })
      .Field("workers", op == ReplyOp::kDevices, [&] {
        p.pack_array(static_cast<uint32_t>(m.workers.size()));
        for (const WorkerView& v : m.workers) {
          p.pack_map(v.health.known ? 6 : 5);
          PackStr(p, "worker");
          PackStr(p, v.worker);
          PackStr(p, "device");
          PackDevice(p, v.device);
          PackStr(p, "slots");
          p.pack_uint32(v.slots);
          PackStr(p, "inflight");
          p.pack_uint32(v.inflight);
          PackStr(p, "heartbeat_age_ms");
          p.pack_uint64(v.heartbeat_age_ms);
          if (v.health.known) {
            PackStr(p, "health");
            PackHealth(p, v.health);
          }
        }
      })
      .Field("local_dir", op == ReplyOp::kDevices && !m.local_dir.empty(),
             [&] { PackStr(p, m.local_dir); })
      .Field("usage", op == ReplyOp::kUsage, [&] {
        p.pack_array(static_cast<uint32_t>(m.usage.size()));
        for (const TenantUsage& u : m.usage) {
          MapWriter uw(p);
          uw.Field("tenant", true, [&] { PackStr(p, u.tenant); })
              .Field("done", true, [&] { p.pack_uint64(u.done); })
              .Field("failed", true, [&] { p.pack_uint64(u.failed); })
              .Field("canceled", true, [&] { p.pack_uint64(u.canceled); })
              .Field("expired", true, [&] { p.pack_uint64(u.expired); })
              .Field("gpu_us", true, [&] { p.pack_uint64(u.gpu_us); })
              .Field("kernel_us", true, [&] { p.pack_uint64(u.kernel_us); })
              .Field("bytes_in", true, [&] { p.pack_uint64(u.bytes_in); })
              .Field("bytes_out", true, [&] { p.pack_uint64(u.bytes_out); })
              .Write();
        }
      });
  w.Write();
  return Take(buf);
}

std::string EncodeWorkerMessage(const WorkerMessage& m) {
  StringBuffer buf;
  Packer p(buf);
  MapWriter w(p);
  w.Field("op", true, [&] { PackStr(p, WorkerOpName(m.op)); });
  switch (m.op) {
    case WorkerOp::kReady:
      w.Field("worker", true, [&] { PackStr(p, m.worker); })
          .Field("device", true, [&] { PackDevice(p, m.device); })
          .Field("slots", true, [&] { p.pack_uint32(m.slots); })
          .Field("module_slots", true, [&] { p.pack_uint32(m.module_slots); })
          .Field("local_dir", !m.local_dir.empty(), [&] { PackStr(p, m.local_dir); })
          .Field("token", true, [&] { PackStr(p, m.token); })
          .Field("health", m.health.known, [&] { PackHealth(p, m.health); });
      break;
    case WorkerOp::kResult:
      w.Field("id", true, [&] { p.pack_uint64(m.id); })
          .Field("attempt", true, [&] { p.pack_uint32(m.attempt); })
          .Field("state", true, [&] { PackStr(p, JobStateName(m.state)); })
          .Field("code", m.code != Code::kOk, [&] { PackStr(p, CodeName(m.code)); })
          .Field("error", m.code != Code::kOk, [&] { PackStr(p, m.error); })
          .Field("timing", true, [&] { PackTiming(p, m.timing); })
          .Field("outputs", true, [&] { PackU32List(p, m.outputs); })
          .Field("files", !m.files.empty(), [&] { PackFiles(p, m.files); });
      break;
    case WorkerOp::kHeartbeat:
      w.Field("free_bytes", true, [&] { p.pack_uint64(m.free_bytes); })
          .Field("inflight", true, [&] { p.pack_uint32(m.inflight); })
          .Field("token", !m.token.empty(), [&] { PackStr(p, m.token); })
          .Field("health", m.health.known, [&] { PackHealth(p, m.health); })
          .Field("running", m.running.has_value(), [&] {
            p.pack_array(static_cast<uint32_t>(m.running->size()));
            for (const WorkerMessage::Running& r : *m.running) {
              p.pack_array(2);
              p.pack_uint64(r.id);
              p.pack_uint32(r.attempt);
            }
          });
      break;
    case WorkerOp::kDisconnect:
      w.Field("reason", true, [&] { PackStr(p, m.reason); });
      break;
  }
  w.Write();
  return Take(buf);
}

std::string EncodeBrokerMessage(const BrokerMessage& m) {
  StringBuffer buf;
  Packer p(buf);
  MapWriter w(p);
  w.Field("op", true, [&] { PackStr(p, BrokerOpName(m.op)); });
  switch (m.op) {
    case BrokerOp::kJob: {
      const bool one = m.launches.empty();
      w.Field("id", true, [&] { p.pack_uint64(m.id); })
          .Field("attempt", true, [&] { p.pack_uint32(m.attempt); })
          .Field("module", one, [&] { PackStr(p, m.module); })
          .Field("entry", one, [&] { PackStr(p, m.entry); })
          .Field("image", one && m.image != ImageKind::kNone,
                 [&] { PackStr(p, kImageNames[static_cast<size_t>(m.image)]); });
      PackLaunchFields(w, p, m.launch, one);
      w.Field("args", one, [&] { PackArgs(p, m.args); })
          .Field("limit_ms", m.time_limit_ms != 0, [&] { p.pack_uint64(m.time_limit_ms); })
          .Field("files", !m.files.empty(), [&] { PackFiles(p, m.files); })
          .Field("out_dir", !m.out_dir.empty(), [&] { PackStr(p, m.out_dir); })
          .Field("modules", !one,
                 [&] {
                   p.pack_array(static_cast<uint32_t>(m.modules.size()));
                   for (const ModuleRef& r : m.modules) {
                     p.pack_array(2);
                     PackStr(p, r.key);
                     PackStr(p, kImageNames[static_cast<size_t>(r.image)]);
                   }
                 })
          .Field("buffers", !one, [&] { PackArgs(p, m.buffers); })
          .Field("launches", !one, [&] { PackKernelLaunches(p, m.launches, "module"); })
          .Field("graph", m.graph, [&] { p.pack_true(); });
      break;
    }
    case BrokerOp::kError:
      w.Field("code", true, [&] { PackStr(p, CodeName(m.code)); })
          .Field("error", true, [&] { PackStr(p, m.error); });
      break;
    case BrokerOp::kDisconnect:
      w.Field("error", !m.error.empty(), [&] { PackStr(p, m.error); });
      break;
    case BrokerOp::kHeartbeat:
      break;
  }
  w.Write();
  return Take(buf);
}

// ---------------------------------------------------------------- decoding

namespace {

using msgpack::object;
namespace mt = msgpack::type;

Status Malformed(std::string_view field, std::string_view what) {
  return Error(Code::kMalformed, "field '" + std::string(field) + "': " + std::string(what));
}
Status TooLarge(std::string_view field, uint64_t limit) {
  return Error(Code::kTooLarge, "field '" + std::string(field) +
                                    "' is over its limit of " + std::to_string(limit));
}

Status GetUint(const object& o, std::string_view field, uint64_t max, uint64_t* out) {
  if (o.type != mt::POSITIVE_INTEGER) return Malformed(field, "expected an unsigned integer");
  if (o.via.u64 > max) {
    return Error(Code::kInvalid, "field '" + std::string(field) + "' is above " +
                                     std::to_string(max));
  }
  *out = o.via.u64;
  return Status::Ok();
}

template <typename T>
Status GetU(const object& o, std::string_view field, T* out,
            uint64_t max = std::numeric_limits<T>::max()) {
  uint64_t v = 0;
  GPUQ_RETURN_IF_ERROR(GetUint(o, field, max, &v));
  *out = static_cast<T>(v);
  return Status::Ok();
}

Status GetBool(const object& o, std::string_view field, bool* out) {
  if (o.type != mt::BOOLEAN) return Malformed(field, "expected a boolean");
  *out = o.via.boolean;
  return Status::Ok();
}

Status GetStr(const object& o, std::string_view field, size_t max, std::string* out) {
  if (o.type != mt::STR) return Malformed(field, "expected a string");
  if (o.via.str.size > max) return TooLarge(field, max);
  out->assign(o.via.str.ptr, o.via.str.size);
  return Status::Ok();
}

std::string_view StrView(const object& o) {
  return o.type == mt::STR ? std::string_view(o.via.str.ptr, o.via.str.size)
                           : std::string_view();
}

Status GetArray(const object& o, std::string_view field, size_t max,
                const msgpack::object_array** out) {
  if (o.type != mt::ARRAY) return Malformed(field, "expected an array");
  if (o.via.array.size > max) return TooLarge(field, max);
  *out = &o.via.array;
  return Status::Ok();
}

// An array of exactly `n` elements (a tuple): any other length is
// malformed, never too large.
Status GetTuple(const object& o, std::string_view field, size_t n, std::string_view shape,
                const msgpack::object_array** out) {
  if (o.type != mt::ARRAY || o.via.array.size != n) {
    return Malformed(field, "expected " + std::string(shape));
  }
  *out = &o.via.array;
  return Status::Ok();
}

Status GetDim3(const object& o, std::string_view field, Dim3* out) {
  const msgpack::object_array* a = nullptr;
  GPUQ_RETURN_IF_ERROR(GetTuple(o, field, 3, "[x, y, z]", &a));
  GPUQ_RETURN_IF_ERROR(GetU(a->ptr[0], field, &out->x));
  GPUQ_RETURN_IF_ERROR(GetU(a->ptr[1], field, &out->y));
  return GetU(a->ptr[2], field, &out->z);
}

template <typename T>
Status GetUList(const object& o, std::string_view field, size_t max, std::vector<T>* out) {
  const msgpack::object_array* a = nullptr;
  GPUQ_RETURN_IF_ERROR(GetArray(o, field, max, &a));
  out->resize(a->size);
  for (uint32_t i = 0; i < a->size; ++i) {
    GPUQ_RETURN_IF_ERROR(GetU(a->ptr[i], field, &(*out)[i]));
  }
  return Status::Ok();
}

template <typename E, size_t N>
Status GetEnum(const object& o, std::string_view field,
               const std::string_view (&names)[N], E* out) {
  if (o.type != mt::STR) return Malformed(field, "expected a string");
  if (!Lookup(names, StrView(o), out)) {
    return Malformed(field, "unknown value '" + std::string(StrView(o).substr(0, 64)) + "'");
  }
  return Status::Ok();
}

Status GetCode(const object& o, std::string_view field, Code* out) {
  if (o.type != mt::STR) return Malformed(field, "expected a string");
  auto c = CodeFromName(StrView(o));
  if (!c) return Malformed(field, "unknown error code");
  *out = *c;
  return Status::Ok();
}

// Walks a map's fields. `handle(key, value)` returns kNotFound for an unknown
// key, which becomes kMalformed here; a key seen twice is malformed too.
// `required` lists keys that must be present.
template <typename F>
Status ForEachField(const object& o, std::string_view what,
                    const std::vector<std::string_view>& required, F&& handle) {
  if (o.type != mt::MAP) return Malformed(what, "expected a map");
  const auto& m = o.via.map;
  for (uint32_t i = 0; i < m.size; ++i) {
    if (m.ptr[i].key.type != mt::STR) return Malformed(what, "map keys must be strings");
    std::string_view k = StrView(m.ptr[i].key);
    for (uint32_t j = 0; j < i; ++j) {
      if (StrView(m.ptr[j].key) == k) {
        return Malformed(k, "appears twice in '" + std::string(what) + "'");
      }
    }
    Status s = handle(k, m.ptr[i].val);
    if (s.code() == Code::kNotFound) {
      return Error(Code::kMalformed, "unknown field '" + std::string(k.substr(0, 64)) +
                                         "' in '" + std::string(what) + "'");
    }
    GPUQ_RETURN_IF_ERROR(s);
  }
  for (std::string_view r : required) {
    bool found = false;
    for (uint32_t i = 0; i < m.size && !found; ++i) found = StrView(m.ptr[i].key) == r;
    if (!found) return Malformed(r, "required in '" + std::string(what) + "'");
  }
  return Status::Ok();
}

const Status kUnknownField(Code::kNotFound, "");

// A number as msgpack-cxx reads it: POSITIVE_INTEGER (any integer format
// holding a value >= 0), NEGATIVE_INTEGER, FLOAT32 or FLOAT64, or not one.
enum class NumKind { kPositive, kNegative, kFloat, kOther };

// The bit pattern of scalar type `t` for a number of `kind` (its value in
// `u`, `i` or `d`), or why it has none. The one rule for every decoder.
Status ScalarBits(ScalarType t, NumKind kind, uint64_t u, int64_t i, double d,
                  uint64_t* bits) {
  std::string_view f = ScalarTypeName(t);
  if (t == ScalarType::kF32 || t == ScalarType::kF64) {
    if (kind == NumKind::kPositive) {
      d = static_cast<double>(u);
    } else if (kind == NumKind::kNegative) {
      d = static_cast<double>(i);
    } else if (kind != NumKind::kFloat) {
      return Malformed(f, "expected a number");
    }
    *bits = t == ScalarType::kF32
                ? std::bit_cast<uint32_t>(static_cast<float>(d))
                : std::bit_cast<uint64_t>(d);
    return Status::Ok();
  }
  const size_t bytes = ScalarSize(t);
  const bool is_signed = t == ScalarType::kI8 || t == ScalarType::kI16 ||
                         t == ScalarType::kI32 || t == ScalarType::kI64;
  const uint64_t mask = bytes == 8 ? ~uint64_t{0} : (uint64_t{1} << (8 * bytes)) - 1;
  if (kind == NumKind::kPositive) {
    uint64_t max = is_signed ? mask >> 1 : mask;
    if (u > max) {
      return Error(Code::kInvalid, "argument value out of range for " + std::string(f));
    }
    *bits = u;
    return Status::Ok();
  }
  if (kind == NumKind::kNegative) {
    if (!is_signed) {
      return Error(Code::kInvalid, "negative value for unsigned " + std::string(f));
    }
    int64_t min = bytes == 8 ? std::numeric_limits<int64_t>::min()
                             : -(int64_t{1} << (8 * bytes - 1));
    if (i < min) {
      return Error(Code::kInvalid, "argument value out of range for " + std::string(f));
    }
    *bits = static_cast<uint64_t>(i) & mask;
    return Status::Ok();
  }
  return Malformed(f, "expected an integer");
}

Status GetScalar(const object& v, ScalarType t, uint64_t* bits) {
  const NumKind kind = v.type == mt::POSITIVE_INTEGER   ? NumKind::kPositive
                       : v.type == mt::NEGATIVE_INTEGER ? NumKind::kNegative
                       : v.type == mt::FLOAT32 || v.type == mt::FLOAT64
                           ? NumKind::kFloat
                           : NumKind::kOther;
  return ScalarBits(t, kind, kind == NumKind::kPositive ? v.via.u64 : 0,
                    kind == NumKind::kNegative ? v.via.i64 : 0,
                    kind == NumKind::kFloat ? v.via.f64 : 0, bits);
}

Status GetArg(const object& o, const Limits& limits, Arg* out) {
  const msgpack::object_array* a = nullptr;
  GPUQ_RETURN_IF_ERROR(GetTuple(o, "args", 2, "each argument as [type, value]", &a));
  if (a->ptr[0].type != mt::STR) return Malformed("args", "each argument is [type, value]");
  std::string_view t = StrView(a->ptr[0]);
  const object& v = a->ptr[1];
  if ((t == "in" || t == "inout" || t == "out") && v.type == mt::MAP) {
    // A range of a registered region (PROTOCOL.md, "Regions").
    out->kind = t == "in" ? ArgKind::kIn : t == "out" ? ArgKind::kOut : ArgKind::kInOut;
    GPUQ_RETURN_IF_ERROR(ForEachField(v, "region range", {"region", "offset", "size"},
                                      [&](std::string_view k, const object& f) -> Status {
      if (k == "region") return GetUint(f, k, UINT64_MAX, &out->region);
      if (k == "offset") return GetUint(f, k, UINT64_MAX, &out->offset);
      if (k == "size") return GetUint(f, k, UINT64_MAX, &out->size);
      return kUnknownField;
    }));
    if (out->region == 0) return Error(Code::kInvalid, "region 0 names no region");
    if (out->size == 0) return Error(Code::kInvalid, "a region range is at least 1 byte");
    if (out->size > limits.max_buffer_bytes) return TooLarge("buffer", limits.max_buffer_bytes);
    return Status::Ok();
  }
  if (t == "in" || t == "inout") {
    out->kind = t == "in" ? ArgKind::kIn : ArgKind::kInOut;
    return GetU(v, "args", &out->frame);
  }
  if (t == "out" || t == "scratch") {
    out->kind = t == "out" ? ArgKind::kOut : ArgKind::kScratch;
    GPUQ_RETURN_IF_ERROR(GetUint(v, "args", UINT64_MAX, &out->size));
    if (out->size > limits.max_buffer_bytes) {
      return TooLarge(t == "out" ? "out buffer" : "scratch buffer", limits.max_buffer_bytes);
    }
    return Status::Ok();
  }
  if (t == "buf") {
    // The job's buffer: its index, or [index, byte offset].
    out->kind = ArgKind::kBuffer;
    if (v.type != mt::ARRAY) return GetU(v, "args", &out->buffer);
    const msgpack::object_array* r = nullptr;
    GPUQ_RETURN_IF_ERROR(GetTuple(v, "args", 2, "a buffer as index or [index, offset]", &r));
    GPUQ_RETURN_IF_ERROR(GetU(r->ptr[0], "args", &out->buffer));
    return GetUint(r->ptr[1], "args", UINT64_MAX, &out->offset);
  }
  out->kind = ArgKind::kScalar;
  if (!Lookup(kScalarNames, t, &out->type)) {
    return Error(Code::kMalformed,
                 "unknown argument type '" + std::string(t.substr(0, 32)) + "'");
  }
  return GetScalar(v, out->type, &out->bits);
}

Status GetArgs(const object& o, const Limits& limits, std::vector<Arg>* out,
               std::string_view field = "args", size_t max = 0) {
  const msgpack::object_array* a = nullptr;
  GPUQ_RETURN_IF_ERROR(GetArray(o, field, max ? max : limits.max_args, &a));
  out->resize(a->size);
  for (uint32_t i = 0; i < a->size; ++i) {
    Status s = GetArg(a->ptr[i], limits, &(*out)[i]);
    if (!s.ok()) return s.WithContext("argument " + std::to_string(i));
  }
  return Status::Ok();
}

Status GetLaunchField(std::string_view k, const object& v, LaunchSpec* l, bool* handled) {
  *handled = true;
  if (k == "grid") return GetDim3(v, k, &l->grid);
  if (k == "block") return GetDim3(v, k, &l->block);
  if (k == "shared") return GetU(v, k, &l->shared_bytes);
  *handled = false;
  return Status::Ok();
}

// [[name, size]...]; plain names (`paths` false) or full paths.
Status GetFiles(const object& o, std::string_view field, const Limits& limits, bool paths,
                std::vector<LocalFile>* out) {
  const msgpack::object_array* a = nullptr;
  GPUQ_RETURN_IF_ERROR(GetArray(o, field, limits.max_payload_frames, &a));
  out->resize(a->size);
  for (uint32_t i = 0; i < a->size; ++i) {
    const msgpack::object_array* f = nullptr;
    GPUQ_RETURN_IF_ERROR(GetTuple(a->ptr[i], field, 2, "each file as [name, size]", &f));
    LocalFile& lf = (*out)[i];
    GPUQ_RETURN_IF_ERROR(GetStr(f->ptr[0], field, 4096, &lf.name));
    GPUQ_RETURN_IF_ERROR(GetU(f->ptr[1], field, &lf.size));
    if (paths ? lf.name.empty() || lf.name[0] != '/' : !IsPlainFileName(lf.name)) {
      return Error(Code::kInvalid, std::string(field) + ": '" + lf.name.substr(0, 128) +
                                       (paths ? "' is not a full path"
                                              : "' is not a plain file name"));
    }
  }
  return Status::Ok();
}

// A heartbeat's running jobs: [[id, attempt]...], at most as many as a
// worker may hold (its slots).
Status GetRunning(const object& o, std::string_view field,
                  std::optional<std::vector<WorkerMessage::Running>>* out) {
  const msgpack::object_array* a = nullptr;
  GPUQ_RETURN_IF_ERROR(GetArray(o, field, 65536, &a));
  std::vector<WorkerMessage::Running> running(a->size);
  for (uint32_t i = 0; i < a->size; ++i) {
    const msgpack::object_array* t = nullptr;
    GPUQ_RETURN_IF_ERROR(GetTuple(a->ptr[i], field, 2, "each job as [id, attempt]", &t));
    GPUQ_RETURN_IF_ERROR(GetU(t->ptr[0], field, &running[i].id));
    GPUQ_RETURN_IF_ERROR(GetU(t->ptr[1], field, &running[i].attempt));
  }
  *out = std::move(running);
  return Status::Ok();
}

// Payload frame sizes followed by the sizes of the local files.
std::vector<uint64_t> WithFiles(std::span<const uint64_t> sizes,
                                const std::vector<LocalFile>& files) {
  std::vector<uint64_t> all(sizes.begin(), sizes.end());
  for (const LocalFile& f : files) all.push_back(f.size);
  return all;
}

// A source's fields: src, opts, headers.
Status GetSourceField(std::string_view k, const object& v, const Limits& limits,
                      KernelSpec* ks, bool* handled) {
  *handled = true;
  if (k == "src") return GetStr(v, k, limits.max_source_bytes, &ks->source);
  if (k == "opts") {
    const msgpack::object_array* a = nullptr;
    GPUQ_RETURN_IF_ERROR(GetArray(v, k, limits.max_options, &a));
    ks->options.resize(a->size);
    for (uint32_t i = 0; i < a->size; ++i) {
      GPUQ_RETURN_IF_ERROR(GetStr(a->ptr[i], k, limits.max_option_bytes, &ks->options[i]));
    }
    return Status::Ok();
  }
  if (k == "headers") {
    const msgpack::object_array* a = nullptr;
    GPUQ_RETURN_IF_ERROR(GetArray(v, k, limits.max_headers, &a));
    ks->headers.resize(a->size);
    for (uint32_t i = 0; i < a->size; ++i) {
      const msgpack::object_array* h = nullptr;
      GPUQ_RETURN_IF_ERROR(GetTuple(a->ptr[i], k, 2, "each header as [name, content]", &h));
      GPUQ_RETURN_IF_ERROR(GetStr(h->ptr[0], k, limits.max_name_bytes, &ks->headers[i].name));
      GPUQ_RETURN_IF_ERROR(
          GetStr(h->ptr[1], k, limits.max_total_source_bytes, &ks->headers[i].content));
    }
    return Status::Ok();
  }
  *handled = false;
  return Status::Ok();
}

// The launches of a job of several launches; `index_key` as in
// PackKernelLaunches.
Status GetKernelLaunches(const object& o, const Limits& limits, std::string_view index_key,
                         std::vector<KernelLaunch>* out) {
  const msgpack::object_array* a = nullptr;
  GPUQ_RETURN_IF_ERROR(GetArray(o, "launches", limits.max_launches, &a));
  if (a->size == 0) return Malformed("launches", "must not be empty");
  out->resize(a->size);
  static const std::vector<std::string_view> kRequired = {"entry", "grid", "block", "args"};
  static const std::vector<std::string_view> kWorkerRequired = {"module", "entry", "grid",
                                                                "block", "args"};
  const auto& required = index_key == "module" ? kWorkerRequired : kRequired;
  for (uint32_t i = 0; i < a->size; ++i) {
    KernelLaunch& l = (*out)[i];
    Status s = ForEachField(a->ptr[i], "launch", required,
                            [&](std::string_view k, const object& v) -> Status {
      bool launch = false;
      GPUQ_RETURN_IF_ERROR(GetLaunchField(k, v, &l.launch, &launch));
      if (launch) return Status::Ok();
      if (k == index_key) return GetU(v, k, &l.source);
      if (k == "entry") return GetStr(v, k, limits.max_name_bytes, &l.entry);
      if (k == "expr" && index_key == "source") return GetBool(v, k, &l.name_expression);
      if (k == "args") return GetArgs(v, limits, &l.args);
      return kUnknownField;
    });
    if (!s.ok()) return s.WithContext("launch " + std::to_string(i));
  }
  return Status::Ok();
}

// Keys of a job map that only a job of one launch has, and those that only
// a job of several launches has.
constexpr std::string_view kOneLaunchKeys[] = {"entry", "expr", "grid", "block", "shared",
                                               "args"};
constexpr std::string_view kSeveralLaunchKeys[] = {"sources", "buffers", "launches", "graph"};

bool HasKey(const object& map, std::string_view key) {
  for (uint32_t i = 0; i < map.via.map.size; ++i) {
    if (map.via.map.ptr[i].key.type == mt::STR && StrView(map.via.map.ptr[i].key) == key) {
      return true;
    }
  }
  return false;
}

// A map holds either the keys of one launch or those of several.
Status CheckLaunchForm(const object& o, std::string_view what,
                       std::span<const std::string_view> one,
                       std::span<const std::string_view> several) {
  if (o.type != mt::MAP) return Malformed(what, "expected a map");
  if (!HasKey(o, "launches")) {
    for (std::string_view k : several) {
      if (HasKey(o, k)) return Malformed(k, "only a job of several launches has it");
    }
    return Status::Ok();
  }
  for (std::string_view k : one) {
    if (HasKey(o, k)) {
      return Malformed(k, "a job of several launches names it in each launch, not in '" +
                              std::string(what) + "'");
    }
  }
  return Status::Ok();
}

Status GetJob(const object& o, const Limits& limits, JobSpec* j) {
  GPUQ_RETURN_IF_ERROR(CheckLaunchForm(o, "job", kOneLaunchKeys, kSeveralLaunchKeys));
  const bool several = HasKey(o, "launches");
  const std::vector<std::string_view> required =
      several ? std::vector<std::string_view>{"src", "buffers", "launches"}
              : std::vector<std::string_view>{"src", "entry", "grid", "block", "args"};
  return ForEachField(o, "job", required,
                      [&](std::string_view k, const object& v) -> Status {
    bool handled = false;
    GPUQ_RETURN_IF_ERROR(GetLaunchField(k, v, &j->launch, &handled));
    if (handled) return Status::Ok();
    GPUQ_RETURN_IF_ERROR(GetSourceField(k, v, limits, &j->kernel, &handled));
    if (handled) return Status::Ok();
    if (k == "key") return GetStr(v, k, limits.max_key_bytes, &j->key);
    if (k == "tenant") return GetStr(v, k, limits.max_tenant_bytes, &j->tenant);
    if (k == "priority") return GetU(v, k, &j->priority, kMaxPriority);
    if (k == "deadline_ms") return GetU(v, k, &j->deadline_ms, kMaxDeadlineMs);
    if (k == "limit_ms") return GetU(v, k, &j->time_limit_ms, kMaxTimeLimitMs);
    if (k == "entry") return GetStr(v, k, limits.max_name_bytes, &j->kernel.entry);
    if (k == "expr") return GetBool(v, k, &j->kernel.name_expression);
    if (k == "args") return GetArgs(v, limits, &j->args);
    if (k == "files") return GetFiles(v, k, limits, false, &j->files);
    if (k == "local_out") return GetBool(v, k, &j->local_out);
    if (k == "place") {
      return ForEachField(v, k, {}, [&](std::string_view pk, const object& pv) -> Status {
        if (pk == "arch") return GetStr(pv, pk, 16, &j->placement.arch);
        if (pk == "gpu") return GetStr(pv, pk, 64, &j->placement.gpu);
        if (pk == "min_free") return GetU(pv, pk, &j->placement.min_free_bytes);
        return kUnknownField;
      });
    }
    if (k == "sources") {
      const msgpack::object_array* a = nullptr;
      GPUQ_RETURN_IF_ERROR(
          GetArray(v, k, limits.max_sources ? limits.max_sources - 1 : 0, &a));
      j->sources.resize(a->size);
      for (uint32_t i = 0; i < a->size; ++i) {
        Status s = ForEachField(a->ptr[i], "source", {"src"},
                                [&](std::string_view sk, const object& sv) -> Status {
          bool h = false;
          GPUQ_RETURN_IF_ERROR(GetSourceField(sk, sv, limits, &j->sources[i], &h));
          return h ? Status::Ok() : kUnknownField;
        });
        if (!s.ok()) return s.WithContext("source " + std::to_string(i + 1));
      }
      return Status::Ok();
    }
    if (k == "buffers") return GetArgs(v, limits, &j->buffers, k, limits.max_job_buffers);
    if (k == "launches") return GetKernelLaunches(v, limits, "source", &j->launches);
    if (k == "graph") return GetBool(v, k, &j->graph);
    return kUnknownField;
  });
}

Status GetTiming(const object& o, const Limits& limits, Timing* t) {
  return ForEachField(
      o, "timing", {"queue", "compile", "load", "h2d", "kernel", "d2h", "total", "cache_hit"},
      [&](std::string_view k, const object& v) -> Status {
        if (k == "queue") return GetU(v, k, &t->queue_us);
        if (k == "compile") return GetU(v, k, &t->compile_us);
        if (k == "load") return GetU(v, k, &t->load_us);
        if (k == "h2d") return GetU(v, k, &t->h2d_us);
        if (k == "kernel") return GetU(v, k, &t->kernel_us);
        if (k == "d2h") return GetU(v, k, &t->d2h_us);
        if (k == "total") return GetU(v, k, &t->total_us);
        if (k == "cache_hit") return GetBool(v, k, &t->cache_hit);
        if (k == "launches") return GetUList(v, k, limits.max_launches, &t->launch_us);
        return kUnknownField;
      });
}

Status GetHealth(const object& o, const Limits& limits, GpuHealth* h) {
  h->known = true;
  return ForEachField(
      o, "health",
      {"util_pct", "mem_used", "temp_c", "power_mw", "ecc_corrected", "ecc_uncorrected",
       "xid_events", "last_xid"},
      [&](std::string_view k, const object& v) -> Status {
        if (k == "util_pct") return GetU(v, k, &h->util_pct, 100);
        if (k == "mem_used") return GetU(v, k, &h->mem_used_bytes);
        if (k == "temp_c") return GetU(v, k, &h->temp_c, 1000);
        if (k == "power_mw") return GetU(v, k, &h->power_mw);
        if (k == "ecc_corrected") return GetU(v, k, &h->ecc_corrected);
        if (k == "ecc_uncorrected") return GetU(v, k, &h->ecc_uncorrected);
        if (k == "xid_events") return GetU(v, k, &h->xid_events);
        if (k == "last_xid") return GetU(v, k, &h->last_xid);
        if (k == "drain") {
          GPUQ_RETURN_IF_ERROR(GetStr(v, k, limits.max_name_bytes, &h->drain));
          if (h->drain.empty()) return Error(Code::kInvalid, "field 'drain' must not be empty");
          return Status::Ok();
        }
        return kUnknownField;
      });
}

// A worker's token: 16 to 64 characters of [0-9a-f].
Status GetToken(const object& o, std::string_view field, std::string* out) {
  GPUQ_RETURN_IF_ERROR(GetStr(o, field, 64, out));
  if (out->size() < 16 ||
      out->find_first_not_of("0123456789abcdef") != std::string::npos) {
    return Error(Code::kInvalid, "field 'token' must be 16 to 64 lowercase hex digits");
  }
  return Status::Ok();
}

Status GetDevice(const object& o, DeviceInfo* d) {
  return ForEachField(
      o, "device",
      {"ordinal", "name", "uuid", "cc", "total_bytes", "free_bytes", "sms", "clock_khz",
       "l2_bytes", "managed", "max_threads", "max_block", "max_grid", "max_shared",
       "max_shared_optin"},
      [&](std::string_view k, const object& v) -> Status {
        if (k == "ordinal") return GetU(v, k, &d->ordinal);
        if (k == "name") return GetStr(v, k, 256, &d->name);
        if (k == "uuid") return GetStr(v, k, 64, &d->uuid);
        if (k == "cc") {
          const msgpack::object_array* a = nullptr;
          GPUQ_RETURN_IF_ERROR(GetTuple(v, k, 2, "[major, minor]", &a));
          GPUQ_RETURN_IF_ERROR(GetU(a->ptr[0], k, &d->cc_major, 99));
          return GetU(a->ptr[1], k, &d->cc_minor, 9);
        }
        if (k == "total_bytes") return GetU(v, k, &d->total_bytes);
        if (k == "free_bytes") return GetU(v, k, &d->free_bytes);
        if (k == "sms") return GetU(v, k, &d->sm_count);
        if (k == "clock_khz") return GetU(v, k, &d->clock_khz);
        if (k == "l2_bytes") return GetU(v, k, &d->l2_bytes);
        if (k == "managed") return GetBool(v, k, &d->managed_memory);
        if (k == "max_threads") return GetU(v, k, &d->max_threads_per_block);
        if (k == "max_block") return GetDim3(v, k, &d->max_block);
        if (k == "max_grid") return GetDim3(v, k, &d->max_grid);
        if (k == "max_shared") return GetU(v, k, &d->max_shared_per_block);
        if (k == "max_shared_optin") return GetU(v, k, &d->max_shared_optin);
        return kUnknownField;
      });
}

// Unpacks one msgpack value that must span the whole header frame.
// A decoded header and the zone its objects live in: this thread's zone,
// reused from message to message (its first block stays allocated), or a
// zone of its own when a decode on this thread holds that one already.
class Unpacked {
 public:
  Unpacked() {
    Spare& spare = ThreadSpare();
    if (!spare.in_use) {
      spare.in_use = true;
      zone_ = &spare.zone;
      leased_ = true;
    } else {
      owned_ = std::make_unique<msgpack::zone>();
      zone_ = owned_.get();
    }
  }
  ~Unpacked() {
    if (!leased_) return;
    zone_->clear();
    ThreadSpare().in_use = false;
  }
  Unpacked(const Unpacked&) = delete;
  Unpacked& operator=(const Unpacked&) = delete;
  msgpack::zone& zone() { return *zone_; }
  const msgpack::object& get() const { return obj_; }
  void set(const msgpack::object& o) { obj_ = o; }

 private:
  struct Spare {
    msgpack::zone zone;
    bool in_use = false;
  };
  static Spare& ThreadSpare() {
    thread_local Spare spare;
    return spare;
  }
  msgpack::zone* zone_ = nullptr;
  std::unique_ptr<msgpack::zone> owned_;
  bool leased_ = false;
  msgpack::object obj_;
};

bool ReferenceBin(msgpack::type::object_type t, size_t, void*) { return t == mt::BIN; }

// `max_bin` > 0: bin values up to that size are allowed, and referenced in
// `header` (which must outlive `oh`) rather than copied.
Status Unpack(std::string_view header, const Limits& limits, Unpacked* oh, size_t max_bin = 0) {
  if (header.size() > limits.max_header_bytes) {
    return TooLarge("header", limits.max_header_bytes);
  }
  const size_t max_str = std::max({limits.max_total_source_bytes,
                                   limits.max_text_bytes, limits.max_source_bytes});
  msgpack::unpack_limit lim(/*array=*/limits.max_list, /*map=*/64,
                            /*str=*/max_str, /*bin=*/max_bin, /*ext=*/0, /*depth=*/8);
  try {
    size_t off = 0;
    bool referenced = false;
    oh->set(msgpack::unpack(oh->zone(), header.data(), header.size(), off, referenced,
                            max_bin ? ReferenceBin : nullptr, nullptr, lim));
    if (off != header.size()) {
      return Error(Code::kMalformed, "trailing bytes after the msgpack header");
    }
  } catch (const msgpack::bin_size_overflow&) {
    return Error(Code::kMalformed, "header holds msgpack bin, which no field uses");
  } catch (const msgpack::ext_size_overflow&) {
    return Error(Code::kMalformed, "header holds msgpack ext, which no field uses");
  } catch (const msgpack::depth_size_overflow& e) {
    return Error(Code::kTooLarge, std::string("header nests too deep: ") + e.what());
  } catch (const msgpack::size_overflow& e) {
    return Error(Code::kTooLarge, std::string("header: ") + e.what());
  } catch (const std::bad_alloc&) {
    return Error(Code::kTooLarge, "header: out of memory decoding");
  } catch (const std::exception& e) {
    return Error(Code::kMalformed, std::string("header is not valid msgpack: ") + e.what());
  }
  if (oh->get().type != mt::MAP) return Error(Code::kMalformed, "header must be a map");
  return Status::Ok();
}

// Finds "op" first so that ops can have their own required fields.
Status GetOp(const object& o, std::string_view* op) {
  const auto& m = o.via.map;
  for (uint32_t i = 0; i < m.size; ++i) {
    if (StrView(m.ptr[i].key) == "op") {
      if (m.ptr[i].val.type != mt::STR) return Malformed("op", "expected a string");
      *op = StrView(m.ptr[i].val);
      return Status::Ok();
    }
  }
  return Malformed("op", "required");
}

Status UnknownOp(std::string_view op) {
  return Error(Code::kUnknownCommand,
               "unknown command '" + std::string(op.substr(0, 64)) + "'");
}

Status CheckOutputs(const std::vector<uint32_t>& outputs,
                    std::span<const uint64_t> payload_sizes) {
  if (outputs.size() != payload_sizes.size()) {
    return Error(Code::kMalformed, "one payload frame per output is required (" +
                                       std::to_string(outputs.size()) + " outputs, " +
                                       std::to_string(payload_sizes.size()) + " frames)");
  }
  return Status::Ok();
}

Status CheckBufferFrames(const std::vector<Arg>& args, size_t first_frame,
                         std::span<const uint64_t> payload_sizes, const Limits& limits) {
  if (payload_sizes.size() > limits.max_payload_frames) {
    return TooLarge("payload frames", limits.max_payload_frames);
  }
  std::vector<bool> used(payload_sizes.size(), false);
  for (size_t i = 0; i < first_frame && i < used.size(); ++i) used[i] = true;
  for (size_t i = 0; i < args.size(); ++i) {
    const Arg& a = args[i];
    if ((a.kind != ArgKind::kIn && a.kind != ArgKind::kInOut) || a.in_region()) continue;
    if (a.frame < first_frame || a.frame >= payload_sizes.size()) {
      return Error(Code::kInvalid, "argument " + std::to_string(i) +
                                       " names payload frame " + std::to_string(a.frame) +
                                       ", which the message does not have");
    }
    if (used[a.frame]) {
      return Error(Code::kInvalid, "payload frame " + std::to_string(a.frame) +
                                       " is used by two arguments");
    }
    if (payload_sizes[a.frame] > limits.max_buffer_bytes) {
      return TooLarge("buffer", limits.max_buffer_bytes);
    }
    used[a.frame] = true;
  }
  for (size_t f = 0; f < used.size(); ++f) {
    if (!used[f]) {
      return Error(Code::kInvalid,
                   "payload frame " + std::to_string(f) + " is not used by any argument");
    }
  }
  return Status::Ok();
}

Status CheckLaunch(const LaunchSpec& l) {
  // CUDA's limits on every architecture gpuq supports (sm_50 and later);
  // device-specific limits are checked again by the worker.
  const Dim3 &g = l.grid, &b = l.block;
  if (g.x == 0 || g.y == 0 || g.z == 0 || b.x == 0 || b.y == 0 || b.z == 0) {
    return Error(Code::kInvalid, "grid and block dimensions must be at least 1");
  }
  if (g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535) {
    return Error(Code::kInvalid, "grid is over CUDA's limits (2^31-1, 65535, 65535)");
  }
  if (b.x > 1024 || b.y > 1024 || b.z > 64 || b.Count() > 1024) {
    return Error(Code::kInvalid,
                 "block is over CUDA's limits (1024, 1024, 64; 1024 threads in all)");
  }
  return Status::Ok();
}

Status CheckShared(const LaunchSpec& l) {
  if (l.shared_bytes > (1u << 20)) {
    return Error(Code::kInvalid, "dynamic shared memory is over 1 MiB");
  }
  return Status::Ok();
}

// The buffers of a job of several launches (in, out, inout, scratch), and
// its launches' arguments (scalars, and kBuffer arguments naming one of
// them at an offset within it). `sizes`: payload frame sizes, then files.
Status CheckSeveralLaunches(const std::vector<Arg>& buffers,
                            const std::vector<KernelLaunch>& launches, size_t modules,
                            std::string_view module_word, std::span<const uint64_t> sizes,
                            const Limits& limits) {
  if (launches.empty()) return Error(Code::kInvalid, "a job of several launches has none");
  if (launches.size() > limits.max_launches) {
    return TooLarge("launches per job", limits.max_launches);
  }
  if (buffers.size() > limits.max_job_buffers) {
    return TooLarge("buffers per job", limits.max_job_buffers);
  }
  uint64_t scratch = 0;
  for (size_t i = 0; i < buffers.size(); ++i) {
    const Arg& b = buffers[i];
    if (b.kind == ArgKind::kScalar || b.kind == ArgKind::kBuffer) {
      return Error(Code::kInvalid, "buffer " + std::to_string(i) +
                                       " must be in, out, inout or scratch");
    }
    if (b.kind == ArgKind::kScratch) scratch += b.size;
  }
  if (scratch > limits.max_scratch_bytes) {
    return Error(Code::kTooLarge, "scratch buffers of " + std::to_string(scratch) +
                                      " bytes are over the limit of " +
                                      std::to_string(limits.max_scratch_bytes) + " per job");
  }
  for (size_t i = 0; i < launches.size(); ++i) {
    const KernelLaunch& l = launches[i];
    // Texts are made only for an error (this runs for every launch).
    auto which = [i] { return "launch " + std::to_string(i); };
    if (l.source >= modules) {
      return Error(Code::kInvalid, which() + " names " + std::string(module_word) + " " +
                                       std::to_string(l.source) + " of " +
                                       std::to_string(modules));
    }
    if (l.entry.empty()) return Error(Code::kInvalid, which() + ": kernel entry is empty");
    Status s = CheckLaunch(l.launch);
    if (s.ok()) s = CheckShared(l.launch);
    if (!s.ok()) return s.WithContext(which());
    for (size_t k = 0; k < l.args.size(); ++k) {
      const Arg& a = l.args[k];
      if (a.kind == ArgKind::kScalar) continue;
      auto arg = [&] { return which() + ", argument " + std::to_string(k); };
      if (a.kind != ArgKind::kBuffer) {
        return Error(Code::kInvalid, arg() + ": a launch's arguments are scalars and "
                                           "buffers of the job (buf)");
      }
      if (a.buffer >= buffers.size()) {
        return Error(Code::kInvalid, arg() + " names buffer " + std::to_string(a.buffer) +
                                         " of " + std::to_string(buffers.size()));
      }
      const Arg& b = buffers[a.buffer];
      const bool framed =
          (b.kind == ArgKind::kIn || b.kind == ArgKind::kInOut) && !b.in_region();
      // A frame's size is checked with the frames (CheckBufferFrames).
      const uint64_t size = !framed ? b.size : b.frame < sizes.size() ? sizes[b.frame] : 0;
      if (a.offset > size) {
        return Error(Code::kInvalid, arg() + ": offset " + std::to_string(a.offset) +
                                         " is past the end of buffer " +
                                         std::to_string(a.buffer) + " (" +
                                         std::to_string(size) + " bytes)");
      }
    }
  }
  return Status::Ok();
}

Status CheckSource(const KernelSpec& k, size_t* total) {
  if (k.source.empty()) return Error(Code::kInvalid, "kernel source is empty");
  *total += k.source.size();
  for (const NamedHeader& h : k.headers) {
    if (h.name.empty()) return Error(Code::kInvalid, "a header has an empty name");
    *total += h.content.size();
  }
  return Status::Ok();
}

}  // namespace

Status ValidateJob(const JobSpec& job, std::span<const uint64_t> payload_sizes,
                   const Limits& limits) {
  size_t total = 0;
  GPUQ_RETURN_IF_ERROR(CheckSource(job.kernel, &total));
  for (size_t i = 0; i < job.sources.size(); ++i) {
    Status s = CheckSource(job.sources[i], &total);
    if (!s.ok()) return s.WithContext("source " + std::to_string(i + 1));
    if (!job.sources[i].entry.empty() || job.sources[i].name_expression) {
      return Error(Code::kInvalid, "source " + std::to_string(i + 1) +
                                       ": entries are named by launches");
    }
  }
  if (total > limits.max_total_source_bytes) {
    return TooLarge("source and headers", limits.max_total_source_bytes);
  }
  if (job.priority > kMaxPriority) return Error(Code::kInvalid, "priority is above 9");
  const std::vector<uint64_t> sizes = WithFiles(payload_sizes, job.files);
  if (job.multi()) {
    if (!job.kernel.entry.empty() || job.kernel.name_expression || !job.args.empty() ||
        job.launch != LaunchSpec{}) {
      return Error(Code::kInvalid,
                   "a job of several launches names entries, dimensions and arguments in "
                   "its launches");
    }
    if (job.sources.size() + 1 > limits.max_sources) {
      return TooLarge("sources per job", limits.max_sources);
    }
    GPUQ_RETURN_IF_ERROR(CheckSeveralLaunches(job.buffers, job.launches,
                                              job.sources.size() + 1, "source", sizes,
                                              limits));
    return CheckBufferFrames(job.buffers, 0, sizes, limits);
  }
  if (!job.sources.empty() || !job.buffers.empty() || job.graph) {
    return Error(Code::kInvalid, "sources, buffers and graph belong to jobs of several launches");
  }
  if (job.kernel.entry.empty()) return Error(Code::kInvalid, "kernel entry is empty");
  GPUQ_RETURN_IF_ERROR(CheckLaunch(job.launch));
  GPUQ_RETURN_IF_ERROR(CheckShared(job.launch));
  for (size_t i = 0; i < job.args.size(); ++i) {
    if (job.args[i].kind == ArgKind::kScratch || job.args[i].kind == ArgKind::kBuffer) {
      return Error(Code::kInvalid, "argument " + std::to_string(i) +
                                       ": scratch and buf belong to jobs of several launches");
    }
  }
  return CheckBufferFrames(job.args, 0, sizes, limits);
}

std::string EncodeBatch(const Batch& b) {
  StringBuffer buf;
  Packer p(buf);
  MapWriter w(p);
  w.Field("op", true, [&] { PackStr(p, "batch"); })
      .Field("parts", true, [&] { PackU32List(p, b.parts); });
  w.Write();
  return Take(buf);
}

Status DecodeBatch(std::string_view header, std::span<const uint64_t> payload_sizes,
                   const Limits& limits, Batch* out) {
  Unpacked oh;
  GPUQ_RETURN_IF_ERROR(Unpack(header, limits, &oh));
  std::string_view op;
  GPUQ_RETURN_IF_ERROR(GetOp(oh.get(), &op));
  if (op != "batch") return UnknownOp(op);
  Batch b;
  GPUQ_RETURN_IF_ERROR(ForEachField(oh.get(), "header", {"parts"},
                                    [&](std::string_view k, const object& v) -> Status {
    if (k == "op") return Status::Ok();
    if (k == "parts") {
      return GetUList(v, k, std::min(limits.max_list, kMaxBatchParts), &b.parts);
    }
    return kUnknownField;
  }));
  uint64_t frames = 0;
  for (uint32_t n : b.parts) {
    if (n == 0) return Malformed("parts", "every message has its header frame");
    frames += n;
  }
  if (b.parts.empty() || frames != payload_sizes.size()) {
    return Malformed("parts", "the parts add up to " + std::to_string(frames) +
                                  " frames; the batch holds " +
                                  std::to_string(payload_sizes.size()));
  }
  *out = std::move(b);
  return Status::Ok();
}

bool IsPlainFileName(std::string_view name) {
  if (name.empty() || name.size() > 128 || name[0] == '.') return false;
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

std::string EncodeJobSpec(const JobSpec& job) {
  StringBuffer buf;
  Packer p(buf);
  PackJob(p, job);
  return Take(buf);
}

Status DecodeJobSpec(std::string_view bytes, std::span<const uint64_t> payload_sizes,
                     const Limits& limits, JobSpec* out) {
  Unpacked oh;
  GPUQ_RETURN_IF_ERROR(Unpack(bytes, limits, &oh));
  JobSpec j;
  GPUQ_RETURN_IF_ERROR(GetJob(oh.get(), limits, &j));
  GPUQ_RETURN_IF_ERROR(ValidateJob(j, payload_sizes, limits));
  *out = std::move(j);
  return Status::Ok();
}

namespace {

// Finds the value of one top-level key of a map that need not decode:
// trailing bytes, fields over their limits, bin or ext elsewhere in it do not
// hide it. Allocates nothing, and stops at the key's value, 8 levels deep,
// or after `max_items` elements (array items and map keys, at any depth).
class TopLevelFinder : public msgpack::null_visitor {
 public:
  TopLevelFinder(std::string_view key, size_t max_items) : key_(key), items_left_(max_items) {}
  bool start_array_item() { return Spend(); }
  bool start_map(uint32_t) {
    if (depth_ == 0 && seen_top_) return false;  // a second top-level value
    seen_top_ = true;
    return Enter();
  }
  bool end_map() { return Leave(); }
  bool start_array(uint32_t) {
    if (depth_ == 0) return false;  // not a map
    return Enter();
  }
  bool end_array() { return Leave(); }
  bool start_map_key() {
    in_key_ = depth_ == 1;
    return Spend();
  }
  bool end_map_key() {
    in_key_ = false;
    return true;
  }
  bool start_map_value() {
    at_value_ = depth_ == 1 && key_matched_;
    return true;
  }
  bool end_map_value() {
    key_matched_ = at_value_ = false;
    return true;
  }
  bool visit_str(const char* v, uint32_t size) {
    if (in_key_) {
      key_matched_ = std::string_view(v, size) == key_;
      return true;
    }
    if (!at_value_ || depth_ != 1) return true;
    str_ = std::string_view(v, size);
    return false;
  }
  bool visit_positive_integer(uint64_t v) {
    if (!at_value_ || depth_ != 1) return true;
    uint_ = v;
    return false;  // found: stop
  }
  bool visit_boolean(bool v) {
    if (!at_value_ || depth_ != 1) return true;
    bool_ = v;
    return false;
  }
  void parse_error(size_t, size_t) {}
  void insufficient_bytes(size_t, size_t) {}
  std::optional<uint64_t> uint_;
  std::optional<bool> bool_;
  std::optional<std::string_view> str_;  // into the parsed bytes

 private:
  bool Enter() {
    at_value_ = false;
    return ++depth_ <= 8;
  }
  bool Leave() {
    --depth_;
    return true;
  }
  bool Spend() {
    if (items_left_ == 0) return false;
    --items_left_;
    return true;
  }
  std::string_view key_;
  size_t items_left_;
  int depth_ = 0;
  bool seen_top_ = false, in_key_ = false, key_matched_ = false, at_value_ = false;
};

TopLevelFinder Find(std::string_view map, std::string_view key, size_t max_items = kPeekItems) {
  TopLevelFinder finder(key, max_items);
  size_t off = 0;
  try {
    msgpack::parse(map.data(), map.size(), off, finder);
  } catch (const std::exception&) {
  }
  return finder;
}

}  // namespace

uint64_t PeekRequestId(std::string_view header, size_t max_items) {
  return Find(header, "rid", max_items).uint_.value_or(0);
}

std::optional<bool> PeekBool(std::string_view map, std::string_view key, size_t max_items) {
  return Find(map, key, max_items).bool_;
}

std::optional<uint64_t> PeekUint(std::string_view map, std::string_view key, size_t max_items) {
  return Find(map, key, max_items).uint_;
}

std::optional<std::string_view> PeekString(std::string_view map, std::string_view key,
                                           size_t max_items) {
  return Find(map, key, max_items).str_;
}

bool IsBatch(std::string_view header) {
  // A look at the top-level "op" alone, before the whole decode.
  return Find(header, "op").str_ == std::optional<std::string_view>("batch");
}

namespace {

// The local files a submit names (job.files), read on their own from a
// submit refused before its job decoded whole: they are the broker's to
// remove, whatever refused it. Only plain file names, as the decoder takes.
std::vector<LocalFile> FilesOfRefusedSubmit(const object& header, const Limits& limits) {
  std::vector<LocalFile> files;
  if (header.type != mt::MAP) return files;
  for (uint32_t i = 0; i < header.via.map.size; ++i) {
    const auto& kv = header.via.map.ptr[i];
    if (kv.key.type != mt::STR ||
        std::string_view(kv.key.via.str.ptr, kv.key.via.str.size) != "job" ||
        kv.val.type != mt::MAP) {
      continue;
    }
    for (uint32_t k = 0; k < kv.val.via.map.size; ++k) {
      const auto& f = kv.val.via.map.ptr[k];
      if (f.key.type != mt::STR ||
          std::string_view(f.key.via.str.ptr, f.key.via.str.size) != "files") {
        continue;
      }
      (void)GetFiles(f.val, "files", limits, false, &files);  // those read before an error
      std::erase_if(files, [](const LocalFile& lf) { return !IsPlainFileName(lf.name); });
      return files;
    }
  }
  return files;
}

Status DecodeClientFields(const object& header, ClientOp client_op,
                          std::span<const uint64_t> payload_sizes, const Limits& limits,
                          ClientRequest* out);

}  // namespace

Status DecodeClientRequest(std::string_view header,
                           std::span<const uint64_t> payload_sizes,
                           const Limits& limits, ClientRequest* out) {
  Unpacked oh;
  GPUQ_RETURN_IF_ERROR(Unpack(header, limits, &oh));
  std::string_view op;
  GPUQ_RETURN_IF_ERROR(GetOp(oh.get(), &op));
  ClientOp client_op{};
  if (!Lookup(kClientOpNames, op, &client_op)) return UnknownOp(op);
  Status s = DecodeClientFields(oh.get(), client_op, payload_sizes, limits, out);
  if (!s.ok() && client_op == ClientOp::kSubmit && out->op != ClientOp::kSubmit) {
    // Refused before its job decoded whole (a bad field, rid 0): what it
    // named stays readable too.
    out->op = ClientOp::kSubmit;
    out->job.files = FilesOfRefusedSubmit(oh.get(), limits);
  }
  return s;
}

namespace {

Status DecodeClientFields(const object& header, ClientOp client_op,
                          std::span<const uint64_t> payload_sizes, const Limits& limits,
                          ClientRequest* out) {
  const object& oh_object = header;
  ClientRequest r;
  r.op = client_op;
  const bool call = r.op == ClientOp::kSessionCall;
  const bool needs_id = r.op == ClientOp::kStatus || r.op == ClientOp::kResult ||
                        r.op == ClientOp::kCancel || r.op == ClientOp::kSessionClose || call;
  const bool submit = r.op == ClientOp::kSubmit;
  bool has_id = false, has_job = false, has_token = false;
  GPUQ_RETURN_IF_ERROR(ForEachField(oh_object, "header", {"rid"},
                                    [&](std::string_view k, const object& v) -> Status {
    if (k == "op") return Status::Ok();
    if (k == "rid") return GetU(v, k, &r.rid);
    if (k == "id" && needs_id) {
      has_id = true;
      return GetU(v, k, &r.id);
    }
    if (k == "job" && submit) {
      has_job = true;
      return GetJob(v, limits, &r.job);
    }
    if (r.op == ClientOp::kUsage) {
      if (k == "tenant") return GetStr(v, k, limits.max_tenant_bytes, &r.tenant);
      if (k == "since_ms") return GetU(v, k, &r.since_ms);
      if (k == "until_ms") return GetU(v, k, &r.until_ms);
    }
    if (r.op == ClientOp::kSessionOpen && k == "tenant") {
      return GetStr(v, k, limits.max_tenant_bytes, &r.tenant);
    }
    if (call && k == "token") {
      has_token = true;
      return GetStr(v, k, 64, &r.token);
    }
    if (r.op == ClientOp::kSessionOpen && k == "session") {
      SessionSpec& ss = r.session;
      return ForEachField(v, k, {}, [&](std::string_view sk, const object& sv) -> Status {
        if (sk == "arch") return GetStr(sv, sk, 16, &ss.placement.arch);
        if (sk == "gpu") return GetStr(sv, sk, 64, &ss.placement.gpu);
        if (sk == "min_free") return GetU(sv, sk, &ss.placement.min_free_bytes);
        if (sk == "idle_ms") return GetU(sv, sk, &ss.idle_ms, kMaxDeadlineMs);
        if (sk == "memory") return GetU(sv, sk, &ss.memory);
        if (sk == "limit_ms") return GetU(sv, sk, &ss.limit_ms, kMaxTimeLimitMs);
        return kUnknownField;
      });
    }
    return kUnknownField;
  }));
  if (r.rid == 0) return Malformed("rid", "must be at least 1 (0 is reserved for pushes)");
  if (needs_id && !has_id) return Malformed("id", "required");
  if (submit && !has_job) return Malformed("job", "required");
  if (call && !has_token) return Malformed("token", "required");
  if (call) {
    // One session request, as the session channel frames it (less its
    // length), of at most a session frame's size.
    if (payload_sizes.size() != 1) {
      return Error(Code::kMalformed, "session_call carries exactly one payload frame");
    }
    if (payload_sizes[0] > limits.max_buffer_bytes + (1u << 20)) {
      return Error(Code::kTooLarge, "a session request of " + std::to_string(payload_sizes[0]) +
                                        " bytes is over the limit");
    }
  } else if (submit) {
    if (Status s = ValidateJob(r.job, payload_sizes, limits); !s.ok()) {
      // What a refused submit named stays readable: its local files are the
      // broker's to remove.
      out->op = r.op;
      out->job.files = std::move(r.job.files);
      return s;
    }
  } else if (!payload_sizes.empty()) {
    return Error(Code::kMalformed, "only submit and session_call carry payload frames");
  }
  *out = std::move(r);
  return Status::Ok();
}

}  // namespace

// Which fields each reply carries (PROTOCOL.md, "Replies"). A field outside
// its op's set is malformed: the encoder would drop it, so accepting it would
// make two different messages mean the same thing.
struct ReplyFields {
  std::vector<std::string_view> required, optional;
};

// Whether `k` is one of `names`: the length and first byte first (most
// names differ there), the bytes after; a field lookup on every message.
bool Listed(const std::vector<std::string_view>& names, std::string_view k) {
  for (std::string_view n : names) {
    if (n.size() == k.size() && !k.empty() && n[0] == k[0] &&
        std::memcmp(n.data(), k.data(), k.size()) == 0) {
      return true;
    }
  }
  return false;
}

const ReplyFields& FieldsOf(ReplyOp op) {
  static const ReplyFields kFields[] = {
      /*accepted*/ {{"rid", "id"}, {"existing"}},
      /*error*/ {{"rid", "code", "error"}, {"id", "retry_after_ms"}},
      /*status*/ {{"rid", "id", "state", "attempts"}, {"code", "error", "device"}},
      /*result*/
      {{"rid", "id", "state", "attempts", "timing", "outputs"},
       {"code", "error", "device", "files"}},
      /*canceled*/ {{"rid", "id", "state"}, {"code", "error"}},
      /*stats*/ {{"rid", "stats"}, {}},
      /*devices*/ {{"rid", "workers"}, {"local_dir"}},
      /*usage*/ {{"rid", "usage"}, {}},
      /*session*/ {{"rid", "id"}, {"device", "path", "token"}},
      /*session_answer*/ {{"rid", "id"}, {}},
  };
  return kFields[static_cast<size_t>(op)];
}

// "code" and "error" come together, and "code" is never "ok" on the wire.
Status CheckFailure(bool has_code, bool has_error, Code code) {
  if (has_code != has_error) {
    return Error(Code::kMalformed, "fields 'code' and 'error' come together");
  }
  if (has_code && code == Code::kOk) {
    return Malformed("code", "'ok' is not a failure code");
  }
  return Status::Ok();
}

Status DecodeClientReply(std::string_view header, std::span<const uint64_t> payload_sizes,
                         const Limits& limits, ClientReply* out) {
  Unpacked oh;
  GPUQ_RETURN_IF_ERROR(Unpack(header, limits, &oh));
  std::string_view op;
  GPUQ_RETURN_IF_ERROR(GetOp(oh.get(), &op));
  ClientReply r;
  if (!Lookup(kReplyOpNames, op, &r.op)) return UnknownOp(op);
  const ReplyFields& fields = FieldsOf(r.op);
  bool has_code = false, has_error = false;
  GPUQ_RETURN_IF_ERROR(ForEachField(oh.get(), "header", fields.required,
                                    [&](std::string_view k, const object& v) -> Status {
    if (k == "op") return Status::Ok();
    if (!Listed(fields.required, k) && !Listed(fields.optional, k)) return kUnknownField;
    if (k == "rid") return GetU(v, k, &r.rid);
    if (k == "id") return GetU(v, k, &r.id);
    if (k == "existing") return GetBool(v, k, &r.existing);
    if (k == "state") return GetEnum(v, k, kStateNames, &r.state);
    if (k == "code") {
      has_code = true;
      return GetCode(v, k, &r.code);
    }
    if (k == "error") {
      has_error = true;
      return GetStr(v, k, limits.max_text_bytes, &r.error);
    }
    if (k == "retry_after_ms") return GetU(v, k, &r.retry_after_ms);
    if (k == "attempts") return GetU(v, k, &r.attempts);
    if (k == "device") return GetStr(v, k, 64, &r.device);
    if (k == "timing") return GetTiming(v, limits, &r.timing);
    if (k == "outputs") return GetUList(v, k, limits.max_args, &r.outputs);
    if (k == "files") return GetFiles(v, k, limits, true, &r.files);
    if (k == "local_dir") return GetStr(v, k, 4096, &r.local_dir);
    if (k == "path") return GetStr(v, k, 4096, &r.path);
    if (k == "token") return GetStr(v, k, 64, &r.token);
    if (k == "stats") {
      if (v.type != mt::MAP) return Malformed(k, "expected a map");
      msgpack::sbuffer b;
      msgpack::pack(b, v);
      r.stats.assign(b.data(), b.size());
      return Status::Ok();
    }
    if (k == "usage") {
      const msgpack::object_array* a = nullptr;
      GPUQ_RETURN_IF_ERROR(GetArray(v, k, limits.max_list, &a));
      r.usage.resize(a->size);
      for (uint32_t i = 0; i < a->size; ++i) {
        TenantUsage& u = r.usage[i];
        GPUQ_RETURN_IF_ERROR(ForEachField(
            a->ptr[i], k,
            {"tenant", "done", "failed", "canceled", "expired", "gpu_us", "kernel_us",
             "bytes_in", "bytes_out"},
            [&](std::string_view uk, const object& uv) -> Status {
              if (uk == "tenant") return GetStr(uv, uk, limits.max_tenant_bytes, &u.tenant);
              if (uk == "done") return GetU(uv, uk, &u.done);
              if (uk == "failed") return GetU(uv, uk, &u.failed);
              if (uk == "canceled") return GetU(uv, uk, &u.canceled);
              if (uk == "expired") return GetU(uv, uk, &u.expired);
              if (uk == "gpu_us") return GetU(uv, uk, &u.gpu_us);
              if (uk == "kernel_us") return GetU(uv, uk, &u.kernel_us);
              if (uk == "bytes_in") return GetU(uv, uk, &u.bytes_in);
              if (uk == "bytes_out") return GetU(uv, uk, &u.bytes_out);
              return kUnknownField;
            }));
      }
      return Status::Ok();
    }
    if (k == "workers") {
      const msgpack::object_array* a = nullptr;
      GPUQ_RETURN_IF_ERROR(GetArray(v, k, limits.max_list, &a));
      r.workers.resize(a->size);
      for (uint32_t i = 0; i < a->size; ++i) {
        WorkerView& w = r.workers[i];
        GPUQ_RETURN_IF_ERROR(ForEachField(
            a->ptr[i], k, {"worker", "device", "slots", "inflight", "heartbeat_age_ms"},
            [&](std::string_view wk, const object& wv) -> Status {
              if (wk == "health") return GetHealth(wv, limits, &w.health);
              if (wk == "worker") return GetStr(wv, wk, 256, &w.worker);
              if (wk == "device") return GetDevice(wv, &w.device);
              if (wk == "slots") return GetU(wv, wk, &w.slots);
              if (wk == "inflight") return GetU(wv, wk, &w.inflight);
              if (wk == "heartbeat_age_ms") return GetU(wv, wk, &w.heartbeat_age_ms);
              return kUnknownField;
            }));
      }
      return Status::Ok();
    }
    return kUnknownField;
  }));
  GPUQ_RETURN_IF_ERROR(CheckFailure(has_code, has_error, r.code));
  if (r.op == ReplyOp::kResult) {
    GPUQ_RETURN_IF_ERROR(CheckOutputs(r.outputs, WithFiles(payload_sizes, r.files)));
  } else if (r.op == ReplyOp::kSessionAnswer) {
    if (payload_sizes.size() != 1) {
      return Error(Code::kMalformed, "session_answer carries exactly one payload frame");
    }
  } else if (!payload_sizes.empty()) {
    return Error(Code::kMalformed, "only result and session_answer carry payload frames");
  }
  *out = std::move(r);
  return Status::Ok();
}

Status DecodeWorkerMessage(std::string_view header, std::span<const uint64_t> payload_sizes,
                           const Limits& limits, WorkerMessage* out) {
  Unpacked oh;
  GPUQ_RETURN_IF_ERROR(Unpack(header, limits, &oh));
  std::string_view op;
  GPUQ_RETURN_IF_ERROR(GetOp(oh.get(), &op));
  WorkerMessage r;
  if (!Lookup(kWorkerOpNames, op, &r.op)) return UnknownOp(op);
  std::vector<std::string_view> required;
  switch (r.op) {
    case WorkerOp::kReady:
      required = {"worker", "device", "slots", "module_slots", "token"};
      break;
    case WorkerOp::kResult:
      required = {"id", "attempt", "state", "timing", "outputs"};
      break;
    case WorkerOp::kHeartbeat:
      required = {"free_bytes", "inflight"};
      break;
    case WorkerOp::kDisconnect:
      required = {"reason"};
      break;
  }
  const WorkerOp wop = r.op;
  bool has_code = false, has_error = false;
  GPUQ_RETURN_IF_ERROR(ForEachField(oh.get(), "header", required,
                                    [&](std::string_view k, const object& v) -> Status {
    if (k == "op") return Status::Ok();
    if (wop == WorkerOp::kReady) {
      if (k == "worker") return GetStr(v, k, 256, &r.worker);
      if (k == "device") return GetDevice(v, &r.device);
      if (k == "slots") return GetU(v, k, &r.slots, 65536);
      if (k == "module_slots") return GetU(v, k, &r.module_slots, 65536);
      if (k == "local_dir") return GetStr(v, k, 4096, &r.local_dir);
      if (k == "token") return GetToken(v, k, &r.token);
      if (k == "health") return GetHealth(v, limits, &r.health);
    } else if (wop == WorkerOp::kResult) {
      if (k == "id") return GetU(v, k, &r.id);
      if (k == "attempt") return GetU(v, k, &r.attempt);
      if (k == "state") return GetEnum(v, k, kStateNames, &r.state);
      if (k == "code") {
        has_code = true;
        return GetCode(v, k, &r.code);
      }
      if (k == "error") {
        has_error = true;
        return GetStr(v, k, limits.max_text_bytes, &r.error);
      }
      if (k == "timing") return GetTiming(v, limits, &r.timing);
      if (k == "outputs") return GetUList(v, k, limits.max_args, &r.outputs);
      if (k == "files") return GetFiles(v, k, limits, false, &r.files);
    } else if (wop == WorkerOp::kHeartbeat) {
      if (k == "free_bytes") return GetU(v, k, &r.free_bytes);
      if (k == "inflight") return GetU(v, k, &r.inflight);
      if (k == "token") return GetToken(v, k, &r.token);
      if (k == "health") return GetHealth(v, limits, &r.health);
      if (k == "running") return GetRunning(v, k, &r.running);
    } else if (k == "reason") {
      return GetStr(v, k, limits.max_text_bytes, &r.reason);
    }
    return kUnknownField;
  }));
  GPUQ_RETURN_IF_ERROR(CheckFailure(has_code, has_error, r.code));
  if (r.op == WorkerOp::kResult) {
    if (r.state != JobState::kDone && r.state != JobState::kFailed) {
      return Error(Code::kInvalid, "a worker result is done or failed");
    }
    GPUQ_RETURN_IF_ERROR(CheckOutputs(r.outputs, WithFiles(payload_sizes, r.files)));
  } else if (!payload_sizes.empty()) {
    return Error(Code::kMalformed, "only result carries payload frames");
  }
  *out = std::move(r);
  return Status::Ok();
}

Status DecodeBrokerMessage(std::string_view header, std::span<const uint64_t> payload_sizes,
                           const Limits& limits, BrokerMessage* out) {
  Unpacked oh;
  GPUQ_RETURN_IF_ERROR(Unpack(header, limits, &oh));
  std::string_view op;
  GPUQ_RETURN_IF_ERROR(GetOp(oh.get(), &op));
  BrokerMessage r;
  if (!Lookup(kBrokerOpNames, op, &r.op)) return UnknownOp(op);
  std::vector<std::string_view> required;
  if (r.op == BrokerOp::kJob) {
    static constexpr std::string_view kOne[] = {"module", "entry", "image", "grid",
                                                "block",  "shared", "args"};
    static constexpr std::string_view kSeveral[] = {"modules", "buffers", "launches", "graph"};
    GPUQ_RETURN_IF_ERROR(CheckLaunchForm(oh.get(), "job", kOne, kSeveral));
    if (HasKey(oh.get(), "launches")) {
      required = {"id", "attempt", "modules", "buffers", "launches"};
    } else {
      required = {"id", "attempt", "module", "entry", "grid", "block", "args"};
    }
  } else if (r.op == BrokerOp::kError) {
    required = {"code", "error"};
  }
  const BrokerOp bop = r.op;
  GPUQ_RETURN_IF_ERROR(ForEachField(oh.get(), "header", required,
                                    [&](std::string_view k, const object& v) -> Status {
    if (k == "op") return Status::Ok();
    if (bop == BrokerOp::kJob) {
      bool launch = false;
      GPUQ_RETURN_IF_ERROR(GetLaunchField(k, v, &r.launch, &launch));
      if (launch) return Status::Ok();
      if (k == "id") return GetU(v, k, &r.id);
      if (k == "attempt") return GetU(v, k, &r.attempt);
      if (k == "module") return GetStr(v, k, 64, &r.module);
      if (k == "entry") return GetStr(v, k, limits.max_name_bytes, &r.entry);
      if (k == "image") return GetEnum(v, k, kImageNames, &r.image);
      if (k == "args") return GetArgs(v, limits, &r.args);
      if (k == "limit_ms") return GetU(v, k, &r.time_limit_ms, kMaxTimeLimitMs);
      if (k == "files") return GetFiles(v, k, limits, true, &r.files);
      if (k == "out_dir") return GetStr(v, k, 4096, &r.out_dir);
      if (k == "modules") {
        const msgpack::object_array* a = nullptr;
        GPUQ_RETURN_IF_ERROR(GetArray(v, k, limits.max_sources, &a));
        r.modules.resize(a->size);
        for (uint32_t i = 0; i < a->size; ++i) {
          const msgpack::object_array* m = nullptr;
          GPUQ_RETURN_IF_ERROR(GetTuple(a->ptr[i], k, 2, "each module as [key, image]", &m));
          GPUQ_RETURN_IF_ERROR(GetStr(m->ptr[0], k, 64, &r.modules[i].key));
          GPUQ_RETURN_IF_ERROR(GetEnum(m->ptr[1], k, kImageNames, &r.modules[i].image));
        }
        return Status::Ok();
      }
      if (k == "buffers") return GetArgs(v, limits, &r.buffers, k, limits.max_job_buffers);
      if (k == "launches") return GetKernelLaunches(v, limits, "module", &r.launches);
      if (k == "graph") return GetBool(v, k, &r.graph);
    } else if (bop == BrokerOp::kError) {
      if (k == "code") return GetCode(v, k, &r.code);
      if (k == "error") return GetStr(v, k, limits.max_text_bytes, &r.error);
    } else if (bop == BrokerOp::kDisconnect) {
      if (k == "error") return GetStr(v, k, limits.max_text_bytes, &r.error);
    }
    return kUnknownField;
  }));
  if (r.op == BrokerOp::kJob && !r.launches.empty()) {
    size_t first = 0;
    for (const ModuleRef& m : r.modules) {
      if (m.key.size() != 64) return Malformed("modules", "each key is 64 hex digits");
      if (m.image != ImageKind::kNone) ++first;
    }
    if (first > payload_sizes.size()) {
      return Error(Code::kMalformed, "module image frames are missing");
    }
    const std::vector<uint64_t> sizes = WithFiles(payload_sizes, r.files);
    GPUQ_RETURN_IF_ERROR(CheckSeveralLaunches(r.buffers, r.launches, r.modules.size(),
                                              "module", sizes, limits));
    GPUQ_RETURN_IF_ERROR(CheckBufferFrames(r.buffers, first, sizes, limits));
  } else if (r.op == BrokerOp::kJob) {
    if (r.module.size() != 64) return Malformed("module", "expected 64 hex digits");
    GPUQ_RETURN_IF_ERROR(CheckLaunch(r.launch));
    const size_t first = r.image == ImageKind::kNone ? 0 : 1;
    if (first > payload_sizes.size()) {
      return Error(Code::kMalformed, "the module image frame is missing");
    }
    GPUQ_RETURN_IF_ERROR(
        CheckBufferFrames(r.args, first, WithFiles(payload_sizes, r.files), limits));
  } else if (!payload_sizes.empty()) {
    return Error(Code::kMalformed, "only job carries payload frames");
  }
  *out = std::move(r);
  return Status::Ok();
}

namespace {

// Which fields each region channel message carries, as for replies.
const ReplyFields& FieldsOf(RegionOp op) {
  static const ReplyFields kFields[] = {
      /*hello*/ {{"protocol"}, {"worker", "token"}},
      /*register*/ {{"rid", "size"}, {"tenant"}},
      /*unregister*/ {{"rid", "region"}, {}},
      /*registered*/ {{"rid", "region", "size"}, {}},
      /*unregistered*/ {{"rid", "region"}, {}},
      /*error*/ {{"rid", "code", "error"}, {}},
      /*region*/ {{"region", "size"}, {}},
      /*drop*/ {{"region"}, {}},
  };
  return kFields[static_cast<size_t>(op)];
}

bool Carries(const ReplyFields& f, std::string_view k) {
  return Listed(f.required, k) || Listed(f.optional, k);
}

}  // namespace

std::string EncodeRegionMessage(const RegionMessage& m) {
  const ReplyFields& f = FieldsOf(m.op);
  auto has = [&](std::string_view k) { return Carries(f, k); };
  StringBuffer buf;
  Packer p(buf);
  MapWriter w(p);
  w.Field("op", true, [&] { PackStr(p, RegionOpName(m.op)); })
      .Field("rid", has("rid"), [&] { p.pack_uint64(m.rid); })
      .Field("protocol", has("protocol"), [&] { PackStr(p, m.protocol); })
      .Field("worker", has("worker") && m.worker, [&] { p.pack_true(); })
      .Field("token", has("token") && !m.token.empty(), [&] { PackStr(p, m.token); })
      .Field("tenant", has("tenant") && !m.tenant.empty(), [&] { PackStr(p, m.tenant); })
      .Field("region", has("region"), [&] { p.pack_uint64(m.region); })
      .Field("size", has("size"), [&] { p.pack_uint64(m.size); })
      .Field("code", has("code"), [&] { PackStr(p, CodeName(m.code)); })
      .Field("error", has("error"), [&] { PackStr(p, m.error); });
  w.Write();
  return Take(buf);
}

Status DecodeRegionMessage(std::string_view bytes, const Limits& limits, RegionMessage* out) {
  if (bytes.size() > kMaxRegionMessageBytes) return TooLarge("region message", kMaxRegionMessageBytes);
  Unpacked oh;
  GPUQ_RETURN_IF_ERROR(Unpack(bytes, limits, &oh));
  if (oh.get().type != mt::MAP) return Malformed("region message", "expected a map");
  std::string_view op;
  GPUQ_RETURN_IF_ERROR(GetOp(oh.get(), &op));
  RegionMessage r;
  if (!Lookup(kRegionOpNames, op, &r.op)) return UnknownOp(op);
  const ReplyFields& f = FieldsOf(r.op);
  bool has_code = false;
  GPUQ_RETURN_IF_ERROR(ForEachField(oh.get(), "region message", f.required,
                                    [&](std::string_view k, const object& v) -> Status {
    if (k == "op") return Status::Ok();
    if (!Carries(f, k)) return kUnknownField;
    if (k == "rid") return GetU(v, k, &r.rid);
    if (k == "protocol") return GetStr(v, k, 16, &r.protocol);
    if (k == "worker") return GetBool(v, k, &r.worker);
    if (k == "token") return GetStr(v, k, 64, &r.token);
    if (k == "tenant") return GetStr(v, k, limits.max_tenant_bytes, &r.tenant);
    if (k == "region") return GetU(v, k, &r.region);
    if (k == "size") return GetU(v, k, &r.size);
    if (k == "code") {
      has_code = true;
      return GetCode(v, k, &r.code);
    }
    if (k == "error") return GetStr(v, k, kMaxRegionMessageBytes, &r.error);
    return kUnknownField;
  }));
  if (has_code && r.code == Code::kOk) return Malformed("code", "'ok' is not a failure code");
  *out = std::move(r);
  return Status::Ok();
}

// ---------------------------------------------------------------- sessions

namespace {

const ReplyFields& FieldsOf(SessionOp op) {
  static const ReplyFields kFields[] = {
      /*hello*/ {{"protocol", "session", "token"}, {"ring"}},
      /*alloc*/ {{"rid", "size"}, {}},
      /*free*/ {{"rid", "buffer"}, {}},
      /*write*/ {{"rid", "buffer", "offset"}, {"data", "region", "region_offset", "size"}},
      /*read*/ {{"rid", "buffer", "offset", "size"}, {"region", "region_offset"}},
      /*copy*/ {{"rid", "buffer", "offset", "src", "src_offset", "size"}, {}},
      /*fill*/ {{"rid", "buffer", "offset", "size", "value"}, {}},
      /*launch*/
      {{"rid", "grid", "block", "args"},
       {"src", "entry", "kernel", "expr", "opts", "headers", "shared", "untimed", "inputs"}},
      /*close*/ {{"rid"}, {}},
      /*done*/
      {{"rid"}, {"buffer", "data", "kernel_ns", "kernel", "ring", "region", "outputs"}},
      /*error*/ {{"rid", "code", "error"}, {}},
      /*open*/ {{"session", "token", "memory", "idle_ms"}, {"limit_ms"}},
      /*end*/ {{"session"}, {}},
      /*module*/ {{"rid"}, {"image", "kind", "symbol", "code", "error"}},
      /*opened*/ {{"session"}, {"code", "error"}},
      /*ended*/ {{"session", "error"}, {"code"}},
      /*compile*/ {{"rid", "src", "entry"}, {"expr", "opts", "headers"}},
      /*usage*/ {{"session", "size"}, {}},
      /*attach*/ {{"protocol", "session", "token", "size"}, {}},
      /*detach*/ {{"rid", "region"}, {}},
  };
  return kFields[static_cast<size_t>(op)];
}

void PackBin(Packer& p, std::string_view b) {
  p.pack_bin(static_cast<uint32_t>(b.size()));
  p.pack_bin_body(b.data(), static_cast<uint32_t>(b.size()));
}

Status GetBin(const object& o, std::string_view field, size_t max, std::string* out) {
  if (o.type != mt::BIN) return Malformed(field, "expected bytes (bin)");
  if (o.via.bin.size > max) return TooLarge(field, max);
  out->assign(o.via.bin.ptr, o.via.bin.size);
  return Status::Ok();
}

// At most `count` byte strings of `max` bytes in all.
Status GetBins(const object& o, std::string_view field, size_t count, size_t max,
               std::vector<std::string>* out) {
  const msgpack::object_array* a = nullptr;
  GPUQ_RETURN_IF_ERROR(GetArray(o, field, count, &a));
  out->resize(a->size);
  size_t left = max;
  for (uint32_t i = 0; i < a->size; ++i) {
    GPUQ_RETURN_IF_ERROR(GetBin(a->ptr[i], field, left, &(*out)[i]));
    left -= (*out)[i].size();
  }
  return Status::Ok();
}

void PackBins(Packer& p, const std::vector<std::string>& bins) {
  p.pack_array(static_cast<uint32_t>(bins.size()));
  for (const std::string& b : bins) PackBin(p, b);
}

}  // namespace

namespace {

// `framed`: the frame's 4-byte length first (PROTOCOL.md, "Sessions"),
// written in place rather than by copying the message behind it.
// A session message's bytes; `framed`: with the 4 bytes the encoder left at
// the front set to the message's length (little-endian), as on the channel.
std::string Framed(StringBuffer& buf, bool framed) {
  if (framed) {
    const uint32_t n = static_cast<uint32_t>(buf.bytes.size() - 4);
    for (int i = 0; i < 4; ++i) buf.bytes[i] = static_cast<char>(n >> (8 * i));
  }
  return Take(buf);
}

// A launch that names its kernel by handle, the message a session's client
// sends most: the fields a launch carries, without asking of each of the
// others whether a launch carries it.
std::string EncodeLaunchByHandle(const SessionMessage& m, bool framed) {
  StringBuffer buf;
  if (framed) buf.bytes.assign(4, '\0');
  Packer p(buf);
  MapWriter w(p);
  w.Field("op", true, [&] { PackStr(p, "launch"); })
      .Field("rid", true, [&] { p.pack_uint64(m.rid); })
      .Field("kernel", true, [&] { p.pack_uint32(m.kernel_ref); });
  PackLaunchFields(w, p, m.launch);
  w.Field("args", true, [&] { PackArgs(p, m.args); })
      .Field("untimed", m.untimed, [&] { p.pack_true(); });
  w.Write();
  return Framed(buf, framed);
}

// The answer of a request that carries nothing back but its rid (and a
// launch's time and kernel handle): what a session sends most.
std::string EncodePlainDone(const SessionMessage& m, bool framed) {
  StringBuffer buf;
  if (framed) buf.bytes.assign(4, '\0');
  Packer p(buf);
  MapWriter w(p);
  w.Field("op", true, [&] { PackStr(p, "done"); })
      .Field("rid", true, [&] { p.pack_uint64(m.rid); })
      .Field("kernel_ns", m.kernel_ns != 0, [&] { p.pack_uint64(m.kernel_ns); })
      .Field("kernel", m.kernel_ref != 0, [&] { p.pack_uint32(m.kernel_ref); });
  w.Write();
  return Framed(buf, framed);
}

std::string EncodeSession(const SessionMessage& m, bool framed, bool fast = true) {
  if (fast && m.op == SessionOp::kLaunch && m.kernel_ref != 0 && m.inputs.empty()) {
    return EncodeLaunchByHandle(m, framed);
  }
  if (fast && m.op == SessionOp::kDone && m.buffer == 0 && m.data.empty() && m.ring == 0 &&
      m.region == 0 && m.outputs.empty()) {
    return EncodePlainDone(m, framed);
  }
  const ReplyFields& f = FieldsOf(m.op);
  auto has = [&](std::string_view k) { return Carries(f, k); };
  const bool failed = m.code != Code::kOk;
  StringBuffer buf;
  buf.bytes.reserve(256 + m.data.size() + m.image.size() + m.kernel.source.size());
  if (framed) buf.bytes.assign(4, '\0');
  Packer p(buf);
  MapWriter w(p);
  w.Field("op", true, [&] { PackStr(p, SessionOpName(m.op)); })
      .Field("rid", has("rid"), [&] { p.pack_uint64(m.rid); })
      .Field("protocol", has("protocol"), [&] { PackStr(p, m.protocol); })
      .Field("session", has("session"), [&] { p.pack_uint64(m.session); })
      .Field("token", has("token"), [&] { PackStr(p, m.token); })
      .Field("buffer", has("buffer") && (m.op != SessionOp::kDone || m.buffer != 0),
             [&] { p.pack_uint32(m.buffer); })
      .Field("offset", has("offset"), [&] { p.pack_uint64(m.offset); })
      .Field("src", m.op == SessionOp::kCopy, [&] { p.pack_uint32(m.src); })
      .Field("src_offset", has("src_offset"), [&] { p.pack_uint64(m.src_offset); })
      .Field("region", has("region") && m.region != 0, [&] { p.pack_uint32(m.region); })
      .Field("region_offset", has("region_offset") && m.region != 0,
             [&] { p.pack_uint64(m.region_offset); })
      .Field("size", has("size") && (m.op != SessionOp::kWrite || m.region != 0),
             [&] { p.pack_uint64(m.size); })
      .Field("value", has("value"), [&] { p.pack_uint32(m.value); })
      .Field("data",
             has("data") && (m.op != SessionOp::kDone || !m.data.empty()) &&
                 (m.op != SessionOp::kWrite || m.region == 0),
             [&] { PackBin(p, m.data); })
      .Field("kernel_ns", has("kernel_ns") && m.kernel_ns != 0,
             [&] { p.pack_uint64(m.kernel_ns); })
      .Field("ring", has("ring") && m.ring != 0, [&] { p.pack_uint64(m.ring); })
      .Field("memory", has("memory"), [&] { p.pack_uint64(m.memory); })
      .Field("idle_ms", has("idle_ms"), [&] { p.pack_uint64(m.idle_ms); })
      .Field("limit_ms", has("limit_ms") && m.limit_ms != 0, [&] { p.pack_uint64(m.limit_ms); });
  w.Field("kernel", (m.op == SessionOp::kLaunch || m.op == SessionOp::kDone) && m.kernel_ref != 0,
          [&] { p.pack_uint32(m.kernel_ref); });
  if (m.op == SessionOp::kCompile || (m.op == SessionOp::kLaunch && m.kernel_ref == 0)) {
    w.Field("src", true, [&] { PackStr(p, m.kernel.source); })
        .Field("entry", true, [&] { PackStr(p, m.kernel.entry); })
        .Field("expr", m.kernel.name_expression, [&] { p.pack_true(); });
    PackSourceExtras(w, p, m.kernel);
  }
  if (m.op == SessionOp::kLaunch) {
    PackLaunchFields(w, p, m.launch);
    w.Field("args", true, [&] { PackArgs(p, m.args); })
        .Field("untimed", m.untimed, [&] { p.pack_true(); })
        .Field("inputs", !m.inputs.empty(), [&] { PackBins(p, m.inputs); });
  }
  w.Field("outputs", m.op == SessionOp::kDone && !m.outputs.empty(),
          [&] { PackBins(p, m.outputs); });
  w.Field("image", has("image") && !failed, [&] { PackBin(p, m.image); })
      .Field("kind", has("kind") && !failed,
             [&] { PackStr(p, kImageNames[static_cast<size_t>(m.image_kind)]); })
      .Field("symbol", has("symbol") && !failed, [&] { PackStr(p, m.symbol); })
      .Field("code", has("code") && failed, [&] { PackStr(p, CodeName(m.code)); })
      .Field("error", has("error") && (failed || m.op == SessionOp::kEnded),
             [&] { PackStr(p, m.error); });
  w.Write();
  return Framed(buf, framed);
}

}  // namespace

std::string EncodeSessionMessage(const SessionMessage& m) { return EncodeSession(m, false); }
std::string EncodeSessionFrame(const SessionMessage& m) { return EncodeSession(m, true); }
std::string EncodeSessionMessageSlowly(const SessionMessage& m) {
  return EncodeSession(m, false, false);
}

namespace {

Status DecodeSessionFields(const object& o, const Limits& limits, size_t max_data,
                           SessionMessage* out) {
  SessionMessage& r = *out;
  const ReplyFields& f = FieldsOf(r.op);
  const bool kernel = r.op == SessionOp::kLaunch || r.op == SessionOp::kCompile;
  bool has_code = false, has_error = false, has_data = false, has_size = false;
  bool by_source = false;  // a launch with any of src, entry, expr, opts, headers
  GPUQ_RETURN_IF_ERROR(ForEachField(o, "session message", f.required,
                                    [&](std::string_view k, const object& v) -> Status {
    if (k == "op") return Status::Ok();
    if (!Carries(f, k)) return kUnknownField;
    if (kernel) {
      by_source = by_source || k == "src" || k == "entry" || k == "expr" || k == "opts" ||
                  k == "headers";
      bool handled = false;
      GPUQ_RETURN_IF_ERROR(GetLaunchField(k, v, &r.launch, &handled));
      if (handled) return Status::Ok();
      GPUQ_RETURN_IF_ERROR(GetSourceField(k, v, limits, &r.kernel, &handled));
      if (handled) return Status::Ok();
      if (k == "entry") return GetStr(v, k, limits.max_name_bytes, &r.kernel.entry);
      if (k == "expr") return GetBool(v, k, &r.kernel.name_expression);
      if (k == "args") return GetArgs(v, limits, &r.args);
      if (k == "untimed") return GetBool(v, k, &r.untimed);
      if (k == "inputs") return GetBins(v, k, limits.max_args, max_data, &r.inputs);
    }
    if (k == "outputs") return GetBins(v, k, limits.max_args, max_data, &r.outputs);
    if (k == "rid") return GetU(v, k, &r.rid);
    if (k == "protocol") return GetStr(v, k, 16, &r.protocol);
    if (k == "session") return GetU(v, k, &r.session);
    if (k == "token") return GetStr(v, k, 64, &r.token);
    if (k == "buffer") return GetU(v, k, &r.buffer);
    if (k == "offset") return GetU(v, k, &r.offset);
    if (k == "src") return GetU(v, k, &r.src);
    if (k == "src_offset") return GetU(v, k, &r.src_offset);
    if (k == "size") {
      has_size = true;
      return GetU(v, k, &r.size);
    }
    if (k == "value") return GetU(v, k, &r.value, 255);
    if (k == "data") {
      has_data = true;
      return GetBin(v, k, max_data, &r.data);
    }
    if (k == "kernel_ns") return GetU(v, k, &r.kernel_ns);
    if (k == "kernel") return GetU(v, k, &r.kernel_ref);
    if (k == "region") return GetU(v, k, &r.region);
    if (k == "region_offset") return GetU(v, k, &r.region_offset);
    if (k == "ring") return GetU(v, k, &r.ring);
    if (k == "memory") return GetU(v, k, &r.memory);
    if (k == "idle_ms") return GetU(v, k, &r.idle_ms, kMaxDeadlineMs);
    if (k == "limit_ms") return GetU(v, k, &r.limit_ms, kMaxTimeLimitMs);
    if (k == "image") return GetBin(v, k, max_data, &r.image);
    if (k == "kind") return GetEnum(v, k, kImageNames, &r.image_kind);
    if (k == "symbol") return GetStr(v, k, Limits::kMaxLoweredNameBytes, &r.symbol);
    if (k == "code") {
      has_code = true;
      return GetCode(v, k, &r.code);
    }
    if (k == "error") {
      has_error = true;
      return GetStr(v, k, limits.max_text_bytes, &r.error);
    }
    return kUnknownField;
  }));
  if (r.op == SessionOp::kEnded) {
    if (has_code && r.code == Code::kOk) return Malformed("code", "'ok' is not a failure code");
  } else {
    GPUQ_RETURN_IF_ERROR(CheckFailure(has_code, has_error, r.code));
  }
  if (r.op == SessionOp::kLaunch) {
    if (r.kernel_ref != 0) {
      // A kernel named by the handle an earlier launch's answer gave:
      // nothing of its source comes with it.
      // Present at all, even empty or false (PROTOCOL.md, "Sessions").
      if (by_source) {
        return Malformed("kernel", "a launch names its kernel by handle or by source, not both");
      }
    } else {
      if (r.kernel.source.empty()) return Malformed("src", "required (or a kernel handle)");
      size_t total = 0;
      GPUQ_RETURN_IF_ERROR(CheckSource(r.kernel, &total));
      if (total > limits.max_total_source_bytes) {
        return TooLarge("source and headers", limits.max_total_source_bytes);
      }
      if (r.kernel.entry.empty()) return Error(Code::kInvalid, "kernel entry is empty");
    }
    GPUQ_RETURN_IF_ERROR(CheckLaunch(r.launch));
    GPUQ_RETURN_IF_ERROR(CheckShared(r.launch));
    // Scalars, the session's buffers, and buffers of the launch's own:
    // each of `inputs` named by exactly one in or inout argument.
    std::vector<bool> named(r.inputs.size(), false);
    for (size_t i = 0; i < r.args.size(); ++i) {
      const Arg& a = r.args[i];
      const std::string which = "argument " + std::to_string(i);
      if (a.region != 0) {
        return Error(Code::kInvalid, which + ": a session's launch names no region range (a "
                                             "write or a read does)");
      }
      if (a.kind != ArgKind::kIn && a.kind != ArgKind::kInOut) continue;
      if (a.frame >= r.inputs.size()) {
        return Error(Code::kInvalid, which + ": input " + std::to_string(a.frame) +
                                         " is not among the launch's " +
                                         std::to_string(r.inputs.size()) + " inputs");
      }
      if (named[a.frame]) {
        return Error(Code::kInvalid, which + ": input " + std::to_string(a.frame) +
                                         " is named twice");
      }
      named[a.frame] = true;
    }
    for (size_t f = 0; f < named.size(); ++f) {
      if (!named[f]) {
        return Error(Code::kInvalid, "input " + std::to_string(f) + " is named by no argument");
      }
    }
  }
  if (r.op == SessionOp::kWrite) {
    // Bytes in the message, or a range of an attached region: one of them.
    if (r.region != 0 ? has_data || !has_size : !has_data || has_size) {
      return Malformed("data", "a write carries data, or region and size, not both");
    }
  }
  if (r.op == SessionOp::kDetach && r.region == 0) {
    return Error(Code::kInvalid, "region 0 names no region");
  }
  if ((r.op == SessionOp::kWrite || r.op == SessionOp::kRead) && r.region == 0 &&
      r.region_offset != 0) {
    return Malformed("region_offset", "needs a region");
  }
  if (r.op == SessionOp::kModule && !has_code && r.image.empty()) {
    return Malformed("image", "required unless the module failed");
  }
  if ((r.op == SessionOp::kHello || r.op == SessionOp::kAttach) &&
      r.protocol != kSessionProtocol) {
    return CheckProtocolFrame(r.protocol, kSessionProtocol);
  }
  return Status::Ok();
}

// The launch that a session's client sends most: a kernel named by its
// handle, read straight from the bytes with no msgpack object tree. It takes
// only a message the general decoder would take, and gives the same
// SessionMessage; anything else it leaves to the general decoder (false),
// which then gives the answer, error or not.
class FastReader {
 public:
  explicit FastReader(std::string_view b)
      : p_(reinterpret_cast<const uint8_t*>(b.data())), end_(p_ + b.size()) {}
  bool done() const { return p_ == end_; }

  // A map's or an array's size.
  bool Map(uint32_t* n) { return Container(0x80, 0xde, n); }
  bool Array(uint32_t* n) { return Container(0x90, 0xdc, n); }

  bool Str(std::string_view* s) {
    if (p_ == end_) return false;
    const uint8_t t = *p_++;
    uint64_t n = 0;
    if ((t & 0xe0) == 0xa0) {
      n = t & 0x1f;
    } else if (t == 0xd9 || t == 0xda || t == 0xdb) {
      if (!Big(t == 0xd9 ? 1 : t == 0xda ? 2 : 4, &n)) return false;
    } else {
      return false;
    }
    if (static_cast<uint64_t>(end_ - p_) < n) return false;
    *s = std::string_view(reinterpret_cast<const char*>(p_), n);
    p_ += n;
    return true;
  }

  bool Bool(bool* b) {
    if (p_ == end_ || (*p_ != 0xc2 && *p_ != 0xc3)) return false;
    *b = *p_++ == 0xc3;
    return true;
  }

  // A number, of the kind msgpack-cxx would make of it.
  bool Number(NumKind* kind, uint64_t* u, int64_t* i, double* d) {
    if (p_ == end_) return false;
    const uint8_t t = *p_++;
    if (t <= 0x7f) {
      *kind = NumKind::kPositive;
      *u = t;
      return true;
    }
    if (t >= 0xe0) {
      *kind = NumKind::kNegative;
      *i = static_cast<int8_t>(t);
      return true;
    }
    uint64_t v = 0;
    switch (t) {
      case 0xcc: case 0xcd: case 0xce: case 0xcf:
        if (!Big(size_t{1} << (t - 0xcc), &v)) return false;
        *kind = NumKind::kPositive;
        *u = v;
        return true;
      case 0xd0: case 0xd1: case 0xd2: case 0xd3: {
        const size_t n = size_t{1} << (t - 0xd0);
        if (!Big(n, &v)) return false;
        const int64_t x = n == 8 ? static_cast<int64_t>(v)
                                 : static_cast<int64_t>(v << (64 - 8 * n)) >> (64 - 8 * n);
        if (x >= 0) {
          *kind = NumKind::kPositive;
          *u = static_cast<uint64_t>(x);
        } else {
          *kind = NumKind::kNegative;
          *i = x;
        }
        return true;
      }
      case 0xca:
        if (!Big(4, &v)) return false;
        *kind = NumKind::kFloat;
        *d = std::bit_cast<float>(static_cast<uint32_t>(v));
        return true;
      case 0xcb:
        if (!Big(8, &v)) return false;
        *kind = NumKind::kFloat;
        *d = std::bit_cast<double>(v);
        return true;
      default:
        return false;
    }
  }

  bool Uint(uint64_t max, uint64_t* out) {
    NumKind kind;
    uint64_t u = 0;
    int64_t i = 0;
    double d = 0;
    if (!Number(&kind, &u, &i, &d) || kind != NumKind::kPositive || u > max)
      return false;
    *out = u;
    return true;
  }
  template <typename T>
  bool U(T* out) {
    uint64_t v = 0;
    if (!Uint(std::numeric_limits<T>::max(), &v)) return false;
    *out = static_cast<T>(v);
    return true;
  }

 private:
  bool Container(uint8_t fix, uint8_t first_long, uint32_t* n) {
    if (p_ == end_) return false;
    const uint8_t t = *p_++;
    if ((t & 0xf0) == fix) {
      *n = t & 0x0f;
      return true;
    }
    uint64_t v = 0;
    if (t != first_long && t != first_long + 1) return false;
    if (!Big(t == first_long ? 2 : 4, &v)) return false;
    *n = static_cast<uint32_t>(v);
    return true;
  }
  bool Big(size_t n, uint64_t* v) {
    if (static_cast<size_t>(end_ - p_) < n) return false;
    uint64_t x = 0;
    for (size_t k = 0; k < n; ++k) x = (x << 8) | p_[k];
    p_ += n;
    *v = x;
    return true;
  }

  const uint8_t* p_;
  const uint8_t* end_;
};

bool FastDim3(FastReader& in, Dim3* d) {
  uint32_t n = 0;
  return in.Array(&n) && n == 3 && in.U(&d->x) && in.U(&d->y) && in.U(&d->z);
}

bool FastArg(FastReader& in, Arg* a) {
  uint32_t n = 0;
  std::string_view t;
  if (!in.Array(&n) || n != 2 || !in.Str(&t)) return false;
  *a = Arg{};
  if (t == "buf") {
    a->kind = ArgKind::kBuffer;
    // A handle, or [handle, offset]: peek at which.
    FastReader peek = in;
    uint32_t pair = 0;
    if (peek.Array(&pair)) {
      if (pair != 2) return false;
      in = peek;
      return in.U(&a->buffer) && in.Uint(UINT64_MAX, &a->offset);
    }
    return in.U(&a->buffer);
  }
  if (!Lookup(kScalarNames, t, &a->type)) return false;
  NumKind kind;
  uint64_t u = 0;
  int64_t i = 0;
  double d = 0;
  return in.Number(&kind, &u, &i, &d) &&
         ScalarBits(a->type, kind, u, i, d, &a->bits).ok();
}

bool DecodeLaunchByHandle(std::string_view bytes, const Limits& limits, SessionMessage* out) {
  FastReader in(bytes);
  uint32_t fields = 0;
  if (!in.Map(&fields) || fields > 8) return false;
  uint64_t rid = 0;
  uint32_t kernel = 0;
  LaunchSpec launch;
  bool untimed = false;
  // Decoded here, so that a message it leaves to the general decoder finds
  // `out` as it was; the two vectors' capacity is reused, turn by turn.
  thread_local std::vector<Arg> spare;
  std::vector<Arg>& args = spare;
  args.clear();
  // One bit per field seen: op, rid, kernel, grid, block, shared, args, untimed.
  unsigned seen = 0;
  auto once = [&seen](unsigned bit) {
    if (seen & bit) return false;
    seen |= bit;
    return true;
  };
  bool ok = true;
  for (uint32_t f = 0; ok && f < fields; ++f) {
    std::string_view k;
    if (!in.Str(&k)) {
      ok = false;
      break;
    }
    if (k == "op") {
      std::string_view op;
      ok = once(1) && in.Str(&op) && op == "launch";
    } else if (k == "rid") {
      ok = once(2) && in.Uint(UINT64_MAX, &rid);
    } else if (k == "kernel") {
      ok = once(4) && in.U(&kernel) && kernel != 0;
    } else if (k == "grid") {
      ok = once(8) && FastDim3(in, &launch.grid);
    } else if (k == "block") {
      ok = once(16) && FastDim3(in, &launch.block);
    } else if (k == "shared") {
      ok = once(32) && in.U(&launch.shared_bytes);
    } else if (k == "args") {
      uint32_t n = 0;
      ok = once(64) && in.Array(&n) && n <= limits.max_args;
      if (ok) args.resize(n);
      for (uint32_t a = 0; ok && a < n; ++a) ok = FastArg(in, &args[a]);
    } else if (k == "untimed") {
      ok = once(128) && in.Bool(&untimed);
    } else {
      ok = false;
    }
  }
  // op, rid, kernel, grid, block and args are needed; nothing may follow.
  if (!ok || (seen & 0x5f) != 0x5f || !in.done() || !CheckLaunch(launch).ok() ||
      !CheckShared(launch).ok()) {
    return false;
  }
  std::vector<Arg> previous = std::move(out->args);
  *out = SessionMessage{};
  out->op = SessionOp::kLaunch;
  out->rid = rid;
  out->kernel_ref = kernel;
  out->launch = launch;
  out->untimed = untimed;
  out->args.swap(args);
  spare = std::move(previous);
  return true;
}

}  // namespace


Status DecodeSessionMessage(std::string_view bytes, const Limits& limits, size_t max_data,
                            SessionMessage* out) {
  if (bytes.size() <= limits.max_header_bytes && DecodeLaunchByHandle(bytes, limits, out)) {
    return Status::Ok();
  }
  return DecodeSessionMessageSlowly(bytes, limits, max_data, out);
}

Status DecodeSessionMessageSlowly(std::string_view bytes, const Limits& limits,
                                  size_t max_data, SessionMessage* out) {
  Unpacked oh;
  Limits big = limits;
  big.max_header_bytes = std::max<size_t>(limits.max_header_bytes, max_data + (1u << 20));
  GPUQ_RETURN_IF_ERROR(Unpack(bytes, big, &oh, std::max<size_t>(max_data, 1)));
  if (oh.get().type != mt::MAP) return Malformed("session message", "expected a map");
  std::string_view op;
  GPUQ_RETURN_IF_ERROR(GetOp(oh.get(), &op));
  SessionMessage r;
  if (!Lookup(kSessionOpNames, op, &r.op)) return UnknownOp(op);
  Status s = DecodeSessionFields(oh.get(), limits, max_data, &r);
  if (!s.ok()) {
    // The request's rid, where it could be read: the error answers it.
    out->rid = r.rid;
    out->op = r.op;
    return s;
  }
  *out = std::move(r);
  return Status::Ok();
}

}  // namespace gpuq::schema
