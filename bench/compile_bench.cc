// Compile service benchmark: cold compile vs kernel cache hit (SQLite) vs
// in-memory hit, beside the floors measured in the same run: NVRTC called in
// this process (no sandbox, no cache; warmed up first, as a long-running
// process's would be) and a bare SQLite read of a blob the size of the entry.
// A cold compile is measured three ways: with a warm helper waiting (the
// service keeps them; each iteration waits, untimed, for the pool to refill),
// back to back (the pool refills while the next compiles run, on the same
// cores), and with no warm helpers (each compile starts a helper and pays
// NVRTC's first use). Prints Google Benchmark's table, then a summary with
// the ratios.
//   gpuq-bench-compile [--benchmark_min_time=...]
#include <benchmark/benchmark.h>
#include <nvrtc.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "broker/compile/compile_service.h"
#include "util/sqlite.h"

namespace {

using gpuq::compile::CompileRequest;
using gpuq::compile::CompileService;
using gpuq::compile::CompileServiceOptions;

constexpr char kSaxpy[] =
    "extern \"C\" __global__ void saxpy(float a, const float* x, float* y, int n) {\n"
    "  int i = blockIdx.x * blockDim.x + threadIdx.x;\n"
    "  if (i < n) y[i] = a * x[i] + y[i];\n}\n";

std::string helper_path;  // --helper; empty: the default

std::string TempPath(const std::string& name) {
  static const std::string dir = [] {
    std::string d = std::filesystem::temp_directory_path().string() + "/gpuq-bench-XXXXXX";
    if (!mkdtemp(d.data())) std::abort();
    return d;
  }();
  return dir + "/" + name;
}

// Each cold iteration compiles a source never seen before, down to its PTX:
// a source that differed in a comment alone would lower to the same PTX, and
// where a driver is installed NVRTC keeps the machine code of PTX it has
// seen in the driver's compute cache (~/.nv/ComputeCache), which sandboxed
// helpers may not write.
std::string UniqueSource() {
  static std::atomic<uint64_t> n{0};
  const std::string id = std::to_string(n++) + "_" + std::to_string(getpid());
  return std::string(kSaxpy) + "extern \"C\" __global__ void unique_" + id +
         "(unsigned long long* p) { *p = " + std::to_string(n.load() * 1000003ull + getpid()) +
         "ull; }\n";
}

std::unique_ptr<CompileService> MakeService(const std::string& file, size_t memory_entries,
                                            std::optional<size_t> warm_helpers = {}) {
  CompileServiceOptions o;
  o.cache_path = TempPath(file);
  o.memory_entries = memory_entries;
  o.warm_helpers = warm_helpers;
  o.helper_path = helper_path;
  auto s = CompileService::Create(o);
  if (!s.ok()) {
    fprintf(stderr, "%s\n", s.status().ToString().c_str());
    std::abort();
  }
  return std::move(*s);
}

CompileRequest Request(std::string source) {
  CompileRequest r;
  r.source = std::move(source);
  r.arch = "sm_90";
  return r;
}

bool NvrtcCompile(const std::string& src) {
  const char* opts[] = {"--gpu-architecture=sm_90"};
  nvrtcProgram p;
  nvrtcCreateProgram(&p, src.c_str(), "k.cu", 0, nullptr, nullptr);
  bool ok = nvrtcCompileProgram(p, 1, opts) == NVRTC_SUCCESS;
  size_t n = 0;
  nvrtcGetCUBINSize(p, &n);
  std::string cubin(n, '\0');
  nvrtcGetCUBIN(p, cubin.data());
  benchmark::DoNotOptimize(cubin);
  nvrtcDestroyProgram(&p);
  return ok;
}

void BM_Floor_NvrtcInProcess(benchmark::State& state) {
  NvrtcCompile(UniqueSource());  // NVRTC's first use, not timed
  for (auto _ : state) {
    if (!NvrtcCompile(UniqueSource())) state.SkipWithError("compile");
  }
}

// A compile that finds a warm helper waiting, as one arriving at a service
// that is not saturated does.
void BM_ColdCompile(benchmark::State& state) {
  auto service = MakeService("cold.db", 1024);
  for (auto _ : state) {
    state.PauseTiming();
    if (!service->WaitForWarmHelpers(std::chrono::seconds(30))) state.SkipWithError("no helpers");
    const CompileRequest r = Request(UniqueSource());
    state.ResumeTiming();
    auto e = service->Compile(r);
    if (!e.ok() || !(*e)->ok) state.SkipWithError("compile failed");
  }
}

// One compile after another: the pool refills on the same cores.
void BM_ColdCompile_BackToBack(benchmark::State& state) {
  auto service = MakeService("cold_b2b.db", 1024);
  if (!service->WaitForWarmHelpers(std::chrono::seconds(30))) state.SkipWithError("no helpers");
  for (auto _ : state) {
    auto e = service->Compile(Request(UniqueSource()));
    if (!e.ok() || !(*e)->ok) state.SkipWithError("compile failed");
  }
}

// No warm helpers: each compile starts its own and pays NVRTC's first use.
void BM_ColdCompile_NoWarmHelpers(benchmark::State& state) {
  auto service = MakeService("cold_nowarm.db", 1024, 0);
  for (auto _ : state) {
    auto e = service->Compile(Request(UniqueSource()));
    if (!e.ok() || !(*e)->ok) state.SkipWithError("compile failed");
  }
}

void BM_SqliteHit(benchmark::State& state) {
  // No memory layer: every call reads the entry from the SQLite file.
  auto service = MakeService("disk.db", 0);
  CompileRequest r = Request(kSaxpy);
  if (!service->Compile(r).ok()) state.SkipWithError("warm-up failed");
  for (auto _ : state) {
    auto e = service->Compile(r);
    benchmark::DoNotOptimize(e);
  }
}

void BM_MemoryHit(benchmark::State& state) {
  auto service = MakeService("memory.db", 1024);
  CompileRequest r = Request(kSaxpy);
  if (!service->Compile(r).ok()) state.SkipWithError("warm-up failed");
  for (auto _ : state) {
    auto e = service->Compile(r);
    benchmark::DoNotOptimize(e);
  }
}

void BM_Floor_SqliteBlobRead(benchmark::State& state) {
  auto db = gpuq::sql::Db::Open(TempPath("raw.db"));
  if (!db.ok()) std::abort();
  (void)db->Exec("CREATE TABLE IF NOT EXISTS t(k BLOB PRIMARY KEY, v BLOB)");
  auto ins = db->Prepare("INSERT OR REPLACE INTO t VALUES (?1, ?2)");
  (void)ins->BindBlob(1, std::string(32, 'k')).BindBlob(2, std::string(7200, 'v')).Run();
  auto sel = db->Prepare("SELECT v FROM t WHERE k = ?1");
  for (auto _ : state) {
    sel->Reset().BindBlob(1, std::string(32, 'k'));
    auto row = sel->Step();
    std::string v = sel->Blob(0);
    benchmark::DoNotOptimize(v);
  }
}

// Cold compile with a warm helper waiting against NVRTC in process, round by
// round, alternating which goes first, so that load from elsewhere on the
// machine falls on both alike. Medians, in ms.
struct Interleaved {
  double nvrtc_ms = 0, cold_ms = 0;
  int rounds = 0;
  CompileService::Stats stats;  // of the cold compiles
};

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

Interleaved MeasureInterleaved(int rounds) {
  using Clock = std::chrono::steady_clock;
  auto service = MakeService("interleaved.db", 1024);
  NvrtcCompile(UniqueSource());  // NVRTC's first use in this process, not timed
  std::vector<double> floor, cold;
  auto ms = [](Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); };
  for (int i = 0; i < rounds; ++i) {
    for (int turn = 0; turn < 2; ++turn) {
      // Neither measurement shares the machine with a helper warming up.
      if (!service->WaitForWarmHelpers(std::chrono::seconds(30))) std::abort();
      if ((turn == 0) == (i % 2 == 0)) {
        const std::string src = UniqueSource();
        const auto t0 = Clock::now();
        if (!NvrtcCompile(src)) std::abort();
        floor.push_back(ms(Clock::now() - t0));
      } else {
        const CompileRequest r = Request(UniqueSource());
        const auto t0 = Clock::now();
        auto e = service->Compile(r);
        if (!e.ok() || !(*e)->ok) std::abort();
        cold.push_back(ms(Clock::now() - t0));
      }
    }
  }
  return {Median(floor), Median(cold), rounds, service->stats()};
}

