// The compile service with real NVRTC, the real sandbox helper and a real
// SQLite file. No GPU is needed.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <future>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "broker/compile/compile_service.h"
#include "tests/test_util.h"

namespace gpuq::compile {
namespace {

using testing::TempDir;

constexpr char kSaxpy[] =
    "extern \"C\" __global__ void saxpy(float a, const float* x, float* y, int n) {\n"
    "  int i = blockIdx.x * blockDim.x + threadIdx.x;\n"
    "  if (i < n) y[i] = a * x[i] + y[i];\n}\n";

// 10^8 tokens after macro expansion: NVRTC runs for a long time and grows
// without bound.
constexpr char kMacroBomb[] =
    "#define A(x) x x x x x x x x x x\n"
    "#define B(x) A(A(A(A(A(A(A(A(x))))))))\n"
    "__device__ int v = B(1+) 1;\n";

class CompileServiceTest : public ::testing::Test {
 protected:
  void SetUp() override { service_ = Make(); }

  std::unique_ptr<CompileService> Make(CompileServiceOptions o = {}) {
    if (o.cache_path.empty()) o.cache_path = dir_.File("kernels.db");
    auto s = CompileService::Create(o);
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    return s.ok() ? std::move(*s) : nullptr;
  }

  static CompileRequest Request(std::string source, std::string arch = "sm_90") {
    CompileRequest r;
    r.source = std::move(source);
    r.arch = std::move(arch);
    return r;
  }

  StatusOr<EntryPtr> Compile(const CompileRequest& r, CompileInfo* info = nullptr) {
    return service_->Compile(r, info);
  }

  TempDir dir_;
  std::unique_ptr<CompileService> service_;
};

TEST_F(CompileServiceTest, ExternCKernelCompilesToCubinAndPtx) {
  auto e = Compile(Request(kSaxpy));
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  EXPECT_TRUE((*e)->ok) << (*e)->log;
  EXPECT_TRUE((*e)->HasKernel("saxpy"));
  EXPECT_FALSE((*e)->HasKernel("sax"));
  EXPECT_GT((*e)->cubin.size(), 0u);
  EXPECT_EQ((*e)->cubin.substr(0, 4), std::string("\x7f" "ELF", 4));
  EXPECT_NE((*e)->ptx.find(".target sm_90"), std::string::npos);
}

TEST_F(CompileServiceTest, ComputeArchGivesPtxOnly) {
  auto e = Compile(Request(kSaxpy, "compute_80"));
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  EXPECT_TRUE((*e)->ok);
  EXPECT_TRUE((*e)->cubin.empty());
  EXPECT_NE((*e)->ptx.find(".target sm_80"), std::string::npos);
}

TEST_F(CompileServiceTest, NameExpressionsAreLoweredAndKept) {
  CompileRequest r = Request(
      "template <typename T, int N> __global__ void fill(T* x) { x[threadIdx.x] = T(N); }\n");
  r.name_expressions = {"fill<float, 3>", "fill<double, 7>"};
  auto e = Compile(r);
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  ASSERT_TRUE((*e)->ok) << (*e)->log;
  ASSERT_EQ((*e)->lowered.size(), 2u);
  EXPECT_EQ((*e)->Symbol("fill<float, 3>"), "_Z4fillIfLi3EEvPT_");
  EXPECT_TRUE((*e)->HasKernel((*e)->Symbol("fill<double, 7>")));
  // The lowered names survive the trip through SQLite.
  auto again = Make()->Compile(r);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ((*again)->lowered, (*e)->lowered);
}

TEST_F(CompileServiceTest, HeadersSentWithTheJobAndToolkitHeadersAreReadable) {
  CompileRequest r = Request(
      "#include <cuda_fp16.h>\n#include \"scale.h\"\n"
      "extern \"C\" __global__ void k(__half* x) { x[0] = __float2half(SCALE); }\n");
  r.headers = {{"scale.h", "#define SCALE 2.0f\n"}};
  auto e = Compile(r);
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  EXPECT_TRUE((*e)->ok) << (*e)->log;
}

// ------------------------------------------------------------ the toolkit's C++ libraries

// CUB's block and warp reductions (CCCL, beneath the toolkit's include/cccl).
constexpr char kCubReductions[] = R"(
#include <cub/block/block_reduce.cuh>
#include <cub/warp/warp_reduce.cuh>
extern "C" __global__ void block_sum(const int* in, int* out) {
  using Reduce = cub::BlockReduce<int, 256>;
  __shared__ typename Reduce::TempStorage tmp;
  int s = Reduce(tmp).Sum(in[blockIdx.x * 256 + threadIdx.x]);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}
extern "C" __global__ void warp_max(const int* in, int* out) {
  using Reduce = cub::WarpReduce<int>;
  __shared__ typename Reduce::TempStorage tmp[8];
  int v = in[blockIdx.x * 256 + threadIdx.x];
  int m = Reduce(tmp[threadIdx.x / 32]).Reduce(v, cuda::maximum<int>());
  if (threadIdx.x % 32 == 0) out[(blockIdx.x * 256 + threadIdx.x) / 32] = m;
}
)";

// Cooperative groups: cg::reduce over a tile, and the tile's own shuffles.
constexpr char kCooperativeGroups[] = R"(
#include <cooperative_groups.h>
#include <cooperative_groups/reduce.h>
namespace cg = cooperative_groups;
extern "C" __global__ void warp_sums(const int* in, int* out) {
  auto tile = cg::tiled_partition<32>(cg::this_thread_block());
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  int s = cg::reduce(tile, in[i], cg::plus<int>());
  if (tile.thread_rank() == 0) out[i / 32] = s;
}
extern "C" __global__ void warp_sums_by_shuffle(const int* in, int* out) {
  auto tile = cg::tiled_partition<32>(cg::this_thread_block());
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  int s = in[i];
  for (int d = tile.size() / 2; d > 0; d /= 2) s += tile.shfl_down(s, d);
  if (tile.thread_rank() == 0) out[i / 32] = s;
}
)";

constexpr char kCudaStd[] = R"(
#include <cuda/std/array>
#include <cuda/std/limits>
#include <cuda/std/type_traits>
extern "C" __global__ void k(float* out) {
  static_assert(cuda::std::is_same_v<float, cuda::std::remove_cv_t<const float>>);
  cuda::std::array<float, 4> a{1, 2, 3, 4};
  out[threadIdx.x] = a[threadIdx.x % a.size()] + cuda::std::numeric_limits<float>::epsilon();
}
)";

TEST_F(CompileServiceTest, CubBlockAndWarpReductionsCompile) {
  auto e = Compile(Request(kCubReductions));
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  ASSERT_TRUE((*e)->ok) << (*e)->log;
  EXPECT_TRUE((*e)->HasKernel("block_sum"));
  EXPECT_TRUE((*e)->HasKernel("warp_max"));
  EXPECT_FALSE((*e)->cubin.empty());
}

TEST_F(CompileServiceTest, CooperativeGroupsWarpReductionsCompile) {
  auto e = Compile(Request(kCooperativeGroups));
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  ASSERT_TRUE((*e)->ok) << (*e)->log;
  EXPECT_TRUE((*e)->HasKernel("warp_sums"));
  EXPECT_TRUE((*e)->HasKernel("warp_sums_by_shuffle"));
}

TEST_F(CompileServiceTest, CudaStdCompiles) {
  auto e = Compile(Request(kCudaStd));
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  ASSERT_TRUE((*e)->ok) << (*e)->log;
  EXPECT_TRUE((*e)->HasKernel("k"));
}

