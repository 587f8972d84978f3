// gpuq compile and gpuq cache: the compile service and kernel cache, used
// directly (no broker, no GPU needed).
#include <sys/stat.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>

#include "broker/compile/compile_service.h"
#include "client/cli.h"

namespace gpuq::cli {
namespace {

using compile::CompileService;
using nlohmann::json;

struct CompileArgs {
  std::string file, arch = "sm_90", cache;
  std::vector<std::string> kernels, expressions, options, headers;
  bool json = false;
  uint64_t timeout_ms = 10000, memory_mb = 4096;
  std::string out_cubin, out_ptx;
};

struct CacheArgs {
  std::string cache;
  bool json = false;
  uint64_t max_bytes = 1ull << 30;
  double unused_days = -1;
  bool failed = false;
};

bool ReadFile(const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::ostringstream ss;
  ss << in.rdbuf();
  *out = ss.str();
  return true;
}

bool WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  return static_cast<bool>(out);
}

StatusOr<std::unique_ptr<compile::KernelCache>> OpenCache(const std::string& path,
                                                         uint64_t max_bytes) {
  return compile::KernelCache::Open(path.empty() ? DefaultCachePath() : path,
                                    compile::CacheOptions{max_bytes});
}

int RunCompile(const CompileArgs& a) {
  compile::CompileRequest req;
  if (!ReadFile(a.file, &req.source)) {
    return Fail(a.json, Error(Code::kUnavailable, "cannot read " + a.file));
  }
  req.source_name = std::filesystem::path(a.file).filename().string();
  req.arch = a.arch;
  req.options = a.options;
  req.name_expressions = a.expressions;
  for (const std::string& h : a.headers) {
    auto eq = h.find('=');
    std::string name = eq == std::string::npos ? std::filesystem::path(h).filename().string()
                                               : h.substr(0, eq);
    std::string path = eq == std::string::npos ? h : h.substr(eq + 1);
    schema::NamedHeader nh{name, ""};
    if (!ReadFile(path, &nh.content)) {
      return Fail(a.json, Error(Code::kUnavailable, "cannot read header " + path));
    }
    req.headers.push_back(std::move(nh));
  }
  compile::CompileServiceOptions opts;
  opts.cache_path = a.cache.empty() ? DefaultCachePath() : a.cache;
  opts.limits.wall = std::chrono::milliseconds(a.timeout_ms);
  opts.limits.memory_bytes = a.memory_mb << 20;
  // One compile: one thread, and its helper started for it, not a warm pool;
  // the cache file is checked by the broker that owns it, not at every command.
  opts.max_concurrent = 1;
  opts.warm_helpers = 0;
  opts.cache.verify_on_open = false;
  auto service = CompileService::Create(opts);
  if (!service.ok()) return Fail(a.json, service.status());
  compile::CompileInfo info;
  auto entry = (*service)->Compile(req, &info);
  if (!entry.ok()) return Fail(a.json, entry.status());
  const compile::CacheEntry& e = **entry;
  if (!e.ok) return Fail(a.json, Error(e.code, "the compile was rejected"), e.log);
  for (const std::string& k : a.kernels) {
    if (!e.HasKernel(k)) {
      return Fail(a.json, Error(Code::kNotFound, "no kernel named '" + k +
                                                     "' in the compiled module (is it "
                                                     "extern \"C\" __global__?)"));
    }
  }
  if (!a.out_cubin.empty() && !WriteFile(a.out_cubin, e.cubin)) {
    return Fail(a.json, Error(Code::kIoError, "cannot write " + a.out_cubin));
  }
  if (!a.out_ptx.empty() && !WriteFile(a.out_ptx, e.ptx)) {
    return Fail(a.json, Error(Code::kIoError, "cannot write " + a.out_ptx));
  }
  json lowered = json::object();
  for (const auto& l : e.lowered) lowered[l.expression] = l.lowered;
  const double wall_ms = static_cast<double>(info.wall_us) / 1000.0;
  const double compile_ms = static_cast<double>(e.compile_us) / 1000.0;
  if (a.json) {
    json j = {{"key", ToHex(e.key)},
              {"cache", info.cache_hit() ? "hit" : "miss"},
              {"source", compile::CacheSourceName(info.source)},
              {"arch", e.arch},
              {"nvrtc", e.nvrtc_version},
              {"ptx_bytes", e.ptx.size()},
              {"cubin_bytes", e.cubin.size()},
              {"compile_ms", compile_ms},
              {"wall_ms", wall_ms},
              {"lowered_names", lowered},
              {"kernels", a.kernels},
              {"log", e.log}};
    std::cout << j.dump(2) << "\n";
  } else {
    std::printf("%s %s key %s\n  ptx %zu bytes, cubin %zu bytes, compiled in %.1f ms, "
                "this call %.3f ms (%s)\n",
                info.cache_hit() ? "hit" : "miss", e.arch.c_str(), ToHex(e.key).c_str(),
                e.ptx.size(), e.cubin.size(), compile_ms, wall_ms,
                std::string(compile::CacheSourceName(info.source)).c_str());
    for (const auto& l : e.lowered) {
      std::printf("  %s -> %s\n", l.expression.c_str(), l.lowered.c_str());
    }
    if (!e.log.empty()) std::printf("%s", e.log.c_str());
  }
  return kExitOk;
}

std::string Iso(int64_t ms) {
  time_t t = static_cast<time_t>(ms / 1000);
  char buf[32];
  struct tm tm;
  gmtime_r(&t, &tm);
  strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

int RunCacheStats(const CacheArgs& a) {
  auto cache = OpenCache(a.cache, a.max_bytes);
  if (!cache.ok()) return Fail(a.json, cache.status());
  auto st = (*cache)->Stats();
  if (!st.ok()) return Fail(a.json, st.status());
  const double lookups = static_cast<double>(st->hits + st->misses);
  if (a.json) {
    std::cout << json{{"path", (*cache)->path()},
                      {"entries", st->entries},
                      {"failed_entries", st->failed_entries},
                      {"bytes", st->bytes},
                      {"hits", st->hits},
                      {"misses", st->misses},
                      {"evictions", st->evictions},
                      {"hit_ratio", lookups > 0 ? st->hits / lookups : 0.0}}
                     .dump(2)
              << "\n";
  } else {
    std::printf("cache     %s\nentries   %llu (%llu failed compiles)\nsize      %.1f KiB\n"
                "lookups   %llu hits, %llu misses (%.1f%% hits)\nevictions %llu\n",
                (*cache)->path().c_str(), (unsigned long long)st->entries,
                (unsigned long long)st->failed_entries, st->bytes / 1024.0,
                (unsigned long long)st->hits, (unsigned long long)st->misses,
                lookups > 0 ? 100.0 * st->hits / lookups : 0.0,
                (unsigned long long)st->evictions);
  }
  return kExitOk;
}

int RunCacheList(const CacheArgs& a) {
  auto cache = OpenCache(a.cache, a.max_bytes);
  if (!cache.ok()) return Fail(a.json, cache.status());
  auto list = (*cache)->List();
  if (!list.ok()) return Fail(a.json, list.status());
  json arr = json::array();
  if (!a.json) {
    std::printf("%-16s %-8s %-6s %9s %9s %10s %6s %s\n", "KEY", "ARCH", "STATUS", "PTX",
                "CUBIN", "COMPILE_MS", "HITS", "LAST_USED");
  }
  for (const auto& e : *list) {
    if (a.json) {
      json lowered = json::object();
      for (const auto& l : e.lowered) lowered[l.expression] = l.lowered;
      arr.push_back({{"key", ToHex(e.key)},
                     {"arch", e.arch},
                     {"nvrtc", e.nvrtc_version},
                     {"status", CodeName(e.code)},
                     {"ptx_bytes", e.ptx.size()},
                     {"cubin_bytes", e.cubin.size()},
                     {"compile_ms", e.compile_us / 1000.0},
                     {"hits", e.hits},
                     {"created", Iso(e.created_ms)},
                     {"last_used", Iso(e.last_used_ms)},
                     {"lowered_names", lowered}});
    } else {
      std::printf("%-16s %-8s %-6s %9zu %9zu %10.1f %6llu %s\n",
                  ToHex(e.key).substr(0, 16).c_str(), e.arch.c_str(),
                  e.ok ? "ok" : "failed", e.ptx.size(), e.cubin.size(),
                  e.compile_us / 1000.0, (unsigned long long)e.hits,
                  Iso(e.last_used_ms).c_str());
    }
  }
  if (a.json) std::cout << arr.dump(2) << "\n";
  return kExitOk;
}

int RunCachePrune(const CacheArgs& a) {
  auto cache = OpenCache(a.cache, a.max_bytes);
  if (!cache.ok()) return Fail(a.json, cache.status());
  std::optional<int64_t> before;
  if (a.unused_days >= 0) {
    before = compile::NowMs() - static_cast<int64_t>(a.unused_days * 86400e3);
  }
  auto removed = (*cache)->Prune(a.max_bytes, before, a.failed);
  if (!removed.ok()) return Fail(a.json, removed.status());
  if (a.json) {
    std::cout << json{{"removed", *removed}}.dump(2) << "\n";
  } else {
    std::printf("removed %llu entries\n", (unsigned long long)*removed);
  }
  return kExitOk;
}

}  // namespace

std::string DefaultCachePath() {
  if (const char* p = getenv("GPUQ_CACHE"); p && *p) return p;
  std::filesystem::path dir;
  if (const char* x = getenv("XDG_CACHE_HOME"); x && *x) {
    dir = x;
  } else if (const char* h = getenv("HOME"); h && *h) {
    dir = std::filesystem::path(h) / ".cache";
  } else {
    dir = "/tmp";
  }
  dir /= "gpuq";
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  return (dir / "kernels.db").string();
}

void AddCompileCommands(CLI::App& app, Action* action) {
  auto ca = std::make_shared<CompileArgs>();
  CLI::App* c = app.add_subcommand(
      "compile", "Compile a kernel file with NVRTC into the kernel cache (no GPU needed)");
  c->add_option("file", ca->file, "CUDA C++ source file")->required();
  c->add_option("--arch", ca->arch, "Target: sm_XX (CUBIN and PTX) or compute_XX (PTX)")
      ->capture_default_str();
  c->add_option("--kernel", ca->kernels, "extern \"C\" kernel that must be in the module");
  c->add_option("--name-expression", ca->expressions,
                "C++ name expression to lower, e.g. 'saxpy<float>'");
  c->add_option("--option", ca->options, "NVRTC option from the allowed list")
      ->allow_extra_args(false);
  c->add_option("--header", ca->headers, "Header sent with the source: NAME=FILE or FILE");
  c->add_option("--cache", ca->cache, "Kernel cache file (default: $GPUQ_CACHE or ~/.cache)");
  c->add_option("--timeout-ms", ca->timeout_ms, "Wall-time bound of the compile")
      ->capture_default_str();
  c->add_option("--memory-mb", ca->memory_mb, "Memory bound of the compile")
      ->capture_default_str();
  c->add_option("--output-cubin", ca->out_cubin, "Write the CUBIN here");
  c->add_option("--output-ptx", ca->out_ptx, "Write the PTX here");
  c->add_flag("--json", ca->json, "Print JSON");
  c->callback([=] { *action = [=] { return RunCompile(*ca); }; });

  auto cache_args = std::make_shared<CacheArgs>();
  CLI::App* cache = app.add_subcommand("cache", "Inspect and prune the kernel cache");
  cache->require_subcommand(1);
  auto common = [&](CLI::App* s) {
    s->add_option("--cache", cache_args->cache, "Kernel cache file");
    s->add_flag("--json", cache_args->json, "Print JSON");
  };
  CLI::App* stats = cache->add_subcommand("stats", "Entries, size, hits and misses");
  common(stats);
  stats->callback([=] { *action = [=] { return RunCacheStats(*cache_args); }; });
  CLI::App* ls = cache->add_subcommand("ls", "List entries, most recently used first");
  common(ls);
  ls->callback([=] { *action = [=] { return RunCacheList(*cache_args); }; });
  CLI::App* prune = cache->add_subcommand(
      "prune", "Remove failed or unused entries, then the least recently used to fit");
  common(prune);
  prune->add_option("--max-bytes", cache_args->max_bytes, "Size to fit in")
      ->capture_default_str();
  prune->add_option("--unused-days", cache_args->unused_days,
                    "Remove entries unused for this many days");
  prune->add_flag("--failed", cache_args->failed, "Remove cached failed compiles");
  prune->callback([=] { *action = [=] { return RunCachePrune(*cache_args); }; });
}

}  // namespace gpuq::cli