BENCHMARK(BM_Floor_NvrtcInProcess)->Unit(benchmark::kMillisecond)->Iterations(20);
BENCHMARK(BM_ColdCompile)->Unit(benchmark::kMillisecond)->Iterations(20);
BENCHMARK(BM_ColdCompile_BackToBack)->Unit(benchmark::kMillisecond)->Iterations(20);
BENCHMARK(BM_ColdCompile_NoWarmHelpers)->Unit(benchmark::kMillisecond)->Iterations(20);
BENCHMARK(BM_Floor_SqliteBlobRead)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_SqliteHit)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_MemoryHit)->Unit(benchmark::kMicrosecond);

// Keeps each run's real time per iteration for the summary.
class Collector : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& r : runs) {
      if (r.run_type == Run::RT_Iteration && r.iterations > 0) {
        us_[r.benchmark_name()] = r.GetAdjustedRealTime() *
                                  (r.time_unit == benchmark::kMillisecond ? 1000.0 : 1.0) *
                                  (r.time_unit == benchmark::kNanosecond ? 1e-3 : 1.0);
      }
    }
    ConsoleReporter::ReportRuns(runs);
  }
  double us(const std::string& name) const {
    auto it = us_.find(name);
    return it == us_.end() ? 0 : it->second;
  }

 private:
  std::map<std::string, double> us_;
};

}  // namespace