TEST(CanTargetTest, ThisNvrtcTargetsVoltaNoLongerAndAmpereAndHopperStill) {
  EXPECT_TRUE(CompileService::CanTarget("sm_90"));
  EXPECT_TRUE(CompileService::CanTarget("sm_90a"));
  EXPECT_TRUE(CompileService::CanTarget("compute_90"));
  EXPECT_TRUE(CompileService::CanTarget("sm_80"));
  EXPECT_FALSE(CompileService::CanTarget("sm_50"));
  EXPECT_FALSE(CompileService::CanTarget("sm_70"));
  EXPECT_FALSE(CompileService::CanTarget("sm_990"));
  EXPECT_FALSE(CompileService::CanTarget("sm_9x"));
  EXPECT_FALSE(CompileService::CanTarget(""));
  const std::vector<int>& archs = SupportedArchs();
  ASSERT_FALSE(archs.empty());
  EXPECT_TRUE(std::is_sorted(archs.begin(), archs.end()));
  EXPECT_EQ(archs.front(), 75) << "CUDA 13 dropped sm_50 through sm_72";
}

TEST(CanTargetTest, EveryArchitectureItClaimsCompiles) {
  TempDir dir;
  CompileServiceOptions o;
  o.cache_path = dir.File("kernels.db");
  auto service = CompileService::Create(o);
  ASSERT_TRUE(service.ok()) << service.status().ToString();
  for (int arch : SupportedArchs()) {
    CompileRequest r;
    r.source = kSaxpy;
    r.arch = "sm_" + std::to_string(arch);
    auto e = (*service)->Compile(r);
    ASSERT_TRUE(e.ok()) << r.arch << ": " << e.status().ToString();
    EXPECT_TRUE((*e)->ok) << r.arch << ": " << (*e)->log;
  }
  // One it cannot target is an invalid request, refused before any compile.
  CompileRequest old;
  old.source = kSaxpy;
  old.arch = "sm_70";
  const uint64_t compiles = (*service)->stats().compiles;
  auto e = (*service)->Compile(old);
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), Code::kInvalid) << e.status().ToString();
  EXPECT_NE(e.status().message().find("sm_70"), std::string::npos);
  EXPECT_EQ((*service)->stats().compiles, compiles);
}

TEST_F(CompileServiceTest, CompileErrorKeepsTheFullLogAndIsCached) {
  CompileInfo info;
  auto e = Compile(Request("extern \"C\" __global__ void k() { undefined_thing(); }\n"), &info);
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  EXPECT_FALSE((*e)->ok);
  EXPECT_EQ((*e)->code, Code::kCompileError);
  EXPECT_NE((*e)->log.find("undefined_thing"), std::string::npos) << (*e)->log;
  EXPECT_EQ(info.source, CacheSource::kCompiled);
  // A retry, even from a fresh process's view, does not compile again.
  auto again = Make()->Compile(Request("extern \"C\" __global__ void k() { undefined_thing(); }\n"),
                               &info);
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE((*again)->ok);
  EXPECT_EQ(info.source, CacheSource::kDisk);
  EXPECT_EQ((*again)->log, (*e)->log);
}

// A header of warnings included a few hundred times made NVRTC write
// megabytes of log (a hundred with 20,000 includes), all of it kept in the
// cache and sent in the job's error, past the wire's 1 MiB bound for error
// text: the client could not read its own job's result. The log is cut to
// its first kMaxLogBytes, saying so.
TEST_F(CompileServiceTest, AnAmplifiedLogIsCutToItsBound) {
  CompileRequest r;
  r.arch = "sm_90";
  r.headers.push_back({"w.h", "#warning " + std::string(3000, 'A') + "\n"});
  for (int i = 0; i < 400; ++i) r.source += "#include \"w.h\"\n";
  r.source += "extern \"C\" __global__ void k() { undefined_thing(); }\n";
  auto e = Compile(r);
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  EXPECT_FALSE((*e)->ok);
  EXPECT_EQ((*e)->code, Code::kCompileError);
  EXPECT_LE((*e)->log.size(), kMaxLogBytes + 200);
  EXPECT_NE((*e)->log.find("[gpuq: the compile log was "), std::string::npos)
      << (*e)->log.substr((*e)->log.size() - 200);
  EXPECT_NE((*e)->log.find("warning"), std::string::npos);
}

// The outcome of a compile follows NVRTC's own diagnostics, never the text
// of the author's #error: one that says "cannot open source file" named a
// host file and was reported a sandbox violation; one that says
// "catastrophic error: out of memory" was taken for the memory bound, never
// cached, and compiled again at every submit.
TEST_F(CompileServiceTest, AnErrorDirectiveCannotForgeTheOutcome) {
  auto forged = Compile(Request("#error cannot open source file \"/etc/shadow\" (a message)\n"));
  ASSERT_TRUE(forged.ok()) << forged.status().ToString();
  EXPECT_EQ((*forged)->code, Code::kCompileError) << (*forged)->log;
  EXPECT_NE((*forged)->log.find("(a message)"), std::string::npos) << (*forged)->log;
  const std::string oom = "#error catastrophic error: out of memory\n";
  CompileInfo info;
  auto first = Compile(Request(oom), &info);
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  EXPECT_EQ((*first)->code, Code::kCompileError) << (*first)->log;
  auto again = Compile(Request(oom), &info);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(info.source, CacheSource::kMemory) << "a rejected source is cached like any other";
}

// A key named NVRTC's major.minor version only: after a patch release of
// the toolkit (another libnvrtc.so.13.0.N, other headers), or with another
// toolkit's headers, kernels and errors compiled by the old one were served.
// The key holds NVRTC's library file and the headers' directory too.
TEST_F(CompileServiceTest, KeysFollowTheToolkitNotJustNvrtcsVersion) {
  const CompileRequest r = Request(kSaxpy);
  EXPECT_EQ(Make()->KeyFor(r), service_->KeyFor(r)) << "the same toolkit, the same key";
  std::filesystem::create_directories(dir_.File("other-include"));
  CompileServiceOptions o;
  o.cuda_include = dir_.File("other-include");
  o.warm_helpers = 0;
  auto other = Make(o);
  ASSERT_TRUE(other);
  EXPECT_NE(other->KeyFor(r), service_->KeyFor(r));
}

TEST_F(CompileServiceTest, MissThenDiskHitThenMemoryHit) {
  CompileInfo info;
  ASSERT_TRUE(Compile(Request(kSaxpy), &info).ok());
  EXPECT_EQ(info.source, CacheSource::kCompiled);
  EXPECT_FALSE(info.cache_hit());
  ASSERT_TRUE(Compile(Request(kSaxpy), &info).ok());
  EXPECT_EQ(info.source, CacheSource::kMemory);
  {
    auto fresh = Make();  // another process's view of the same file
    ASSERT_TRUE(fresh->Compile(Request(kSaxpy), &info).ok());
    EXPECT_EQ(info.source, CacheSource::kDisk);
  }  // its hit count is written when it closes
  auto st = service_->cache().Stats();
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->entries, 1u);
  EXPECT_EQ(st->misses, 1u);
  EXPECT_EQ(st->hits, 1u);
}

TEST_F(CompileServiceTest, KeyChangesWithEveryInputThatChangesTheOutput) {
  CompileRequest base = Request(kSaxpy);
  const Digest k = service_->KeyFor(base);
  std::vector<CompileRequest> variants(6, base);
  variants[0].arch = "sm_80";
  variants[1].options = {"--use_fast_math"};
  variants[2].headers = {{"a.h", ""}};
  variants[3].name_expressions = {"saxpy"};
  variants[4].source += " ";
  variants[5].source_name = "other.cu";
  for (const auto& v : variants) EXPECT_NE(service_->KeyFor(v), k);
  EXPECT_EQ(service_->KeyFor(base), k);
}

