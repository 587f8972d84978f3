// gpuq submit, status, result, cancel, stats, devices: talk to a broker.
#include <poll.h>
#include <termios.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <ctime>
#include <map>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

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

json TimingJson(const schema::Timing& t) {
  return {{"queue_us", t.queue_us},   {"compile_us", t.compile_us}, {"load_us", t.load_us},
          {"h2d_us", t.h2d_us},       {"kernel_us", t.kernel_us},   {"d2h_us", t.d2h_us},
          {"total_us", t.total_us},   {"cache_hit", t.cache_hit}};
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
  }
  if (!r.error.empty()) std::printf("%s\n", r.error.c_str());
}

// Writes out buffers to PREFIX.argN.bin.
Status WriteOutputs(const JobResult& r, const std::string& prefix) {
  for (size_t i = 0; i < r.outputs.size(); ++i) {
    std::string path = prefix + ".arg" + std::to_string(r.output_args[i]) + ".bin";
    std::ofstream out(path, std::ios::binary);
    out.write(r.outputs[i].data(), static_cast<std::streamsize>(r.outputs[i].size()));
    if (!out) return Error(Code::kIoError, "cannot write " + path);
  }
  return Status::Ok();
}

bool ParseDim3(const std::string& s, schema::Dim3* d) {
  uint32_t v[3] = {1, 1, 1};
  std::stringstream ss(s);
  std::string part;
  int n = 0;
  while (std::getline(ss, part, ',')) {
    if (n == 3 || part.empty()) return false;
    try {
      v[n++] = static_cast<uint32_t>(std::stoul(part));
    } catch (...) {
      return false;
    }
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
  for (auto [name, t] : kTypes) {
    if (type != name) continue;
    try {
      if (t == ScalarType::kF32) return Arg::F32(std::stof(value));
      if (t == ScalarType::kF64) return Arg::F64(std::stod(value));
      const size_t bytes = schema::ScalarSize(t);
      const bool is_signed = name[0] == 'i';
      if (is_signed) {
        long long v = std::stoll(value);
        const long long lo = bytes == 8 ? LLONG_MIN : -(1LL << (8 * bytes - 1));
        const long long hi = bytes == 8 ? LLONG_MAX : (1LL << (8 * bytes - 1)) - 1;
        if (v < lo || v > hi) throw std::out_of_range(value);
        return Arg::Scalar(t, static_cast<uint64_t>(v) &
                                  (bytes == 8 ? ~0ull : (1ull << (8 * bytes)) - 1));
      }
      if (!value.empty() && value[0] == '-') throw std::out_of_range(value);
      unsigned long long v = std::stoull(value);
      if (bytes < 8 && v >= (1ull << (8 * bytes))) throw std::out_of_range(value);
      return Arg::Scalar(t, v);
    } catch (const std::exception&) {
      return Error(Code::kInvalid, "bad value for " + type + ": " + value);
    }
  }
  return Error(Code::kInvalid, "unknown argument type '" + type + "'");
}

struct SubmitArgs : Common {
  std::string file, kernel, expr, tenant, key;
  std::string grid = "1", block = "1";
  uint32_t shared = 0, priority = schema::kDefaultPriority;
  double deadline_s = 0, limit_s = 0;
  std::vector<std::string> options;
  bool wait = false;
  std::string output_prefix;
  // Arguments in order: each an --arg, --in, --out or --inout, kept in the
  // order given on the command line.
  std::vector<std::pair<std::string, std::string>> ordered;
};

int RunSubmit(SubmitArgs& a) {
  JobRequest job;
  schema::JobSpec& s = job.spec;
  std::ifstream in(a.file, std::ios::binary);
  if (!in) return Fail(a, Error(Code::kUnavailable, "cannot read " + a.file));
  std::stringstream ss;
  ss << in.rdbuf();
  s.kernel.source = ss.str();
  if (a.kernel.empty() == a.expr.empty()) {
    return Fail(a, Error(Code::kInvalid, "give exactly one of --kernel and --name-expression"));
  }
  s.kernel.entry = a.kernel.empty() ? a.expr : a.kernel;
  s.kernel.name_expression = !a.expr.empty();
  s.kernel.options = a.options;
  s.tenant = a.tenant;
  s.key = a.key;
  s.priority = a.priority;
  s.deadline_ms = static_cast<uint64_t>(a.deadline_s * 1000);
  s.time_limit_ms = static_cast<uint64_t>(a.limit_s * 1000);
  if (!ParseDim3(a.grid, &s.launch.grid) || !ParseDim3(a.block, &s.launch.block)) {
    return Fail(a, Error(Code::kInvalid, "--grid and --block are X[,Y[,Z]]"));
  }
  s.launch.shared_bytes = a.shared;
  std::vector<std::string> buffers;  // keeps input bytes alive
  buffers.reserve(a.ordered.size());
  for (const auto& [kind, value] : a.ordered) {
    if (kind == "arg") {
      auto arg = ParseScalar(value);
      if (!arg.ok()) return Fail(a, arg.status());
      s.args.push_back(*arg);
    } else if (kind == "out") {
      try {
        s.args.push_back(Arg::Out(std::stoull(value)));
      } catch (...) {
        return Fail(a, Error(Code::kInvalid, "--out takes a size in bytes"));
      }
    } else {
      std::ifstream f(value, std::ios::binary);
      if (!f) return Fail(a, Error(Code::kUnavailable, "cannot read " + value));
      std::stringstream b;
      b << f.rdbuf();
      buffers.push_back(b.str());
      const auto frame = static_cast<uint32_t>(buffers.size() - 1);
      s.args.push_back(kind == "in" ? Arg::In(frame) : Arg::InOut(frame));
    }
  }
  for (const auto& b : buffers) job.inputs.push_back(b);
  auto client = Connect(a);
  if (!client.ok()) return Fail(a, client.status());
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
  }
  if (a.json) {
    std::cout << ResultJson(*r).dump(2) << "\n";
  } else {
    PrintResult(*r);
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
  s->add_option("file", sa->file, "CUDA C++ source file")->required();
  s->add_option("--kernel", sa->kernel, "extern \"C\" kernel to launch");
  s->add_option("--name-expression", sa->expr, "C++ kernel name, e.g. 'scale<float>'");
  s->add_option("--grid", sa->grid, "X[,Y[,Z]]")->capture_default_str();
  s->add_option("--block", sa->block, "X[,Y[,Z]]")->capture_default_str();
  s->add_option("--shared", sa->shared, "Dynamic shared memory in bytes");
  s->add_option("--priority", sa->priority, "0..9, higher first")->capture_default_str();
  s->add_option("--deadline", sa->deadline_s, "Seconds within which the job must start");
  s->add_option("--limit", sa->limit_s, "Run-time limit in seconds");
  s->add_option("--tenant", sa->tenant, "Tenant (ignored on CURVE connections)");
  s->add_option("--key", sa->key, "Idempotency key");
  s->add_option("--option", sa->options, "NVRTC option from the allowed list");
  auto ordered = [sa](const char* kind) {
    return [sa, kind](const std::vector<std::string>& v) {
      for (const auto& x : v) sa->ordered.emplace_back(kind, x);
    };
  };
  // Arguments keep the order in which they are given on the command line.
  s->add_option_function<std::vector<std::string>>("--arg", ordered("arg"),
                                                   "Scalar argument TYPE:VALUE (u8..i64, f32, f64)")
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
  s->add_flag("--wait", sa->wait, "Wait for the result");
  s->add_option("--output", sa->output_prefix,
                "With --wait: write out/inout buffers to PREFIX.argN.bin");
  AddCommon(s, sa.get());
  s->callback([=] { *action = [=] { return RunSubmit(*sa); }; });

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
      auto client = Connect(*common);
      if (!client.ok()) return Fail(*common, client.status());
      auto stats = (*client)->Stats();
      if (!stats.ok()) return Fail(*common, stats.status());
      json j = json::from_msgpack(*stats, true, false);
      if (j.is_discarded()) return Fail(*common, Error(Code::kMalformed, "bad stats"));
      if (common->json) {
        std::cout << j.dump(2) << "\n";
      } else {
        PrintStatsText(j);
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