int main(int argc, char** argv) {
  // A cold compile is one whose machine code is nowhere yet: the floor, too,
  // leaves the driver's compute cache alone, as the service's helpers do
  // (set before NVRTC loads the driver, which reads it once).
  setenv("CUDA_CACHE_DISABLE", "1", 1);
  benchmark::Initialize(&argc, argv);
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg.rfind("--helper=", 0) == 0) {
      helper_path = std::string(arg.substr(9));
    } else {
      fprintf(stderr, "unknown argument %s\n", argv[i]);
      return 2;
    }
  }
  Collector collector;
  benchmark::RunSpecifiedBenchmarks(&collector);
  const double nvrtc = collector.us("BM_Floor_NvrtcInProcess/iterations:20");
  const double cold = collector.us("BM_ColdCompile/iterations:20");
  const double back_to_back = collector.us("BM_ColdCompile_BackToBack/iterations:20");
  const double no_warm = collector.us("BM_ColdCompile_NoWarmHelpers/iterations:20");
  const double raw = collector.us("BM_Floor_SqliteBlobRead");
  const double disk = collector.us("BM_SqliteHit");
  const double memory = collector.us("BM_MemoryHit");
  printf("\n| path | time per call | vs floor | cold compile / this |\n|---|---|---|---|\n");
  printf("| NVRTC in process, no sandboxing (floor) | %.2f ms | 1.00 | |\n", nvrtc / 1000);
  printf("| cold compile, warm helper waiting (+ SQLite insert) | %.2f ms | %.2f x NVRTC | 1 |\n",
         cold / 1000, cold / nvrtc);
  printf("| cold compile, back to back (pool refilling) | %.2f ms | %.2f x NVRTC | |\n",
         back_to_back / 1000, back_to_back / nvrtc);
  printf("| cold compile, no warm helpers (new helper each) | %.2f ms | %.2f x NVRTC | |\n",
         no_warm / 1000, no_warm / nvrtc);
  printf("| bare SQLite blob read (floor) | %.2f us | 1.00 | |\n", raw);
  printf("| cache hit, SQLite | %.2f us | %.2f x SQLite read | %.0f |\n", disk, disk / raw,
         cold / disk);
  printf("| cache hit, memory | %.3f us | | %.0f |\n", memory, cold / memory);
  const Interleaved in = MeasureInterleaved(30);
  printf("\nInterleaved, %d rounds, medians: NVRTC in process %.2f ms, cold compile through the "
         "service (warm helper waiting) %.2f ms: %.2f x NVRTC\n",
         in.rounds, in.nvrtc_ms, in.cold_ms, in.cold_ms / in.nvrtc_ms);
  const double n =
      static_cast<double>(std::max<uint64_t>(in.stats.compiles, 1)) * 1000;
  printf(
      "Where a cold compile's time went (means): waiting for a helper %.2f ms, "
      "the helper's "
      "round trip %.2f ms (NVRTC inside it %.2f ms), SQLite insert %.2f ms\n",
      in.stats.take_us / n, in.stats.helper_us / n, in.stats.nvrtc_us / n,
      in.stats.insert_us / n);
  std::error_code ec;
  std::filesystem::remove_all(std::filesystem::path(TempPath("x")).parent_path(), ec);
  return 0;
}