TEST_F(CompileServiceTest, ConcurrentCallersOfOneKeyCompileItOnce) {
  std::vector<std::future<StatusOr<EntryPtr>>> calls;
  for (int i = 0; i < 8; ++i) {
    calls.push_back(std::async(std::launch::async, [&] { return Compile(Request(kSaxpy)); }));
  }
  for (auto& c : calls) {
    auto e = c.get();
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    EXPECT_TRUE((*e)->ok);
  }
  EXPECT_EQ(service_->stats().compiles, 1u);
}

TEST_F(CompileServiceTest, LruEvictionKeepsTheFileUnderItsCap) {
  CompileServiceOptions o;
  o.cache_path = dir_.File("small.db");
  o.cache.max_bytes = 24 * 1024;  // room for about three saxpy-sized kernels
  auto small = Make(o);
  std::vector<Digest> keys;
  for (int i = 0; i < 6; ++i) {
    CompileRequest r = Request(std::string(kSaxpy) + "// variant " + std::to_string(i) + "\n");
    keys.push_back(small->KeyFor(r));
    auto e = small->Compile(r);
    ASSERT_TRUE(e.ok()) << e.status().ToString();
  }
  auto st = small->cache().Stats();
  ASSERT_TRUE(st.ok());
  EXPECT_LE(st->bytes, o.cache.max_bytes);
  EXPECT_GT(st->evictions, 0u);
  EXPECT_LT(st->entries, 6u);
  auto list = small->cache().List();
  ASSERT_TRUE(list.ok());
  ASSERT_FALSE(list->empty());
  EXPECT_EQ(list->front().key, keys.back()) << "the newest entry is kept";
  for (const auto& e : *list) {
    EXPECT_NE(e.key, keys.front()) << "the least recently used entry is gone";
  }
}

TEST_F(CompileServiceTest, OptionsOffTheAllowedListAreRefusedBeforeAnyCompile) {
  for (std::string opt : {"-I/etc", "--include-path=/etc", "--pre-include=/etc/passwd",
                          "-include", "--gpu-architecture=sm_80", "-arch=sm_80",
                          "--time=/tmp/x", "--fdevice-time-trace=/tmp/x", "-DX\n#include",
                          "--std=c++99", "--maxrregcount=abc", "--dopt=maybe",
                          "--Wreorder"}) {  // NVRTC 13 refuses it
    CompileRequest r = Request(kSaxpy);
    r.options = {opt};
    auto e = Compile(r);
    ASSERT_FALSE(e.ok()) << opt;
    EXPECT_EQ(e.status().code(), Code::kInvalid) << opt;
  }
  for (std::string opt : {"--use_fast_math", "-DN=4", "--std=c++17", "--maxrregcount=64",
                          "--fmad=false", "-lineinfo"}) {
    CompileRequest r = Request(kSaxpy);
    r.options = {opt};
    auto e = Compile(r);
    ASSERT_TRUE(e.ok()) << opt << ": " << e.status().ToString();
    EXPECT_TRUE((*e)->ok) << opt;
  }
  EXPECT_EQ(service_->stats().compiles, 6u);
}

// PROTOCOL.md allows each option in its single-dash spelling too; four of
// them (-diag-error=, -diag-warn=, -builtin-move-forward=,
// -builtin-initializer-list=) were refused as off the list. Every
// single-dash spelling is taken here, and NVRTC compiles with it.
TEST_F(CompileServiceTest, EveryAllowedOptionIsTakenInItsSingleDashSpelling) {
  for (std::string opt :
       {"-use_fast_math", "-extra-device-vectorization", "-restrict", "-lineinfo",
        "-default-device", "-w", "-no-source-include", "-builtin-move-forward=true",
        "-builtin-initializer-list=true", "-ftz=true", "-prec-div=false", "-prec-sqrt=false",
        "-fmad=false", "-std=c++17", "-maxrregcount=64", "-dopt=on", "-diag-suppress=177",
        "-diag-error=177", "-diag-warn=177", "-DN=4", "-UN"}) {
    CompileRequest r = Request(kSaxpy);
    r.options = {opt};
    auto e = Compile(r);
    ASSERT_TRUE(e.ok()) << opt << ": " << e.status().ToString();
    EXPECT_TRUE((*e)->ok) << opt << ": " << (*e)->log;
  }
}

TEST_F(CompileServiceTest, BadRequestsAreInvalidAndCompileNothing) {
  EXPECT_EQ(Compile(Request(kSaxpy, "sm_9x")).status().code(), Code::kInvalid);
  EXPECT_EQ(Compile(Request(kSaxpy, "--gpu-architecture=sm_90")).status().code(),
            Code::kInvalid);
  EXPECT_EQ(Compile(Request("")).status().code(), Code::kInvalid);
  EXPECT_EQ(Compile(Request(std::string("int x;\0#include \"/etc/passwd\"", 30))).status().code(),
            Code::kInvalid);
  CompileRequest r = Request(kSaxpy);
  r.name_expressions = {"f\tg"};
  EXPECT_EQ(Compile(r).status().code(), Code::kInvalid);
  EXPECT_EQ(service_->stats().compiles, 0u);
}

// ------------------------------------------------------------ the asynchronous API

// About 2000 statements after macro expansion: NVRTC takes a second or more,
// with bounded memory. `n` makes each one a different key.
std::string SlowSource(int n) {
  return "#define A(x) x x x x x x x x x x\n"
         "#define S { a = a * x[threadIdx.x & 63] + b; b = b * a - x[(threadIdx.x + 7) & 63]; }\n"
         "extern \"C\" __global__ void k(float* x) {\n"
         "  float a = x[0], b = x[1];\n"
         "  A(A(A(S S)))\n"
         "  x[threadIdx.x] = a + b;\n"
         "}\n// " +
         std::to_string(n) + "\n";
}

// Collects Submit() callbacks: what each said, in the order they came.
class Answers {
 public:
  struct Answer {
    std::string name;
    Digest key;
    StatusOr<EntryPtr> result = Status(Code::kInternal, "none");
    CompileInfo info;
    std::thread::id thread;
  };
  CompileService::Callback For(std::string name) {
    return [this, name](const Digest& key, StatusOr<EntryPtr> result, const CompileInfo& info) {
      std::lock_guard lock(mu_);
      answers_.push_back({name, key, std::move(result), info, std::this_thread::get_id()});
      cv_.notify_all();
    };
  }
  // Waits for `n` answers in all; false after two minutes.
  bool WaitFor(size_t n) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, std::chrono::minutes(2), [&] { return answers_.size() >= n; });
  }
  std::vector<Answer> All() {
    std::lock_guard lock(mu_);
    return answers_;
  }
  // The answers named `name`.
  std::vector<Answer> Named(const std::string& name) {
    std::vector<Answer> out;
    for (auto& a : All()) {
      if (a.name == name) out.push_back(a);
    }
    return out;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Answer> answers_;
};

