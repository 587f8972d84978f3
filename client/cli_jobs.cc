// gpuq submit, status, result, cancel, stats, regions, session, devices, usage: talk to a
// broker.
#include <poll.h>
#include <termios.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cctype>
#include <climits>
#include <ctime>
#include <map>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <tuple>

#include "client/cli.h"
#include "gpuq/client.h"
#include "util/curve_keys.h"

namespace gpuq::cli {
namespace {

using nlohmann::json;
using schema::Arg;
using schema::ScalarType;

struct Common {
  std::string broker;
  bool json = false;
  uint64_t timeout_ms = 10000;
  std::string server_key, key;  // CURVE: broker's public key file, our secret key file
};

int Fail(const Common& c, const Status& s) { return cli::Fail(c.json, s); }

StatusOr<std::unique_ptr<Client>> Connect(const Common& c) {
  ClientOptions o;
  o.timeout = Millis(c.timeout_ms);
  std::string server_key = c.server_key, key = c.key;
  if (server_key.empty() && getenv("GPUQ_SERVER_KEY")) server_key = getenv("GPUQ_SERVER_KEY");
  if (key.empty() && getenv("GPUQ_KEY")) key = getenv("GPUQ_KEY");
  if (!server_key.empty() || !key.empty()) {
    if (server_key.empty() || key.empty()) {
      return Error(Code::kInvalid, "CURVE needs both --server-key and --client-key");
    }
    GPUQ_ASSIGN_OR_RETURN(o.server_key, ReadCurvePublicKey(server_key));
    GPUQ_ASSIGN_OR_RETURN(CurveKeyPair mine, ReadCurveSecretKey(key));
    o.public_key = mine.public_key;
    o.secret_key = mine.secret_key;
  }
  return Client::Connect(c.broker.empty() ? DefaultEndpoint() : c.broker, o);
}

// The broker's stats map, as JSON.
StatusOr<json> FetchStats(const Common& c) {
  GPUQ_ASSIGN_OR_RETURN(std::unique_ptr<Client> client, Connect(c));
  GPUQ_ASSIGN_OR_RETURN(std::string stats, client->Stats());
  json j = json::from_msgpack(stats, true, false);
  if (j.is_discarded()) return Error(Code::kMalformed, "bad stats");
  return j;
}

json TimingJson(const schema::Timing& t) {
  json j = {{"queue_us", t.queue_us},   {"compile_us", t.compile_us}, {"load_us", t.load_us},
            {"h2d_us", t.h2d_us},       {"kernel_us", t.kernel_us},   {"d2h_us", t.d2h_us},
            {"total_us", t.total_us},   {"cache_hit", t.cache_hit}};
  // A job of several launches: each launch's time, in order.
  if (!t.launch_us.empty()) j["launch_us"] = t.launch_us;
  return j;
}

json ResultJson(const JobResult& r) {
  json j = {{"id", r.id},
            {"state", schema::JobStateName(r.state)},
            {"attempts", r.attempts},
            {"device", r.device}};
  if (r.code != Code::kOk) {
    j["code"] = CodeName(r.code);
    j["error"] = r.error;
  }
  if (schema::IsTerminal(r.state)) j["timing"] = TimingJson(r.timing);
  json outs = json::array();
  for (size_t i = 0; i < r.outputs.size(); ++i) {
    outs.push_back({{"arg", r.output_args[i]}, {"bytes", r.outputs[i].size()}});
  }
  if (!outs.empty()) j["outputs"] = outs;
  return j;
}

void PrintResult(const JobResult& r) {
  std::printf("job %llu: %s", (unsigned long long)r.id,
              std::string(schema::JobStateName(r.state)).c_str());
  if (r.code != Code::kOk) std::printf(" (%s)", std::string(CodeName(r.code)).c_str());
  std::printf(", %u attempt(s)%s%s\n", r.attempts, r.device.empty() ? "" : " on ",
              r.device.c_str());
  if (schema::IsTerminal(r.state)) {
    const auto& t = r.timing;
    std::printf("  queue %llu us, compile %llu us%s, load %llu us, h2d %llu us, kernel %llu us, "
                "d2h %llu us, total %llu us\n",
                (unsigned long long)t.queue_us, (unsigned long long)t.compile_us,
                t.cache_hit ? " (cache hit)" : "", (unsigned long long)t.load_us,
                (unsigned long long)t.h2d_us, (unsigned long long)t.kernel_us,
                (unsigned long long)t.d2h_us, (unsigned long long)t.total_us);
    if (!t.launch_us.empty()) {
      std::printf("  launches:");
      for (size_t i = 0; i < t.launch_us.size(); ++i) {
        std::printf("%s %llu us", i ? "," : "", (unsigned long long)t.launch_us[i]);
      }
      std::printf("\n");
    }
  }
  if (!r.error.empty()) std::printf("%s\n", r.error.c_str());
}

// Writes out buffers to PREFIX.argN.bin (N: the argument's index, or in a
// job of several launches the buffer's).
Status WriteOutputs(const JobResult& r, const std::string& prefix) {
  for (size_t i = 0; i < r.outputs.size(); ++i) {
    std::string path = prefix + ".arg" + std::to_string(r.output_args[i]) + ".bin";
    std::ofstream out(path, std::ios::binary);
    out.write(r.outputs[i].data(), static_cast<std::streamsize>(r.outputs[i].size()));
    if (!out) return Error(Code::kIoError, "cannot write " + path);
  }
  return Status::Ok();
}

// Digits only, at least one.
bool IsNumber(const std::string& s) {
  return !s.empty() && s.find_first_not_of("0123456789") == std::string::npos;
}

bool ParseDim3(const std::string& s, schema::Dim3* d) {
  uint32_t v[3] = {1, 1, 1};
  std::stringstream ss(s);
  std::string part;
  int n = 0;
  while (std::getline(ss, part, ',')) {
    // Digits only, and at most 2^32 - 1 (stoul takes "-1" and wider values,
    // which a cast would have wrapped).
    if (n == 3 || !IsNumber(part) || part.size() > 10) return false;
    const unsigned long long x = std::stoull(part);
    if (x > UINT32_MAX) return false;
    v[n++] = static_cast<uint32_t>(x);
  }
  *d = {v[0], v[1], v[2]};
  return n > 0;
}

// TYPE:VALUE, e.g. f32:2.5, i64:-3, u8:255.
StatusOr<Arg> ParseScalar(const std::string& s) {
  auto colon = s.find(':');
  if (colon == std::string::npos) return Error(Code::kInvalid, "--arg is TYPE:VALUE: " + s);
  const std::string type = s.substr(0, colon), value = s.substr(colon + 1);
  static const std::pair<const char*, ScalarType> kTypes[] = {
      {"u8", ScalarType::kU8},   {"i8", ScalarType::kI8},   {"u16", ScalarType::kU16},
      {"i16", ScalarType::kI16}, {"u32", ScalarType::kU32}, {"i32", ScalarType::kI32},
      {"u64", ScalarType::kU64}, {"i64", ScalarType::kI64}, {"f32", ScalarType::kF32},
      {"f64", ScalarType::kF64}};
  // The whole value, nothing around it: sto*() stop at the first character
  // they cannot take ("2.5x" was 2.5) and skip leading spaces.
  auto whole = [&value](auto parse) {
    size_t used = 0;
    if (value.empty() || std::isspace(static_cast<unsigned char>(value[0]))) {
      throw std::invalid_argument(value);
    }
    auto v = parse(value, &used);
    if (used != value.size()) throw std::invalid_argument(value);
    return v;
  };
  for (auto [name, t] : kTypes) {
    if (type != name) continue;
    try {
      if (t == ScalarType::kF32) {
        return Arg::F32(whole([](const std::string& v, size_t* n) { return std::stof(v, n); }));
      }
      if (t == ScalarType::kF64) {
        return Arg::F64(whole([](const std::string& v, size_t* n) { return std::stod(v, n); }));
      }
      const size_t bytes = schema::ScalarSize(t);
      const bool is_signed = name[0] == 'i';
      if (is_signed) {
        long long v = whole([](const std::string& v, size_t* n) { return std::stoll(v, n); });
        const long long lo = bytes == 8 ? LLONG_MIN : -(1LL << (8 * bytes - 1));
        const long long hi = bytes == 8 ? LLONG_MAX : (1LL << (8 * bytes - 1)) - 1;
        if (v < lo || v > hi) throw std::out_of_range(value);
        return Arg::Scalar(t, static_cast<uint64_t>(v) &
                                  (bytes == 8 ? ~0ull : (1ull << (8 * bytes)) - 1));
      }
      if (!value.empty() && value[0] == '-') throw std::out_of_range(value);
      unsigned long long v =
          whole([](const std::string& v, size_t* n) { return std::stoull(v, n); });
      if (bytes < 8 && v >= (1ull << (8 * bytes))) throw std::out_of_range(value);
      return Arg::Scalar(t, v);
    } catch (const std::exception&) {
      return Error(Code::kInvalid, "bad value for " + type + ": " + value);
    }
  }
  return Error(Code::kInvalid, "unknown argument type '" + type + "'");
}

// A launch of a job of several launches: [SOURCE/]ENTRY:GRID:BLOCK[:SHARED],
// GRID and BLOCK as X[,Y[,Z]]. The fields are taken from the right, so that
// an entry may hold colons ("ns::scale<float>"); a SOURCE/ prefix is digits,
// which no kernel name starts with.
StatusOr<schema::KernelLaunch> ParseLaunch(const std::string& spec, bool name_expression) {
  const Status usage = Error(Code::kInvalid, "--launch is [SOURCE/]ENTRY:GRID:BLOCK[:SHARED] "
                                             "(GRID, BLOCK: X[,Y[,Z]]), not '" + spec + "'");
  schema::KernelLaunch l;
  l.name_expression = name_expression;
  std::string rest = spec;
  if (const size_t slash = rest.find('/');
      slash != std::string::npos && IsNumber(rest.substr(0, slash))) {
    try {
      // At most 2^32 - 1: a wider one wrapped to another source.
      const unsigned long long source = std::stoull(rest.substr(0, slash));
      if (slash > 10 || source > UINT32_MAX) return usage;
      l.source = static_cast<uint32_t>(source);
    } catch (...) {
      return usage;
    }
    rest = rest.substr(slash + 1);
  }
  std::vector<std::string> parts;
  for (size_t from = 0;;) {
    const size_t colon = rest.find(':', from);
    parts.push_back(rest.substr(from, colon - from));
    if (colon == std::string::npos) break;
    from = colon + 1;
  }
  size_t dims = 0;  // trailing fields of digits and commas: GRID, BLOCK, SHARED
  while (dims < 3 && dims < parts.size() &&
         parts[parts.size() - 1 - dims].find_first_not_of("0123456789,") == std::string::npos &&
         !parts[parts.size() - 1 - dims].empty()) {
    ++dims;
  }
  if (dims < 2 || dims == parts.size()) return usage;
  const size_t n = parts.size() - dims;
  for (size_t i = 0; i < n; ++i) l.entry += (i ? ":" : "") + parts[i];
  if (l.entry.empty()) return usage;
  if (!ParseDim3(parts[n], &l.launch.grid) || !ParseDim3(parts[n + 1], &l.launch.block)) {
    return usage;
  }
  if (dims == 3) {
    if (!IsNumber(parts[n + 2])) return usage;
    try {
      const unsigned long long shared = std::stoull(parts[n + 2]);
      if (shared > UINT32_MAX) return usage;
      l.launch.shared_bytes = static_cast<uint32_t>(shared);
    } catch (...) {
      return usage;
    }
  }
  return l;
}

// A launch's buffer argument: buf:INDEX[:OFFSET].
StatusOr<Arg> ParseBufferArg(const std::string& s) {
  const Status usage = Error(Code::kInvalid, "--arg buf: is buf:INDEX[:OFFSET], not '" + s + "'");
  const std::string rest = s.substr(4);
  const size_t colon = rest.find(':');
  const std::string index = rest.substr(0, colon);
  const std::string offset = colon == std::string::npos ? "0" : rest.substr(colon + 1);
  if (!IsNumber(index) || !IsNumber(offset)) return usage;
  try {
    const unsigned long long i = std::stoull(index);
    if (i > UINT32_MAX) return usage;
    return Arg::Ref(static_cast<uint32_t>(i), std::stoull(offset));
  } catch (...) {
    return usage;
  }
}

StatusOr<std::string> ReadWhole(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return Error(Code::kUnavailable, "cannot read " + path);
  std::stringstream b;
  b << f.rdbuf();
  return b.str();
}

// A buffer of `gpuq submit --region`: bytes [offset, offset + size) of the
// region, argument (or buffer) `index` of the job; an in or inout buffer's
// bytes come from `path`.
struct RegionBuffer {
  uint32_t index = 0;
  schema::ArgKind kind = schema::ArgKind::kIn;
  std::string path;
  uint64_t offset = 0, size = 0;
};

// Where the region's buffers start: each on a page of its own.
constexpr uint64_t kRegionAlign = 4096;

// Reads `b.size` bytes of b.path into `to`: the file's size when it was
// looked at, which it must still have.
Status ReadInto(const RegionBuffer& b, char* to) {
  std::ifstream f(b.path, std::ios::binary);
  if (!f) return Error(Code::kUnavailable, "cannot read " + b.path);
  f.read(to, static_cast<std::streamsize>(b.size));
  const auto got = static_cast<uint64_t>(f.gcount());
  if (got != b.size || f.peek() != std::char_traits<char>::eof()) {
    return Error(Code::kUnavailable, b.path + " changed while it was read (" +
                                         std::to_string(b.size) + " bytes expected)");
  }
  return Status::Ok();
}

// Writes the out and inout buffers of a region to PREFIX.argN.bin, as
// WriteOutputs writes those that came back.
Status WriteRegionOutputs(const Region& region, const std::vector<RegionBuffer>& buffers,
                          const std::string& prefix) {
  for (const RegionBuffer& b : buffers) {
    if (b.kind == schema::ArgKind::kIn) continue;
    const std::string path = prefix + ".arg" + std::to_string(b.index) + ".bin";
    std::ofstream out(path, std::ios::binary);
    out.write(region.data() + b.offset, static_cast<std::streamsize>(b.size));
    if (!out) return Error(Code::kIoError, "cannot write " + path);
  }
  return Status::Ok();
}

struct SubmitArgs : Common {
  std::string file, kernel, expr, tenant, key;
  std::string grid, block;  // "" reads as 1
  uint32_t shared = 0, priority = schema::kDefaultPriority;
  double deadline_s = 0, limit_s = 0;
  bool wait = false, graph = false, region = false;
  std::string output_prefix;
  // In the order given on the command line: each --arg, --in, --out,
  // --inout, --scratch, --launch, --launch-expression, --source and
  // --option, which name what comes before them.
  std::vector<std::pair<std::string, std::string>> ordered;
  // The options of a job of one launch that were given (refused with
  // --launch).
  std::vector<std::string> one_launch_options;
};

int RunSubmit(SubmitArgs& a) {
  // Seconds from 0 to the protocol's bounds (CLI11 takes "nan", "-1" and
  // "1e30", which were cast to milliseconds out of range, undefined).
  for (auto [name, value, most_ms] :
       {std::tuple{"--deadline", a.deadline_s, schema::kMaxDeadlineMs},
        std::tuple{"--limit", a.limit_s, schema::kMaxTimeLimitMs}}) {
    if (!(value >= 0 && value <= most_ms / 1000.0)) {
      return Fail(a, Error(Code::kInvalid, std::string(name) + " is seconds from 0 to " +
                                               std::to_string(most_ms / 1000) + ", not " +
                                               std::to_string(value)));
    }
  }
  JobRequest job;
  schema::JobSpec& s = job.spec;
  auto source = ReadWhole(a.file);
  if (!source.ok()) return Fail(a, source.status());
  s.kernel.source = std::move(*source);
  // A --launch makes a job of several launches (PROTOCOL.md, "Jobs of
  // several launches"): its launches name its entries, dimensions and
  // arguments, and --in, --inout, --out and --scratch declare its buffers.
  const bool several = std::any_of(a.ordered.begin(), a.ordered.end(), [](const auto& o) {
    return o.first == "launch" || o.first == "launch-expression";
  });
  if (several) {
    if (!a.one_launch_options.empty()) {
      return Fail(a, Error(Code::kInvalid,
                           a.one_launch_options.front() + " belongs to a job of one launch: with "
                           "--launch each launch names its entry, grid, block and shared "
                           "memory"));
    }
  } else {
    if (a.kernel.empty() == a.expr.empty()) {
      return Fail(a, Error(Code::kInvalid,
                           "give exactly one of --kernel and --name-expression (or --launch)"));
    }
    s.kernel.entry = a.kernel.empty() ? a.expr : a.kernel;
    s.kernel.name_expression = !a.expr.empty();
    if (!ParseDim3(a.grid.empty() ? "1" : a.grid, &s.launch.grid) ||
        !ParseDim3(a.block.empty() ? "1" : a.block, &s.launch.block)) {
      return Fail(a, Error(Code::kInvalid, "--grid and --block are X[,Y[,Z]]"));
    }
    s.launch.shared_bytes = a.shared;
    if (a.graph) {
      return Fail(a, Error(Code::kInvalid, "--graph belongs to a job of several launches "
                                           "(--launch)"));
    }
  }
  s.tenant = a.tenant;
  s.key = a.key;
  s.priority = a.priority;
  // In range (checked above): the casts are defined.
  s.deadline_ms = static_cast<uint64_t>(a.deadline_s * 1000);
  s.time_limit_ms = static_cast<uint64_t>(a.limit_s * 1000);
  s.graph = a.graph;
  std::vector<Arg>& buffer_list = several ? s.buffers : s.args;
  std::vector<std::string> buffers;  // keeps input bytes alive
  // --region: the in, out and inout buffers of at least one byte live in
  // one region of this process; their arguments are set once it exists.
  std::vector<RegionBuffer> in_region;
  const std::string endpoint = a.broker.empty() ? DefaultEndpoint() : a.broker;
  if (!a.output_prefix.empty() && !a.wait) {
    return Fail(a, Error(Code::kInvalid,
                         "--output needs --wait: the buffers are written once the job ends "
                         "(without waiting, 'gpuq result ID --output PREFIX' writes them)"));
  }
  if (a.region) {
    if (endpoint.rfind("ipc://", 0) != 0) {
      return Fail(a, Error(Code::kInvalid,
                           "--region needs the broker's ipc endpoint: a region is memory "
                           "shared with the workers of the broker's host, and " + endpoint +
                           " is not one"));
    }
    if (!a.wait) {
      return Fail(a, Error(Code::kInvalid,
                           "--region needs --wait: the region is gpuq's own memory, which "
                           "ends when gpuq exits"));
    }
  }
  auto place = [&](schema::ArgKind kind, std::string path, uint64_t size) {
    in_region.push_back({static_cast<uint32_t>(buffer_list.size()), kind, std::move(path), 0,
                         size});
    buffer_list.push_back(Arg::Buffer(kind, 0, size));  // its range, once the region exists
  };
  buffers.reserve(a.ordered.size());
  for (const auto& [kind, value] : a.ordered) {
    if (kind == "launch" || kind == "launch-expression") {
      auto l = ParseLaunch(value, kind == "launch-expression");
      if (!l.ok()) return Fail(a, l.status());
      s.launches.push_back(std::move(*l));
    } else if (kind == "arg") {
      const bool buf = value.rfind("buf:", 0) == 0;
      if (buf && !several) {
        return Fail(a, Error(Code::kInvalid, "--arg " + value + ": buf: arguments belong to a "
                                             "job of several launches (--launch)"));
      }
      if (several && s.launches.empty()) {
        return Fail(a, Error(Code::kInvalid, "--arg " + value + " before any --launch: each "
                                             "launch's arguments follow it"));
      }
      auto arg = buf ? ParseBufferArg(value) : ParseScalar(value);
      if (!arg.ok()) return Fail(a, arg.status());
      (several ? s.launches.back().args : s.args).push_back(*arg);
    } else if (kind == "out" || kind == "scratch") {
      if (kind == "scratch" && !several) {
        return Fail(a, Error(Code::kInvalid, "--scratch belongs to a job of several launches "
                                             "(--launch)"));
      }
      if (!IsNumber(value)) {
        return Fail(a, Error(Code::kInvalid, "--" + kind + " takes a size in bytes"));
      }
      try {
        const uint64_t size = std::stoull(value);
        if (kind == "out" && a.region && size > 0) {
          place(schema::ArgKind::kOut, "", size);
        } else {
          buffer_list.push_back(kind == "out" ? Arg::Out(size) : Arg::Scratch(size));
        }
      } catch (...) {
        return Fail(a, Error(Code::kInvalid, "--" + kind + " takes a size in bytes"));
      }
    } else if (kind == "source") {
      if (!several) {
        return Fail(a, Error(Code::kInvalid, "--source belongs to a job of several launches "
                                             "(--launch)"));
      }
      auto text = ReadWhole(value);
      if (!text.ok()) return Fail(a, text.status());
      s.sources.emplace_back();
      s.sources.back().source = std::move(*text);
    } else if (kind == "option") {
      (s.sources.empty() ? s.kernel : s.sources.back()).options.push_back(value);
    } else {
      const auto buffer_kind = kind == "in" ? schema::ArgKind::kIn : schema::ArgKind::kInOut;
      if (a.region) {
        // The region is sized before any file is read: only files whose
        // size is known.
        std::error_code ec;
        const bool regular = std::filesystem::is_regular_file(value, ec);
        const uint64_t size = regular ? std::filesystem::file_size(value, ec) : 0;
        if (ec || !regular) {
          return Fail(a, Error(Code::kUnavailable,
                               "--region: cannot read " + value + ": " +
                                   (ec ? ec.message() : "not a regular file")));
        }
        if (size > 0) {
          place(buffer_kind, value, size);
          continue;
        }
      }
      auto bytes = ReadWhole(value);
      if (!bytes.ok()) return Fail(a, bytes.status());
      buffers.push_back(std::move(*bytes));
      const auto frame = static_cast<uint32_t>(buffers.size() - 1);
      buffer_list.push_back(kind == "in" ? Arg::In(frame) : Arg::InOut(frame));
    }
  }
  for (const auto& b : buffers) job.inputs.push_back(b);
  auto client = Connect(a);
  if (!client.ok()) return Fail(a, client.status());
  std::unique_ptr<Region> region;
  if (!in_region.empty()) {
    uint64_t total = 0;
    for (RegionBuffer& b : in_region) {
      b.offset = (total + kRegionAlign - 1) / kRegionAlign * kRegionAlign;
      total = b.offset + b.size;
    }
    auto r = (*client)->NewRegion(total, a.tenant);
    if (!r.ok()) {
      return Fail(a, Status(r.status().code(), "--region of " + std::to_string(total) +
                                                   " bytes: " + r.status().message()));
    }
    region = std::move(*r);
    for (const RegionBuffer& b : in_region) {
      if (b.kind != schema::ArgKind::kOut) {
        if (Status read = ReadInto(b, region->data() + b.offset); !read.ok()) {
          return Fail(a, read);
        }
      }
      buffer_list[b.index] = Arg::InRegion(b.kind, region->id(), b.offset, b.size);
    }
  }
  auto id = (*client)->Submit(job);
  if (!id.ok()) return Fail(a, id.status());
  if (!a.wait) {
    if (a.json) {
      std::cout << json{{"id", *id}, {"state", "queued"}}.dump(2) << "\n";
    } else {
      std::printf("%llu\n", (unsigned long long)*id);
    }
    return kExitOk;
  }
  auto r = (*client)->Wait(*id, Millis(a.timeout_ms));
  if (!r.ok()) return Fail(a, r.status());
  if (!a.output_prefix.empty()) {
    if (Status w = WriteOutputs(*r, a.output_prefix); !w.ok()) return Fail(a, w);
    // The region's out and inout ranges, once the job wrote them.
    if (region && r->ok()) {
      if (Status w = WriteRegionOutputs(*region, in_region, a.output_prefix); !w.ok()) {
        return Fail(a, w);
      }
    }
  }
  if (a.json) {
    json j = ResultJson(*r);
    if (region) {
      j["region"] = {{"region", region->id()}, {"size", region->size()}};
      if (r->ok()) {
        // The ranges the job wrote are its outputs too, by argument index.
        json outs = j.value("outputs", json::array());
        for (const RegionBuffer& b : in_region) {
          if (b.kind == schema::ArgKind::kIn) continue;
          outs.push_back({{"arg", b.index}, {"bytes", b.size}, {"region", region->id()},
                          {"offset", b.offset}});
        }
        std::sort(outs.begin(), outs.end(), [](const json& x, const json& y) {
          return x["arg"].get<uint64_t>() < y["arg"].get<uint64_t>();
        });
        if (!outs.empty()) j["outputs"] = outs;
      }
    }
    std::cout << j.dump(2) << "\n";
  } else {
    PrintResult(*r);
    if (region) {
      std::printf("  region %llu: %zu buffer(s) in %llu bytes\n",
                  (unsigned long long)region->id(), in_region.size(),
                  (unsigned long long)region->size());
    }
  }
  return r->ok() ? kExitOk : ExitFor(r->code == Code::kOk ? Code::kInternal : r->code);
}

void AddCommon(CLI::App* s, Common* c) {
  s->add_option("--broker", c->broker, "Broker endpoint (default: $GPUQ_BROKER or local ipc)");
  s->add_option("--timeout-ms", c->timeout_ms, "How long to wait for the broker")
      ->capture_default_str();
  s->add_option("--server-key", c->server_key,
                "CURVE: the broker's public key file (or $GPUQ_SERVER_KEY)");
  s->add_option("--client-key", c->key, "CURVE: this client's secret key file (or $GPUQ_KEY)");
  s->add_flag("--json", c->json, "Print JSON");
}

std::string Fmt(double us) {
  char b[32];
  if (us >= 1e6) {
    std::snprintf(b, sizeof b, "%.2f s", us / 1e6);
  } else if (us >= 1e3) {
    std::snprintf(b, sizeof b, "%.2f ms", us / 1e3);
  } else {
    std::snprintf(b, sizeof b, "%.0f us", us);
  }
  return b;
}

}  // namespace

void PrintStatsText(FILE* f, const json& s);
void PrintStatsText(const json& s) { PrintStatsText(stdout, s); }

void PrintStatsText(FILE* f, const json& s) {
  std::fprintf(f, "queued %llu, in flight %llu, compiling %llu; submitted %llu, rejected %llu, "
              "requeued %llu; up %.0f s\n",
              s.value("queued", 0ull), s.value("inflight", 0ull), s.value("compiling", 0ull),
              s.value("submitted", 0ull), s.value("rejected", 0ull), s.value("requeued", 0ull),
              s.value("uptime_s", 0.0));
  if (s.contains("queued_by_priority") && !s["queued_by_priority"].empty()) {
    std::fprintf(f, "queued by priority:");
    for (auto& [k, v] : s["queued_by_priority"].items()) std::fprintf(f, " %s=%s", k.c_str(), v.dump().c_str());
    std::fprintf(f, "\n");
  }
  if (s.contains("queued_by_tenant") && !s["queued_by_tenant"].empty()) {
    std::fprintf(f, "queued by tenant:");
    for (auto& [k, v] : s["queued_by_tenant"].items()) std::fprintf(f, " %s=%s", k.c_str(), v.dump().c_str());
    std::fprintf(f, "\n");
  }
  if (s.contains("finished")) {
    std::fprintf(f, "finished:");
    for (auto& [k, v] : s["finished"].items()) std::fprintf(f, " %s=%s", k.c_str(), v.dump().c_str());
    std::fprintf(f, "\n");
  }
  if (s.contains("latency_us") && !s["latency_us"].empty()) {
    std::fprintf(f, "%-8s %10s %10s %10s %8s\n", "phase", "p50", "p90", "p99", "count");
    for (auto& [phase, h] : s["latency_us"].items()) {
      std::fprintf(f, "%-8s %10s %10s %10s %8llu\n", phase.c_str(), Fmt(h.value("p50", 0.0)).c_str(),
                  Fmt(h.value("p90", 0.0)).c_str(), Fmt(h.value("p99", 0.0)).c_str(),
                  h.value("count", 0ull));
    }
  }
  if (s.contains("cache")) {
    const json& c = s["cache"];
    std::fprintf(f, "kernel cache: %llu hits, %llu misses, %llu entries, %.1f KiB\n",
                c.value("hits", 0ull), c.value("misses", 0ull), c.value("entries", 0ull),
                c.value("bytes", 0ull) / 1024.0);
  }
  const json regions = s.value("regions", json::array());
  if (!regions.empty()) {
    uint64_t bytes = 0, ended = 0;
    for (const auto& r : regions) {
      bytes += r.value("size", 0ull);
      ended += r.value("ended", false) ? 1 : 0;
    }
    std::fprintf(f, "regions: %zu of %llu bytes, %llu ended (gpuq regions lists them)\n",
                 regions.size(), static_cast<unsigned long long>(bytes),
                 static_cast<unsigned long long>(ended));
  }
  const json sessions = s.value("sessions", json::array());
  if (!sessions.empty()) {
    uint64_t held = 0;
    for (const auto& x : sessions) held += x.value("held", 0ull);
    std::fprintf(f, "sessions: %zu open, holding %llu bytes of device memory (gpuq session ls)\n",
                 sessions.size(), static_cast<unsigned long long>(held));
  }
  const json workers = s.value("workers", json::array());
  if (workers.empty()) {
    std::fprintf(f, "workers: none attached\n");
  } else {
    std::fprintf(f, "%-28s %-26s %6s %9s %10s  %s\n", "worker", "device", "slots", "inflight",
                "heartbeat", "GPU health");
    for (const auto& w : workers) {
      std::string health = "-";
      if (w.contains("health")) {
        const json& h = w["health"];
        char buf[128];
        std::snprintf(buf, sizeof buf, "%llu%% busy, %llu C, %.0f W, %.1f GiB used",
                      h.value("util_pct", 0ull), h.value("temp_c", 0ull),
                      h.value("power_mw", 0ull) / 1e3, h.value("mem_used", 0ull) / 1073741824.0);
        health = buf;
      }
      if (w.contains("drained")) health += "; DRAINED: " + w.value("drained", "");
      std::fprintf(f, "%-28s %-26s %6llu %9llu %8llu ms  %s\n", w.value("worker", "").c_str(),
                  w.value("device", "").c_str(), w.value("slots", 0ull),
                  w.value("inflight", 0ull), w.value("heartbeat_age_ms", 0ull), health.c_str());
    }
  }
}

struct TopArgs : Common {
  uint64_t interval_ms = 1000;
  uint64_t iterations = 0;  // 0: until q or Ctrl-C
};

// gpuq top: redraws the stats every interval; q quits. Reads single keys
// from a terminal (raw mode, restored on exit).
int RunTop(const TopArgs& a) {
  auto client = Connect(a);
  if (!client.ok()) return Fail(a, client.status());
  const bool tty = isatty(0);
  termios saved{};
  if (tty) {
    tcgetattr(0, &saved);
    termios raw = saved;
    raw.c_lflag &= static_cast<tcflag_t>(~(ICANON | ECHO));
    tcsetattr(0, TCSANOW, &raw);
  }
  std::map<std::string, uint64_t> last_finished;
  auto last_t = std::chrono::steady_clock::now();
  int rc = kExitOk;
  for (uint64_t i = 0; a.iterations == 0 || i < a.iterations; ++i) {
    auto stats = (*client)->Stats();
    std::string screen = "\x1b[H\x1b[2J";
    char* buf = nullptr;
    size_t len = 0;
    FILE* f = open_memstream(&buf, &len);
    time_t now = time(nullptr);
    char when[32];
    strftime(when, sizeof when, "%H:%M:%S", localtime(&now));
    std::fprintf(f, "gpuq top  %s  %s  (q quits)\n\n",
                 (a.broker.empty() ? DefaultEndpoint() : a.broker).c_str(), when);
    if (!stats.ok()) {
      std::fprintf(f, "broker: %s\n", stats.status().ToString().c_str());
    } else {
      json j = json::from_msgpack(*stats, true, false);
      const auto t = std::chrono::steady_clock::now();
      const double dt = std::chrono::duration<double>(t - last_t).count();
      uint64_t total = 0, last_total = 0;
      // A named copy: iterating items() of a temporary would dangle.
      const json finished = j.value("finished", json::object());
      for (auto& [k, v] : finished.items()) {
        total += v.get<uint64_t>();
        last_total += last_finished[k];
        last_finished[k] = v.get<uint64_t>();
      }
      if (i > 0 && dt > 0) {
        std::fprintf(f, "throughput: %.0f jobs/s finished\n", (total - last_total) / dt);
      }
      last_t = t;
      PrintStatsText(f, j);
    }
    std::fclose(f);
    screen.append(buf, len);
    free(buf);
    std::fwrite(screen.data(), 1, screen.size(), stdout);
    std::fflush(stdout);
    if (a.iterations && i + 1 == a.iterations) break;
    pollfd in = {0, POLLIN, 0};
    if (poll(&in, 1, static_cast<int>(a.interval_ms)) > 0) {
      char c = 0;
      if (read(0, &c, 1) <= 0 || c == 'q' || c == 'Q') break;
    }
  }
  if (tty) tcsetattr(0, TCSANOW, &saved);
  std::printf("\n");
  return rc;
}

void AddJobCommands(CLI::App& app, Action* action) {
  auto ta = std::make_shared<TopArgs>();
  CLI::App* top = app.add_subcommand("top", "Live view of queues, workers and latencies");
  top->add_option("--interval-ms", ta->interval_ms, "Refresh interval")->capture_default_str();
  top->add_option("--iterations", ta->iterations, "Refreshes before exiting (0: until q)");
  AddCommon(top, ta.get());
  top->callback([=] { *action = [=] { return RunTop(*ta); }; });

  auto prefix = std::make_shared<std::string>();
  CLI::App* kg = app.add_subcommand(
      "keygen", "Make a CURVE key pair: PREFIX.key (secret, mode 0600) and PREFIX.pub");
  kg->add_option("prefix", *prefix, "Path prefix of the two files")->required();
  kg->callback([=] {
    *action = [=]() -> int {
      auto keys = NewCurveKeyPair();
      if (!keys.ok()) return Fail(Common{}, keys.status());
      if (Status s = WriteCurveKeyPair(*keys, *prefix); !s.ok()) return Fail(Common{}, s);
      std::printf("%s\n", keys->public_key.c_str());
      return kExitOk;
    };
  });

  auto sa = std::make_shared<SubmitArgs>();
  CLI::App* s = app.add_subcommand("submit", "Submit a kernel job");
  s->footer(
      "A job of several launches (PROTOCOL.md, \"Jobs of several launches\") runs its launches\n"
      "in order on one stream over buffers it declares once. Give --launch (or\n"
      "--launch-expression) once per launch, each followed by its --arg options: scalars,\n"
      "and buf:INDEX[:OFFSET], a pointer OFFSET bytes into the job's buffer INDEX. --in,\n"
      "--inout, --out and --scratch then declare the job's buffers, numbered 0, 1, ... in\n"
      "the order given, before or after the launches; out and inout buffers come back\n"
      "(--output PREFIX writes PREFIX.argN.bin, N the buffer's index), scratch never does.\n"
      "--source FILE adds sources 1, 2, ... (FILE is source 0) for SOURCE/ENTRY; an\n"
      "--option applies to the source given last before it. --kernel, --name-expression,\n"
      "--grid, --block and --shared belong to a job of one launch.\n"
      "\n"
      "  gpuq submit steps.cu --source reduce.cu --in x.bin --scratch 4096 --out 4 \\\n"
      "      --launch square:16:256 --arg buf:0 --arg buf:1 --arg u32:1024 \\\n"
      "      --launch 1/sum:1:256:1024 --arg buf:1 --arg buf:2 --arg u32:1024 \\\n"
      "      --wait --output result\n"
      "\n"
      "--region (PROTOCOL.md, \"Regions\"), on the broker's host: the --in, --inout and --out\n"
      "buffers live in one region that gpuq registers for the job, sized for all of them;\n"
      "input files are read into it, the job's arguments name ranges of it, and the GPU\n"
      "reads and writes them in place, so their bytes never cross the broker's socket.\n"
      "It needs the ipc endpoint and --wait (the region ends when gpuq exits); --output\n"
      "writes the out and inout buffers to PREFIX.argN.bin as usual.\n"
      "\n"
      "  gpuq submit saxpy.cu --kernel saxpy --grid 4096 --block 256 --region \\\n"
      "      --arg f32:2.5 --in x.bin --inout y.bin --arg u32:1048576 --wait --output out");
  s->add_option("file", sa->file, "CUDA C++ source file")->required();
  s->add_option("--kernel", sa->kernel, "extern \"C\" kernel to launch");
  s->add_option("--name-expression", sa->expr, "C++ kernel name, e.g. 'scale<float>'");
  s->add_option("--grid", sa->grid, "X[,Y[,Z]] (default 1)");
  s->add_option("--block", sa->block, "X[,Y[,Z]] (default 1)");
  s->add_option("--shared", sa->shared, "Dynamic shared memory in bytes");
  s->add_option("--priority", sa->priority, "0..9, higher first")->capture_default_str();
  s->add_option("--deadline", sa->deadline_s, "Seconds within which the job must start");
  s->add_option("--limit", sa->limit_s, "Run-time limit in seconds");
  s->add_option("--tenant", sa->tenant, "Tenant (ignored on CURVE connections)");
  s->add_option("--key", sa->key, "Idempotency key");
  auto ordered = [sa](const char* kind) {
    return [sa, kind](const std::vector<std::string>& v) {
      for (const auto& x : v) sa->ordered.emplace_back(kind, x);
    };
  };
  // Arguments, buffers, launches, sources and options keep the order in
  // which they are given on the command line.
  s->add_option_function<std::vector<std::string>>(
       "--option", ordered("option"),
       "NVRTC option from the allowed list (for the latest --source, else FILE)")
      ->trigger_on_parse();
  s->add_option_function<std::vector<std::string>>(
       "--arg", ordered("arg"),
       "Argument TYPE:VALUE (u8..i64, f32, f64), or buf:INDEX[:OFFSET] in a --launch")
      ->trigger_on_parse()
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  s->add_option_function<std::vector<std::string>>("--in", ordered("in"), "Input buffer from FILE")
      ->trigger_on_parse();
  s->add_option_function<std::vector<std::string>>("--out", ordered("out"),
                                                   "Output buffer of BYTES, zero-filled")
      ->trigger_on_parse();
  s->add_option_function<std::vector<std::string>>("--inout", ordered("inout"),
                                                   "In-out buffer from FILE")
      ->trigger_on_parse();
  s->add_option_function<std::vector<std::string>>(
       "--scratch", ordered("scratch"),
       "With --launch: a buffer of BYTES, zero-filled, that stays on the GPU")
      ->trigger_on_parse();
  s->add_option_function<std::vector<std::string>>(
       "--launch", ordered("launch"),
       "A launch of a job of several launches: [SOURCE/]ENTRY:GRID:BLOCK[:SHARED]; its --arg "
       "options follow it")
      ->trigger_on_parse();
  s->add_option_function<std::vector<std::string>>(
       "--launch-expression", ordered("launch-expression"),
       "As --launch, ENTRY a C++ name expression, e.g. 'scale<float>:4:256'")
      ->trigger_on_parse();
  s->add_option_function<std::vector<std::string>>(
       "--source", ordered("source"), "With --launch: another source FILE (1, 2, ...)")
      ->trigger_on_parse();
  s->add_flag("--graph", sa->graph,
              "With --launch: the worker replays a CUDA graph of the launches for later jobs "
              "of the same shape (timing their span, not each launch)");
  s->add_flag("--region", sa->region,
              "--in, --inout and --out buffers in a region of this host's memory, read and "
              "written in place (ipc only; with --wait)");
  s->add_flag("--wait", sa->wait, "Wait for the result");
  s->add_option("--output", sa->output_prefix,
                "With --wait: write out/inout buffers to PREFIX.argN.bin");
  AddCommon(s, sa.get());
  s->callback([=] {
    for (const char* o : {"--kernel", "--name-expression", "--grid", "--block", "--shared"}) {
      if (s->count(o) > 0) sa->one_launch_options.push_back(o);
    }
    *action = [=] { return RunSubmit(*sa); };
  });

  struct IdArgs : Common {
    uint64_t id = 0;
    std::string output_prefix;
  };
  auto by_id = [&](const char* name, const char* help,
                   std::function<int(IdArgs&, Client&)> run) {
    auto a = std::make_shared<IdArgs>();
    CLI::App* c = app.add_subcommand(name, help);
    c->add_option("id", a->id, "Job id")->required();
    if (std::string(name) == "result") {
      c->add_option("--output", a->output_prefix, "Write out buffers to PREFIX.argN.bin");
    }
    AddCommon(c, a.get());
    c->callback([=] {
      *action = [=]() -> int {
        auto client = Connect(*a);
        if (!client.ok()) return Fail(*a, client.status());
        return run(*a, **client);
      };
    });
  };
  by_id("status", "Show a job's state", [](IdArgs& a, Client& c) -> int {
    auto r = c.GetStatus(a.id);
    if (!r.ok()) return Fail(a, r.status());
    if (a.json) {
      std::cout << ResultJson(*r).dump(2) << "\n";
    } else {
      PrintResult(*r);
    }
    return kExitOk;
  });
  by_id("result", "Fetch an ended job's result", [](IdArgs& a, Client& c) -> int {
    auto r = c.Fetch(a.id);
    if (!r.ok()) return Fail(a, r.status());
    if (!a.output_prefix.empty()) {
      if (Status w = WriteOutputs(*r, a.output_prefix); !w.ok()) return Fail(a, w);
    }
    if (a.json) {
      std::cout << ResultJson(*r).dump(2) << "\n";
    } else {
      PrintResult(*r);
    }
    if (!schema::IsTerminal(r->state)) return kExitTimeout;
    return r->ok() ? kExitOk : ExitFor(r->code == Code::kOk ? Code::kInternal : r->code);
  });
  by_id("cancel", "Cancel a job", [](IdArgs& a, Client& c) -> int {
    auto r = c.Cancel(a.id);
    if (!r.ok()) return Fail(a, r.status());
    if (a.json) {
      std::cout << json{{"id", a.id}, {"state", schema::JobStateName(*r)}}.dump(2) << "\n";
    } else {
      std::printf("job %llu: %s\n", (unsigned long long)a.id,
                  std::string(schema::JobStateName(*r)).c_str());
    }
    return kExitOk;
  });

  auto common = std::make_shared<Common>();
  CLI::App* st = app.add_subcommand("stats", "Queue, workers, latencies and cache of the broker");
  AddCommon(st, common.get());
  st->callback([=] {
    *action = [=]() -> int {
      auto fetched = FetchStats(*common);
      if (!fetched.ok()) return Fail(*common, fetched.status());
      const json& j = *fetched;
      if (common->json) {
        std::cout << j.dump(2) << "\n";
      } else {
        PrintStatsText(j);
      }
      return kExitOk;
    };
  });
  struct UsageArgs : Common {
    std::string tenant, since, until;
  };
  auto ua = std::make_shared<UsageArgs>();
  CLI::App* us = app.add_subcommand("usage", "What tenants used: their ended jobs, GPU time, bytes");
  us->add_option("--tenant", ua->tenant,
                 "Whose (default: your own on a tenant key; every tenant for an operator or on "
                 "ipc)");
  us->add_option("--since", ua->since, "From: Unix seconds, or UTC YYYY-MM-DD[THH:MM[:SS]]");
  us->add_option("--until", ua->until, "Until (default now), as --since");
  us->footer("Counts are kept by the hour: the hours the window overlaps count whole.");
  AddCommon(us, ua.get());
  us->callback([=] {
    *action = [=]() -> int {
      // Unix seconds, or a UTC date and time; 0 for none.
      auto when = [](const std::string& text, uint64_t* ms) -> Status {
        if (text.empty()) return Status::Ok();
        if (text.find_first_not_of("0123456789") == std::string::npos) {
          // Seconds that fit in milliseconds of a u64.
          if (text.size() > 19 || std::stoull(text) > UINT64_MAX / 1000) {
            return Error(Code::kInvalid, "'" + text + "' is past any time gpuq counts");
          }
          *ms = std::stoull(text) * 1000;
          return Status::Ok();
        }
        std::tm tm = {};
        for (const char* format : {"%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"}) {
          tm = {};
          const char* end = strptime(text.c_str(), format, &tm);
          if (end && *end == '\0') {
            *ms = static_cast<uint64_t>(timegm(&tm)) * 1000;
            return Status::Ok();
          }
        }
        return Error(Code::kInvalid, "'" + text + "' is neither Unix seconds nor YYYY-MM-DD[THH:MM[:SS]]");
      };
      uint64_t since_ms = 0, until_ms = 0;
      if (Status s = when(ua->since, &since_ms); !s.ok()) return Fail(*ua, s);
      if (Status s = when(ua->until, &until_ms); !s.ok()) return Fail(*ua, s);
      auto client = Connect(*ua);
      if (!client.ok()) return Fail(*ua, client.status());
      auto usage = (*client)->Usage(ua->tenant, since_ms, until_ms);
      if (!usage.ok()) return Fail(*ua, usage.status());
      if (ua->json) {
        json arr = json::array();
        for (const auto& u : *usage) {
          arr.push_back({{"tenant", u.tenant},       {"done", u.done},
                         {"failed", u.failed},       {"canceled", u.canceled},
                         {"expired", u.expired},     {"gpu_us", u.gpu_us},
                         {"kernel_us", u.kernel_us}, {"bytes_in", u.bytes_in},
                         {"bytes_out", u.bytes_out}});
        }
        std::cout << arr.dump(2) << "\n";
        return kExitOk;
      }
      if (usage->empty()) {
        std::printf("no jobs ended in the window\n");
        return kExitOk;
      }
      std::printf("%-24s %10s %8s %8s %8s %12s %12s %12s %12s\n", "tenant", "done", "failed",
                  "canceled", "expired", "gpu_s", "kernel_s", "bytes_in", "bytes_out");
      for (const auto& u : *usage) {
        std::printf("%-24s %10llu %8llu %8llu %8llu %12.3f %12.3f %12llu %12llu\n",
                    u.tenant.c_str(), static_cast<unsigned long long>(u.done),
                    static_cast<unsigned long long>(u.failed),
                    static_cast<unsigned long long>(u.canceled),
                    static_cast<unsigned long long>(u.expired), u.gpu_us / 1e6,
                    u.kernel_us / 1e6, static_cast<unsigned long long>(u.bytes_in),
                    static_cast<unsigned long long>(u.bytes_out));
      }
      return kExitOk;
    };
  });

  auto rcommon = std::make_shared<Common>();
  CLI::App* rg = app.add_subcommand("regions", "Registered regions: memory that clients of the "
                                               "broker's host share with its workers");
  AddCommon(rg, rcommon.get());
  rg->callback([=] {
    *action = [=]() -> int {
      auto fetched = FetchStats(*rcommon);
      if (!fetched.ok()) return Fail(*rcommon, fetched.status());
      const json& j = *fetched;
      const json regions = j.value("regions", json::array());
      if (rcommon->json) {
        std::cout << regions.dump(2) << "\n";
      } else if (regions.empty()) {
        std::printf("no regions registered\n");
      } else {
        std::printf("%-20s %-24s %14s %6s  %s\n", "region", "tenant", "bytes", "jobs", "state");
        for (const auto& r : regions) {
          std::printf("%-20llu %-24s %14llu %6llu  %s\n", r.value("region", 0ull),
                      r.value("tenant", "").c_str(), r.value("size", 0ull), r.value("jobs", 0ull),
                      r.value("ended", false) ? "ended (waits for its jobs)" : "live");
        }
      }
      return kExitOk;
    };
  });

  // gpuq session ls | close ID
  CLI::App* se = app.add_subcommand("session", "Sessions: device memory that stays between "
                                               "launches, in a process of its tenant's own");
  se->require_subcommand(1);
  auto lcommon = std::make_shared<Common>();
  CLI::App* sl = se->add_subcommand("ls", "The open sessions (a tenant's key: its own)");
  AddCommon(sl, lcommon.get());
  sl->callback([=] {
    *action = [=]() -> int {
      auto fetched = FetchStats(*lcommon);
      if (!fetched.ok()) return Fail(*lcommon, fetched.status());
      const json sessions = fetched->value("sessions", json::array());
      if (lcommon->json) {
        std::cout << sessions.dump(2) << "\n";
      } else if (sessions.empty()) {
        std::printf("no sessions open\n");
      } else {
        std::printf("%-20s %-20s %-40s %14s %14s %10s %8s %s\n", "session", "tenant", "gpu",
                    "held", "memory", "age_s", "pid", "client");
        for (const auto& x : sessions) {
          std::printf("%-20llu %-20s %-40s %14llu %14llu %10.1f %8llu %s\n",
                      x.value("session", 0ull), x.value("tenant", "").c_str(),
                      x.value("gpu", "").c_str(), x.value("held", 0ull), x.value("memory", 0ull),
                      x.value("age_ms", 0ull) / 1e3, x.value("pid", 0ull),
                      x.value("relayed", false) ? "through the broker" : "direct");
        }
      }
      return kExitOk;
    };
  });
  auto ccommon = std::make_shared<Common>();
  auto close_id = std::make_shared<uint64_t>(0);
  CLI::App* sc = se->add_subcommand("close", "Ends a session (its buffers are freed)");
  AddCommon(sc, ccommon.get());
  sc->add_option("id", *close_id, "The session's id (gpuq session ls)")->required();
  sc->callback([=] {
    *action = [=]() -> int {
      auto client = Connect(*ccommon);
      if (!client.ok()) return Fail(*ccommon, client.status());
      if (Status s = (*client)->CloseSession(*close_id); !s.ok()) return Fail(*ccommon, s);
      if (ccommon->json) {
        std::cout << json{{"session", *close_id}, {"closed", true}}.dump(2) << "\n";
      } else {
        std::printf("session %llu closed\n", static_cast<unsigned long long>(*close_id));
      }
      return kExitOk;
    };
  });

  auto dcommon = std::make_shared<Common>();
  CLI::App* dv = app.add_subcommand("devices", "GPUs of the workers attached to the broker");
  AddCommon(dv, dcommon.get());
  dv->callback([=] {
    *action = [=]() -> int {
      auto client = Connect(*dcommon);
      if (!client.ok()) return Fail(*dcommon, client.status());
      auto devices = (*client)->Devices();
      if (!devices.ok()) return Fail(*dcommon, devices.status());
      json arr = json::array();
      for (const auto& w : *devices) {
        const auto& d = w.device;
        arr.push_back({{"worker", w.worker},
                       {"ordinal", d.ordinal},
                       {"name", d.name},
                       {"uuid", d.uuid},
                       {"arch", d.Arch()},
                       {"total_bytes", d.total_bytes},
                       {"free_bytes", d.free_bytes},
                       {"sms", d.sm_count},
                       {"clock_khz", d.clock_khz},
                       {"l2_bytes", d.l2_bytes},
                       {"managed_memory", d.managed_memory},
                       {"max_threads_per_block", d.max_threads_per_block},
                       {"max_shared_optin", d.max_shared_optin},
                       {"slots", w.slots},
                       {"inflight", w.inflight},
                       {"heartbeat_age_ms", w.heartbeat_age_ms}});
        if (w.health.known) {
          const auto& h = w.health;
          json health = {{"util_pct", h.util_pct},       {"mem_used", h.mem_used_bytes},
                         {"temp_c", h.temp_c},           {"power_mw", h.power_mw},
                         {"ecc_corrected", h.ecc_corrected},
                         {"ecc_uncorrected", h.ecc_uncorrected},
                         {"xid_events", h.xid_events},   {"last_xid", h.last_xid}};
          if (!h.drain.empty()) health["drain"] = h.drain;
          arr.back()["health"] = health;
        }
      }
      if (dcommon->json) {
        std::cout << arr.dump(2) << "\n";
      } else if (devices->empty()) {
        std::printf("no GPU workers attached\n");
      } else {
        for (const auto& w : *devices) {
          std::printf("%s  %s  %s  %s  %.1f/%.1f GiB free  %u SMs  %u/%u in flight%s\n",
                      w.worker.c_str(), w.device.name.c_str(), w.device.Arch().c_str(),
                      w.device.uuid.c_str(), w.device.free_bytes / 1073741824.0,
                      w.device.total_bytes / 1073741824.0, w.device.sm_count, w.inflight,
                      w.slots,
                      w.health.drain.empty() ? "" : ("  DRAINED: " + w.health.drain).c_str());
          if (w.health.known) {
            const auto& h = w.health;
            std::printf("    %u%% busy, %u C, %.0f W, %.1f GiB used, ECC %llu/%llu "
                        "(corrected/uncorrectable), %llu critical Xids\n",
                        h.util_pct, h.temp_c, h.power_mw / 1e3, h.mem_used_bytes / 1073741824.0,
                        static_cast<unsigned long long>(h.ecc_corrected),
                        static_cast<unsigned long long>(h.ecc_uncorrected),
                        static_cast<unsigned long long>(h.xid_events));
          }
        }
      }
      return kExitOk;
    };
  });
}

}  // namespace gpuq::cli