TEST_F(CompileServiceTest, SubmitCallsBackOnceOnAServiceThreadNeverInsideSubmit) {
  Answers answers;
  CompileRequest bad = Request(kSaxpy, "sm_9x");
  service_->Submit(bad, "t", answers.For("invalid"));
  service_->Submit(Request(kSaxpy), "t", answers.For("compiled"));
  ASSERT_TRUE(answers.WaitFor(2));
  service_->Submit(Request(kSaxpy), "t", answers.For("memory"));
  ASSERT_TRUE(answers.WaitFor(3));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // nothing more comes
  auto all = answers.All();
  ASSERT_EQ(all.size(), 3u);
  for (const auto& a : all) {
    EXPECT_NE(a.thread, std::this_thread::get_id()) << a.name << " was answered inside Submit()";
  }
  auto invalid = answers.Named("invalid");
  ASSERT_EQ(invalid.size(), 1u);
  EXPECT_EQ(invalid[0].result.status().code(), Code::kInvalid);
  auto compiled = answers.Named("compiled");
  ASSERT_EQ(compiled.size(), 1u);
  ASSERT_TRUE(compiled[0].result.ok()) << compiled[0].result.status().ToString();
  EXPECT_TRUE((*compiled[0].result)->ok);
  EXPECT_EQ(compiled[0].info.source, CacheSource::kCompiled);
  EXPECT_EQ(compiled[0].key, service_->KeyFor(Request(kSaxpy)));
  auto memory = answers.Named("memory");
  ASSERT_EQ(memory.size(), 1u);
  EXPECT_EQ(memory[0].info.source, CacheSource::kMemory);
  EXPECT_EQ(*memory[0].result, *compiled[0].result) << "the same entry, from memory";
}

TEST_F(CompileServiceTest, OneKeySubmittedByManyTenantsCompilesOnce) {
  Answers answers;
  for (int t = 0; t < 5; ++t) {
    service_->Submit(Request(kSaxpy), "tenant" + std::to_string(t), answers.For("saxpy"));
  }
  ASSERT_TRUE(answers.WaitFor(5));
  int compiled = 0, joined = 0;
  for (const auto& a : answers.All()) {
    ASSERT_TRUE(a.result.ok()) << a.result.status().ToString();
    compiled += a.info.source == CacheSource::kCompiled;
    joined += a.info.source == CacheSource::kPeer || a.info.source == CacheSource::kMemory;
  }
  EXPECT_EQ(compiled, 1);
  EXPECT_EQ(joined, 4);
  EXPECT_EQ(service_->stats().compiles, 1u);
}

TEST_F(CompileServiceTest, OneTenantsSlowCompilesDoNotHoldUpAnothers) {
  CompileServiceOptions o;
  o.max_concurrent = 2;
  o.limits.wall = std::chrono::seconds(120);
  auto s = Make(o);
  ASSERT_TRUE(s->WaitForWarmHelpers(std::chrono::seconds(30)));
  Answers answers;
  for (int i = 0; i < 6; ++i) s->Submit(Request(SlowSource(i)), "a", answers.For("a"));
  s->Submit(Request(kSaxpy), "b", answers.For("b"));
  ASSERT_TRUE(answers.WaitFor(7));
  std::vector<std::string> order;
  for (const auto& a : answers.All()) {
    ASSERT_TRUE(a.result.ok()) << a.name << ": " << a.result.status().ToString();
    EXPECT_TRUE((*a.result)->ok) << (*a.result)->log;
    order.push_back(a.name);
  }
  // Two of a's compiles had the two compile threads when b's came; b's went
  // next but one, by round robin, not after all of a's.
  const auto b = std::find(order.begin(), order.end(), "b") - order.begin();
  EXPECT_LE(b, 3) << "completions: " << ::testing::PrintToString(order);
}

// A tenant that asks for what another tenant's queued compile will build
// waits for that compile: it waited in the other tenant's queue, behind all
// of that tenant's work. The compile is queued for it too, and goes at the
// first turn of either.
TEST_F(CompileServiceTest, JoiningAnotherTenantsQueuedCompileKeepsOnesOwnTurn) {
  CompileServiceOptions o;
  o.max_concurrent = 1;
  o.limits.wall = std::chrono::seconds(120);
  auto s = Make(o);
  ASSERT_TRUE(s->WaitForWarmHelpers(std::chrono::seconds(30)));
  Answers answers;
  for (int i = 0; i < 6; ++i) s->Submit(Request(SlowSource(i)), "a", answers.For("a"));
  s->Submit(Request(kSaxpy), "a", answers.For("a-saxpy"));
  s->Submit(Request(kSaxpy), "b", answers.For("b"));
  ASSERT_TRUE(answers.WaitFor(8));
  std::vector<std::string> order;
  for (const auto& a : answers.All()) {
    ASSERT_TRUE(a.result.ok()) << a.name << ": " << a.result.status().ToString();
    order.push_back(a.name);
  }
  // One of a's had the compile thread when b's came, and a's turn was next:
  // the third compile was b's (answering a's saxpy too, just before b).
  const auto b = std::find(order.begin(), order.end(), "b") - order.begin();
  EXPECT_LE(b, 3) << "completions: " << ::testing::PrintToString(order);
  EXPECT_EQ(s->stats().compiles, 7u) << "the shared kernel compiled once";
}

// A compile that failed for want of descriptors in this process was
// answered resource_exhausted and remembered for the negative TTL, as a
// source that hit its bound is: every submit of that kernel failed for a
// minute after the shortage had passed. It is unavailable, and not kept.
TEST_F(CompileServiceTest, AFailureOfThisProcessIsNotRememberedAsTheSources) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  // The sanitizers' runtime opens files of its own (UBSan's check of a
  // vtable read the process's maps): with no descriptor left it reported
  // an object it could not check as invalid. The Release build runs this.
  GTEST_SKIP() << "no descriptors to spare under a sanitizer";
#endif
  CompileServiceOptions o;
  o.warm_helpers = 0;  // each compile starts its helper: pipes, then a spawn
  auto s = Make(o);
  rlimit was{};
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &was), 0);
  size_t open_now = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) {
    ++open_now;
  }
  rlimit tight = was;
  tight.rlim_cur = open_now;  // no descriptor left to open
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &tight), 0);
  auto starved = s->Compile(Request(kSaxpy));
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &was), 0);
  ASSERT_FALSE(starved.ok());
  EXPECT_EQ(starved.status().code(), Code::kUnavailable) << starved.status().ToString();
  CompileInfo info;
  auto again = s->Compile(Request(kSaxpy), &info);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_TRUE((*again)->ok);
  EXPECT_EQ(info.source, CacheSource::kCompiled);
}

TEST_F(CompileServiceTest, ACompileStoppedAtItsBoundIsRememberedForTheNegativeTtl) {
  auto offset = std::make_shared<std::atomic<int64_t>>(0);  // ms added to the clock
  CompileServiceOptions o;
  o.limits.wall = std::chrono::milliseconds(300);
  o.negative_ttl = std::chrono::seconds(60);
  o.clock = [offset] {
    return std::chrono::steady_clock::now() + std::chrono::milliseconds(offset->load());
  };
  auto s = Make(o);
  ASSERT_TRUE(s->WaitForWarmHelpers(std::chrono::seconds(30)));
  const CompileRequest bomb = Request(SlowSource(0));
  auto first = s->Compile(bomb);
  ASSERT_FALSE(first.ok());
  EXPECT_EQ(first.status().code(), Code::kTimeout);
  const auto helpers_used = [&] { return s->helpers().counts().warm + s->helpers().counts().cold; };
  const uint64_t used = helpers_used();

  // A retry, synchronous or not, is answered from memory: the same code, no helper.
  auto again = s->Compile(bomb);
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.status().code(), Code::kTimeout);
  EXPECT_NE(again.status().message().find("remembered"), std::string::npos);
  Answers answers;
  s->Submit(bomb, "t", answers.For("bomb"));
  ASSERT_TRUE(answers.WaitFor(1));
  EXPECT_EQ(answers.All()[0].result.status().code(), Code::kTimeout);
  EXPECT_EQ(answers.All()[0].info.source, CacheSource::kMemory);
  EXPECT_EQ(helpers_used(), used);
  EXPECT_EQ(s->stats().negative_hits, 2u);

  // Past the TTL it is compiled again (and stopped again).
  offset->store(61000);
  auto later = s->Compile(bomb);
  ASSERT_FALSE(later.ok());
  EXPECT_EQ(later.status().code(), Code::kTimeout);
  EXPECT_EQ(later.status().message().find("remembered"), std::string::npos);
  EXPECT_EQ(helpers_used(), used + 1);
  auto st = s->cache().Stats();
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->entries, 0u) << "never stored in SQLite";
}

TEST_F(CompileServiceTest, StoppingAnswersEveryPendingCallbackWithUnavailable) {
  CompileServiceOptions o;
  o.max_concurrent = 1;
  o.limits.wall = std::chrono::seconds(60);
  auto s = Make(o);
  Answers answers;
  s->Submit(Request(kMacroBomb), "a", answers.For("bomb"));
  for (int i = 0; i < 3; ++i) {
    s->Submit(Request(std::string(kSaxpy) + "// " + std::to_string(i)), i % 2 ? "a" : "b",
              answers.For("small"));
  }
  // The bomb holds the one compile thread once taken; the others wait.
  for (int i = 0; i < 1000 && s->stats().queued != 3; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_EQ(s->stats().queued, 3u);
  const auto t0 = std::chrono::steady_clock::now();
  s.reset();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10))
      << "the stop waited for the bomb instead of stopping it";
  auto all = answers.All();
  ASSERT_EQ(all.size(), 4u) << "every callback exactly once";
  for (const auto& a : all) {
    ASSERT_FALSE(a.result.ok()) << a.name;
    EXPECT_EQ(a.result.status().code(), Code::kUnavailable) << a.name;
    EXPECT_EQ(a.result.status().message(), "compile service stopping") << a.name;
  }
}

// ------------------------------------------------------------ a damaged cache

class DamagedCacheTest : public CompileServiceTest {
 protected:
  // The files that Open() moved aside from `name`.
  std::vector<std::string> MovedAside(const std::string& name) {
    std::vector<std::string> out;
    for (const auto& e : std::filesystem::directory_iterator(dir_.path())) {
      const std::string f = e.path().filename().string();
      if (f.rfind(name + ".damaged-", 0) == 0 && f.find("-wal") == std::string::npos &&
          f.find("-shm") == std::string::npos) {
        out.push_back(e.path().string());
      }
    }
    return out;
  }
  // A fresh, working cache: a compile is a miss, then stored.
  void ExpectFreshAndServing(CompileService& s) {
    CompileInfo info;
    auto e = s.Compile(Request(kSaxpy), &info);
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    EXPECT_TRUE((*e)->ok);
    EXPECT_EQ(info.source, CacheSource::kCompiled);
    auto st = s.cache().Stats();
    ASSERT_TRUE(st.ok()) << st.status().ToString();
    EXPECT_EQ(st->entries, 1u);
    EXPECT_EQ(st->misses, 1u);
  }
};

TEST_F(DamagedCacheTest, AFileOfRandomBytesIsMovedAsideAndAFreshCacheServes) {
  std::string garbage(64 << 10, '\0');
  std::mt19937 rng(7);
  for (char& c : garbage) c = static_cast<char>(rng());
  testing::WriteFile(dir_.File("garbage.db"), garbage);
  CompileServiceOptions o;
  o.cache_path = dir_.File("garbage.db");
  auto s = Make(o);
  ASSERT_NE(s, nullptr);
  EXPECT_NE(s->cache().set_aside().find("garbage.db was damaged (file is not a database)"),
            std::string::npos)
      << s->cache().set_aside();
  auto moved = MovedAside("garbage.db");
  ASSERT_EQ(moved.size(), 1u);
  EXPECT_EQ(testing::ReadFile(moved[0]), garbage) << "the damaged file is kept as it was";
  EXPECT_NE(s->cache().set_aside().find(moved[0]), std::string::npos);
  ExpectFreshAndServing(*s);
}

TEST_F(DamagedCacheTest, ATruncatedCacheIsMovedAsideAndAFreshCacheServes) {
  CompileServiceOptions o;
  o.cache_path = dir_.File("truncated.db");
  {
    auto full = Make(o);
    for (int i = 0; i < 4; ++i) {
      ASSERT_TRUE(full->Compile(Request(std::string(kSaxpy) + "// " + std::to_string(i))).ok());
    }
  }  // closed: the WAL is checkpointed into the file and removed
  ASSERT_FALSE(std::filesystem::exists(o.cache_path + "-wal"));
  const auto size = std::filesystem::file_size(o.cache_path);
  std::filesystem::resize_file(o.cache_path, size / 2);
  auto s = Make(o);
  ASSERT_NE(s, nullptr);
  EXPECT_NE(s->cache().set_aside().find("truncated.db was damaged"), std::string::npos)
      << s->cache().set_aside();
  auto moved = MovedAside("truncated.db");
  ASSERT_EQ(moved.size(), 1u);
  EXPECT_EQ(std::filesystem::file_size(moved[0]), size / 2);
  ExpectFreshAndServing(*s);
}

TEST_F(DamagedCacheTest, TablesOfAnotherShapeAreMovedAside) {
  const std::string path = dir_.File("other.db");
  {
    auto db = sql::Db::Open(path);
    ASSERT_TRUE(db.ok());
    ASSERT_TRUE(db->Exec("CREATE TABLE kernels(key BLOB PRIMARY KEY, image BLOB)").ok());
  }
  CompileServiceOptions o;
  o.cache_path = path;
  auto s = Make(o);
  ASSERT_NE(s, nullptr);
  EXPECT_NE(s->cache().set_aside().find("table kernels is not of this format"),
            std::string::npos)
      << s->cache().set_aside();
  ExpectFreshAndServing(*s);
}

TEST_F(DamagedCacheTest, ASoundCacheIsLeftAsItIs) {
  ASSERT_TRUE(Compile(Request(kSaxpy)).ok());
  auto again = Make();
  ASSERT_NE(again, nullptr);
  EXPECT_EQ(again->cache().set_aside(), "");
  EXPECT_TRUE(MovedAside("kernels.db").empty());
  CompileInfo info;
  ASSERT_TRUE(again->Compile(Request(kSaxpy), &info).ok());
  EXPECT_EQ(info.source, CacheSource::kDisk);
}

// ------------------------------------------------------------ untrusted source

// Every test here runs twice: with helpers in a user and mount namespace and
// under Landlock (where the kernel allows namespaces; elsewhere both runs are
// Landlock alone), and with Landlock alone, as on hosts without user
// namespaces. Each compile is served by a warm helper.
class SandboxTest : public CompileServiceTest, public ::testing::WithParamInterface<bool> {
 protected:
  void SetUp() override {
    CompileServiceOptions o;
    o.namespaces = GetParam();
    o.max_concurrent = 2;
    service_ = Make(o);
    ASSERT_NE(service_, nullptr);
    ASSERT_TRUE(service_->WaitForWarmHelpers(std::chrono::seconds(30)));
    // A file the sandbox must never let a kernel read. Its content would be
    // echoed by NVRTC (#error) if it were ever opened.
    secret_ = dir_.File("secret.h");
    testing::WriteFile(secret_, "#error " + std::string(kToken) + "\n");
    symlink(secret_.c_str(), dir_.File("link.h").c_str());
  }
  void TearDown() override {
    EXPECT_EQ(service_->helpers().counts().cold, 0u)
        << "a compile started its own helper instead of taking a warm one";
  }
  void ExpectRefused(const std::string& source) {
    auto e = Compile(Request(source));
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    EXPECT_FALSE((*e)->ok) << source;
    EXPECT_EQ((*e)->log.find(kToken), std::string::npos)
        << "the log holds the secret file's content:\n"
        << (*e)->log;
  }
  // The outcome of compiling `source` with `path` in place of PATH, and the
  // log with the path written back as PATH and runs of spaces as one (the
  // caret under an echoed line moves with the path's length).
  struct Outcome {
    bool ok;
    Code code;
    std::string log, ptx;
  };
  Outcome With(const std::string& source, const std::string& path) {
    std::string text = source;
    for (size_t at; (at = text.find("PATH")) != std::string::npos;) text.replace(at, 4, path);
    auto e = Compile(Request(text));
    EXPECT_TRUE(e.ok()) << e.status().ToString();
    if (!e.ok()) return {};
    std::string log = (*e)->log;
    for (size_t at; (at = log.find(path)) != std::string::npos;) log.replace(at, path.size(), "PATH");
    std::string squeezed;
    for (char c : log) {
      if (!(c == ' ' && !squeezed.empty() && squeezed.back() == ' ')) squeezed += c;
    }
    return {(*e)->ok, (*e)->code, squeezed, (*e)->ptx};
  }
  // Pairs of host paths, one that exists and one that does not, that a
  // kernel must not be able to tell apart.
  std::vector<std::pair<std::string, std::string>> ExistingAndMissing() {
    std::vector<std::pair<std::string, std::string>> pairs = {
        {secret_, dir_.File("absent.h")},
        {secret_ + "/x.h", dir_.File("absent.h/x.h")},  // a file as a directory: ENOTDIR
        {"../../../../../../../.." + secret_, "../../../../../../../.." + dir_.File("absent.h")},
        {"/proc/self/environ", "/proc/self/environs"},
    };
    if (access("/etc/hostname", F_OK) == 0) {
      pairs.push_back({"/etc/hostname", "/etc/no-such-file"});
      pairs.push_back({"../../../../../../../../etc/hostname",
                       "../../../../../../../../etc/no-such-file"});
    }
    return pairs;
  }
  static constexpr char kToken[] = "gpuq_secret_7f3a9c";
  std::string secret_;
};

INSTANTIATE_TEST_SUITE_P(Isolation, SandboxTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& p) {
                           return p.param ? "NamespacesAndLandlock" : "LandlockAlone";
                         });

TEST_P(SandboxTest, AbsoluteIncludeOfAHostFileIsASandboxViolation) {
  auto e = Compile(Request("#include \"" + secret_ + "\"\n"));
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  EXPECT_FALSE((*e)->ok);
  EXPECT_EQ((*e)->code, Code::kSandboxViolation);
  EXPECT_NE((*e)->log.find("may include only the CUDA toolkit's headers"), std::string::npos)
      << (*e)->log;
  EXPECT_EQ((*e)->log.find(kToken), std::string::npos);
}

TEST_P(SandboxTest, IncludePathsBuiltByMacrosAreRefused) {
  ExpectRefused("#define STR2(x) #x\n#define STR(x) STR2(x)\n#define P " + secret_ +
                "\n#include STR(P)\n");
  ExpectRefused("#define Q \"" + secret_ + "\"\n#include Q\n");
  ExpectRefused("#include </etc/passwd>\n");
}

TEST_P(SandboxTest, TraversalProcAndSymlinkPathsAreRefused) {
  ExpectRefused("#include <../../../../../../../../" + secret_ + ">\n");
  ExpectRefused("#include \"/proc/self/root" + secret_ + "\"\n");
  ExpectRefused("#include \"" + dir_.File("link.h") + "\"\n");
  ExpectRefused("#include \"/proc/self/environ\"\n");
  ExpectRefused("#include \"/dev/stdin\"\n");
  ExpectRefused("#include \"/proc/self/fd/0\"\n");
}

TEST_P(SandboxTest, PragmaAndLineTricksReadNothing) {
  ExpectRefused("#line 1 \"" + secret_ + "\"\n#include __FILE__\n");
  ExpectRefused("_Pragma(\"once\")\n#include \"" + secret_ + "\"\n");
}

TEST_P(SandboxTest, AnExistingAndAMissingHostFileGiveTheSameAnswer) {
  for (const auto& [existing, missing] : ExistingAndMissing()) {
    for (std::string source : {"#include \"PATH\"\n", "#include <PATH>\n"}) {
      Outcome there = With(source, existing), absent = With(source, missing);
      EXPECT_FALSE(there.ok);
      EXPECT_EQ(CodeName(there.code), CodeName(absent.code)) << existing << " / " << missing;
      EXPECT_EQ(there.log, absent.log) << existing << " / " << missing;
      EXPECT_EQ(there.log.find(kToken), std::string::npos);
    }
  }
  // The code follows the path's text: outside the toolkit (absolute
  // elsewhere, or climbing with ..) is a violation; a plain missing header is
  // a compile error.
  EXPECT_EQ(With("#include \"PATH\"\n", "/etc/no-such-file").code, Code::kSandboxViolation);
  EXPECT_EQ(With("#include \"PATH\"\n", "../no-such-file").code, Code::kSandboxViolation);
  EXPECT_EQ(With("#include \"PATH\"\n", "no-such-file.h").code, Code::kCompileError);
  EXPECT_EQ(With("#include \"PATH\"\n", "etc/hostname").code, Code::kCompileError);
}

TEST_P(SandboxTest, HasIncludeIsFalseForAnExistingAndAMissingHostFile) {
  constexpr char kProbe[] =
      "#if __has_include(\"PATH\")\n#define FOUND 7\n#else\n#define FOUND 3\n#endif\n"
      "extern \"C\" __global__ void k(int* out) { out[0] = FOUND; }\n";
  const Outcome found = With(kProbe, "cuda_fp16.h");  // a toolkit header: true
  ASSERT_TRUE(found.ok) << found.log;
  EXPECT_NE(found.ptx.find(", 7;"), std::string::npos) << found.ptx;
  for (const auto& [existing, missing] : ExistingAndMissing()) {
    Outcome there = With(kProbe, existing), absent = With(kProbe, missing);
    ASSERT_TRUE(there.ok) << there.log;
    ASSERT_TRUE(absent.ok) << absent.log;
    EXPECT_EQ(there.ptx, absent.ptx) << existing << " / " << missing;
    EXPECT_NE(there.ptx.find(", 3;"), std::string::npos) << existing << "\n" << there.ptx;
  }
}

TEST_P(SandboxTest, AWarmHelperIsConfinedBeforeItReadsItsRequest) {
  std::vector<pid_t> pids = service_->helpers().WaitingPids();
  ASSERT_FALSE(pids.empty());
  const std::string proc = "/proc/" + std::to_string(pids[0]);
  // It is blocked reading its request (read(0, ...)); it may still be on
  // its way there from saying it is ready ...
  std::string syscall_line = testing::ReadFile(proc + "/syscall");
  for (int i = 0; i < 200 && syscall_line.rfind("running", 0) == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    syscall_line = testing::ReadFile(proc + "/syscall");
  }
  EXPECT_EQ(syscall_line.substr(0, syscall_line.find(' ')), std::to_string(SYS_read))
      << syscall_line;
  EXPECT_EQ(syscall_line.substr(syscall_line.find(' ') + 1, 4), "0x0 ") << syscall_line;
  // ... already under no_new_privs (which Landlock needs) and its limits ...
  EXPECT_NE(testing::ReadFile(proc + "/status").find("NoNewPrivs:\t1"), std::string::npos);
  const std::string limits = testing::ReadFile(proc + "/limits");
  const std::string want = std::to_string(service_->options().limits.memory_bytes);
  EXPECT_NE(limits.find("Max data size             " + want), std::string::npos) << limits;
  EXPECT_NE(limits.find("Max file size             0"), std::string::npos) << limits;
  // ... and, in a namespace, in a file system that holds the toolkit only.
  const std::string include = DefaultCudaInclude();
  const std::string top = include.substr(0, include.find('/', 1));
  if (GetParam()) {
    char ours[64] = {}, its[64] = {};
    ASSERT_GT(readlink("/proc/self/ns/mnt", ours, sizeof ours - 1), 0);
    ASSERT_GT(readlink((proc + "/ns/mnt").c_str(), its, sizeof its - 1), 0);
    if (std::string(ours) == its) {
      GTEST_SKIP() << "user namespaces are not allowed here: Landlock alone confines helpers";
    }
    std::vector<std::string> names;
    for (const auto& e : std::filesystem::directory_iterator(proc + "/root")) {
      names.push_back("/" + e.path().filename().string());
    }
    EXPECT_EQ(names, std::vector<std::string>{top});
    EXPECT_TRUE(std::filesystem::exists(proc + "/root" + include + "/cuda.h"));
    EXPECT_FALSE(std::filesystem::exists(proc + "/root" + secret_));
    EXPECT_FALSE(std::filesystem::exists(proc + "/root/etc"));
    EXPECT_FALSE(std::filesystem::exists(proc + "/root/proc/self"));
  } else {
    char ours[64] = {}, its[64] = {};
    ASSERT_GT(readlink("/proc/self/ns/mnt", ours, sizeof ours - 1), 0);
    ASSERT_GT(readlink((proc + "/ns/mnt").c_str(), its, sizeof its - 1), 0);
    EXPECT_EQ(std::string(ours), its) << "asked for Landlock alone";
  }
}

TEST(SandboxedCompilerTest, AHelperSaysHowItIsConfined) {
  SandboxOptions landlock;
  landlock.namespaces = false;
  auto helper = SandboxedCompiler(landlock).Start();
  ASSERT_TRUE(helper.ok()) << helper.status().ToString();
  auto isolation = helper->WaitReady(std::chrono::steady_clock::now() + std::chrono::seconds(30));
  ASSERT_TRUE(isolation.ok()) << isolation.status().ToString();
  EXPECT_EQ(*isolation, Isolation::kLandlock);

  auto namespaced = SandboxedCompiler().Start();
  ASSERT_TRUE(namespaced.ok()) << namespaced.status().ToString();
  isolation = namespaced->WaitReady(std::chrono::steady_clock::now() + std::chrono::seconds(30));
  ASSERT_TRUE(isolation.ok()) << isolation.status().ToString();
  std::printf("helpers here run with %s\n", std::string(IsolationName(*isolation)).c_str());
  // The helper serves exactly one request.
  CompileRequest saxpy;
  saxpy.source = kSaxpy;
  saxpy.arch = "sm_90";
  auto out = SandboxedCompiler().Run(*namespaced, saxpy);
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  EXPECT_TRUE(out->ok) << out->log;
}

// The NUL-separated strings of a /proc file (cmdline, environ).
std::vector<std::string> ProcStrings(pid_t pid, const std::string& file) {
  const std::string raw = testing::ReadFile("/proc/" + std::to_string(pid) + "/" + file);
  std::vector<std::string> out;
  for (size_t at = 0; at < raw.size();) {
    size_t end = raw.find('\0', at);
    if (end == std::string::npos) end = raw.size();
    out.push_back(raw.substr(at, end - at));
    at = end + 1;
  }
  return out;
}

// NVRTC's first compile for an architecture costs more when it last
// compiled for another: helpers started after a compile warm up for its.
TEST_F(CompileServiceTest, HelpersStartedAfterACompileWarmUpForItsArchitecture) {
  for (const std::string arch : {"sm_80", "compute_90"}) {
    auto e = Compile(Request(kSaxpy + std::string("// ") + arch + "\n", arch));
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    ASSERT_TRUE((*e)->ok) << (*e)->log;
    ASSERT_TRUE(service_->WaitForWarmHelpers(std::chrono::seconds(30)));
    std::vector<std::string> warm_archs;
    for (pid_t pid : service_->helpers().WaitingPids()) {
      const std::vector<std::string> args = ProcStrings(pid, "cmdline");
      if (!args.empty()) warm_archs.push_back(args.back());
    }
    EXPECT_NE(std::find(warm_archs.begin(), warm_archs.end(), arch), warm_archs.end())
        << "the waiting helpers warm up for: " << ::testing::PrintToString(warm_archs);
  }
}

// NVRTC keeps machine code in the driver's compute cache where a driver is
// installed; a helper is told not to use it, whatever its parent's setting.
TEST(SandboxedCompilerTest, HelpersAreToldNotToUseTheDriversComputeCache) {
  // No other thread runs here (no service), so changing the environment is safe.
  setenv("CUDA_CACHE_DISABLE", "0", 1);
  auto helper = SandboxedCompiler().Start();
  unsetenv("CUDA_CACHE_DISABLE");
  ASSERT_TRUE(helper.ok()) << helper.status().ToString();
  ASSERT_TRUE(helper->WaitReady(std::chrono::steady_clock::now() + std::chrono::seconds(30)).ok());
  std::vector<std::string> cache_settings;
  for (const std::string& var : ProcStrings(helper->pid(), "environ")) {
    if (var.rfind("CUDA_CACHE_DISABLE=", 0) == 0) cache_settings.push_back(var);
  }
  EXPECT_EQ(cache_settings, std::vector<std::string>{"CUDA_CACHE_DISABLE=1"});
}

TEST(SandboxedCompilerTest, AWarmUpArchitectureItCannotTargetIsIgnored) {
  for (const std::string& arch :
       std::vector<std::string>{"sm_10", "sm_90; touch /tmp/x", std::string(300, 'a')}) {
    auto helper = SandboxedCompiler().Start(arch);
    ASSERT_TRUE(helper.ok()) << helper.status().ToString();
    CompileRequest saxpy;
    saxpy.source = kSaxpy;
    saxpy.arch = "sm_90";
    auto out = SandboxedCompiler().Run(*helper, saxpy);
    ASSERT_TRUE(out.ok()) << arch << ": " << out.status().ToString();
    EXPECT_TRUE(out->ok) << out->log;
  }
}

// ------------------------------------------------------------ bounds

using BoundsTest = CompileServiceTest;

TEST_F(BoundsTest, CompileBombIsStoppedAtItsWallTimeAndNotCached) {
  CompileServiceOptions o;
  o.limits.wall = std::chrono::milliseconds(1500);
  auto s = Make(o);
  auto e = s->Compile(Request(kMacroBomb));
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), Code::kTimeout);
  EXPECT_NE(e.status().message().find("1500 ms"), std::string::npos);
  auto st = s->cache().Stats();
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->entries, 0u) << "a timeout says nothing about the source: not cached";
}

TEST_F(BoundsTest, CompileOverItsMemoryBoundIsStoppedAndNotCached) {
  CompileServiceOptions o;
  o.limits.memory_bytes = 512ull << 20;
  o.limits.wall = std::chrono::seconds(60);
  auto s = Make(o);
  auto e = s->Compile(Request(kMacroBomb));
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), Code::kResourceExhausted) << e.status().ToString();
  auto st = s->cache().Stats();
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->entries, 0u);
}

TEST_F(BoundsTest, AHungCompileDoesNotHoldUpOthers) {
  CompileServiceOptions o;
  o.limits.wall = std::chrono::seconds(20);
  o.max_concurrent = 2;
  auto s = Make(o);
  auto bomb = std::async(std::launch::async, [&] { return s->Compile(Request(kMacroBomb)); });
  // The small compile finishes while the bomb is still running.
  auto small = s->Compile(Request(kSaxpy));
  ASSERT_TRUE(small.ok()) << small.status().ToString();
  EXPECT_TRUE((*small)->ok);
  EXPECT_EQ(bomb.wait_for(std::chrono::seconds(0)), std::future_status::timeout)
      << "the bomb ended before the small compile: the test proves nothing";
  bomb.wait();
}

// ------------------------------------------------------------ several processes

TEST(CommandLineTest, EveryCommandStarts) {
  // An option clash in any command makes CLI11 throw before anything runs.
  for (std::string cmd : {"", "submit", "status", "result", "cancel", "stats", "top", "devices",
                          "compile", "cache", "cache stats", "cache ls", "cache prune",
                          "keygen"}) {
    std::string out;
    int rc = testing::RunProgram({"/bin/sh", "-c", testing::BinPath("gpuq") + " " + cmd +
                                                       " --help 2>&1"},
                                 &out);
    EXPECT_EQ(rc, 0) << "gpuq " << cmd << " --help:\n" << out;
  }
}

TEST(CompileCommandTest, SameFileTwiceIsAMissThenAHitWithTheSameKey) {
  TempDir dir;
  testing::WriteFile(dir.File("k.cu"), kSaxpy);
  std::vector<nlohmann::json> runs;
  for (int i = 0; i < 2; ++i) {
    std::string out;
    ASSERT_EQ(testing::RunProgram({testing::BinPath("gpuq"), "compile", dir.File("k.cu"), "--arch",
                                   "sm_90", "--kernel", "saxpy", "--cache", dir.File("c.db"),
                                   "--json"},
                                  &out),
              0)
        << out;
    runs.push_back(nlohmann::json::parse(out));
  }
  EXPECT_EQ(runs[0]["cache"], "miss");
  EXPECT_EQ(runs[1]["cache"], "hit");
  EXPECT_EQ(runs[0]["key"], runs[1]["key"]);
  EXPECT_GT(runs[1]["cubin_bytes"].get<int>(), 0);
  // A compile error exits non-zero and prints the log.
  testing::WriteFile(dir.File("bad.cu"), "extern \"C\" __global__ void k() { nope(); }\n");
  std::string out;
  EXPECT_EQ(testing::RunProgram({testing::BinPath("gpuq"), "compile", dir.File("bad.cu"),
                                 "--cache", dir.File("c.db"), "--json"},
                                &out),
            1);
  EXPECT_NE(out.find("nope"), std::string::npos) << out;
}

TEST(CacheAcrossProcessesTest, TwoProcessesCompilingOneKeyCompileItOnce) {
  TempDir dir;
  testing::WriteFile(dir.File("k.cu"), kSaxpy);
  const std::string gpuq = testing::BinPath("gpuq");
  const std::string cache = dir.File("shared.db");
  auto run = [&] {
    std::string out;
    int rc = testing::RunProgram(
        {gpuq, "compile", dir.File("k.cu"), "--arch", "sm_90", "--cache", cache, "--json"},
        &out);
    EXPECT_EQ(rc, 0) << out;
    return nlohmann::json::parse(out, nullptr, false);
  };
  auto a = std::async(std::launch::async, run);
  auto b = std::async(std::launch::async, run);
  auto ja = a.get(), jb = b.get();
  ASSERT_FALSE(ja.is_discarded());
  ASSERT_FALSE(jb.is_discarded());
  int compiled = (ja["source"] == "compiled") + (jb["source"] == "compiled");
  EXPECT_EQ(compiled, 1) << ja.dump() << "\n" << jb.dump();
  EXPECT_EQ(ja["key"], jb["key"]);
  auto c = KernelCache::Open(cache);
  ASSERT_TRUE(c.ok());
  auto st = (*c)->Stats();
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->entries, 1u);
}

TEST(CacheAcrossProcessesTest, ManyProcessesAndKeysLeaveTheFileConsistent) {
  TempDir dir;
  const std::string gpuq = testing::BinPath("gpuq");
  const std::string cache = dir.File("shared.db");
  constexpr int kKeys = 4, kProcesses = 6;
  for (int k = 0; k < kKeys; ++k) {
    testing::WriteFile(dir.File("k" + std::to_string(k) + ".cu"),
                       std::string(kSaxpy) + "// " + std::to_string(k) + "\n");
  }
  std::vector<std::future<std::vector<std::string>>> procs;
  for (int p = 0; p < kProcesses; ++p) {
    procs.push_back(std::async(std::launch::async, [&, p] {
      std::vector<std::string> sources;
      for (int i = 0; i < kKeys; ++i) {
        int k = (i + p) % kKeys;
        std::string out;
        int rc = testing::RunProgram({gpuq, "compile", dir.File("k" + std::to_string(k) + ".cu"),
                                      "--cache", cache, "--json"},
                                     &out);
        EXPECT_EQ(rc, 0) << out;
        auto j = nlohmann::json::parse(out, nullptr, false);
        sources.push_back(j.is_discarded() ? "?" : j["source"].get<std::string>());
      }
      return sources;
    }));
  }
  int compiled = 0;
  for (auto& p : procs) {
    for (const auto& s : p.get()) compiled += s == "compiled";
  }
  EXPECT_EQ(compiled, kKeys) << "each key compiled exactly once across all processes";
  auto c = KernelCache::Open(cache);
  ASSERT_TRUE(c.ok());
  auto st = (*c)->Stats();
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->entries, static_cast<uint64_t>(kKeys));
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(cache.c_str(), &db), SQLITE_OK);
  sqlite3_stmt* s = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(db, "PRAGMA integrity_check", -1, &s, nullptr), SQLITE_OK);
  ASSERT_EQ(sqlite3_step(s), SQLITE_ROW);
  EXPECT_STREQ(reinterpret_cast<const char*>(sqlite3_column_text(s, 0)), "ok");
  sqlite3_finalize(s);
  sqlite3_close(db);
}

TEST(KernelCacheTest, AClaimOfADeadProcessIsTakenOver) {
  TempDir dir;
  auto c = KernelCache::Open(dir.File("k.db"));
  ASSERT_TRUE(c.ok());
  Digest key{};
  key[0] = 1;
  pid_t child = fork();
  if (child == 0) {
    auto mine = KernelCache::Open(dir.File("k.db"));
    _exit(mine.ok() && (*mine)->TryClaim(key, std::chrono::hours(1)).ok() ? 0 : 1);
  }
  int status = 0;
  waitpid(child, &status, 0);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  auto claim = (*c)->TryClaim(key, std::chrono::hours(1));
  ASSERT_TRUE(claim.ok());
  EXPECT_EQ(*claim, KernelCache::Claim::kOwned);
}

TEST(KernelCacheTest, AClaimOfALiveProcessIsRespected) {
  TempDir dir;
  auto c = KernelCache::Open(dir.File("k.db"));
  ASSERT_TRUE(c.ok());
  Digest key{};
  key[0] = 2;
  int go[2];
  ASSERT_EQ(pipe(go), 0);
  pid_t child = fork();
  if (child == 0) {
    auto mine = KernelCache::Open(dir.File("k.db"));
    bool ok = mine.ok() && (*mine)->TryClaim(key, std::chrono::hours(1)).ok();
    char b = ok ? 1 : 0;
    (void)!write(go[1], &b, 1);
    pause();  // alive, holding the claim, until killed
    _exit(0);
  }
  char b = 0;
  ASSERT_EQ(read(go[0], &b, 1), 1);
  ASSERT_EQ(b, 1);
  auto claim = (*c)->TryClaim(key, std::chrono::hours(1));
  kill(child, SIGKILL);
  waitpid(child, nullptr, 0);
  close(go[0]);
  close(go[1]);
  ASSERT_TRUE(claim.ok());
  EXPECT_EQ(*claim, KernelCache::Claim::kBusy);
}

}  // namespace
}  // namespace gpuq::compile
