// Jobs of several launches on a real GPU (PROTOCOL.md, "Jobs of several
// launches"): results against CPU references on fresh random inputs, scratch
// buffers that never leave the GPU, graphs replayed with new parameters
// giving the results of plain launches, and a fault that names its launch.
#include <cmath>
#include <numeric>

#include "tests/gpu/gpu_fixture.h"

namespace gpuq::testing {
namespace {

using schema::Arg;
using schema::JobState;
using schema::KernelLaunch;

class LaunchesGpuTest : public GpuFixture {
 protected:
  static void SetUpTestSuite() { StartBroker("1"); }
  static void TearDownTestSuite() { StopBroker(); }

  static KernelLaunch Launch(const std::string& entry, uint32_t grid, uint32_t block,
                             std::vector<Arg> args, uint32_t source = 0) {
    KernelLaunch l;
    l.source = source;
    l.entry = entry;
    l.launch.grid = {grid, 1, 1};
    l.launch.block = {block, 1, 1};
    l.args = std::move(args);
    return l;
  }

  std::vector<float> Random(size_t n) {
    std::uniform_real_distribution<float> d(-1.0f, 1.0f);
    std::vector<float> v(n);
    for (float& x : v) x = d(rng_);
    return v;
  }
};

// Pass 1: each block sums its slice into part[block]. Pass 2 (from a second
// source): one block sums the parts.
constexpr char kPartial[] = R"(
extern "C" __global__ void partial(const float* x, float* part, unsigned n) {
  __shared__ float s[256];
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  s[threadIdx.x] = i < n ? x[i] : 0.0f;
  __syncthreads();
  for (unsigned w = blockDim.x / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) s[threadIdx.x] += s[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) part[blockIdx.x] = s[0];
}
)";
constexpr char kTotal[] = R"(
extern "C" __global__ void total(const float* part, float* out, unsigned n) {
  __shared__ float s[256];
  float acc = 0.0f;
  for (unsigned i = threadIdx.x; i < n; i += blockDim.x) acc += part[i];
  s[threadIdx.x] = acc;
  __syncthreads();
  for (unsigned w = blockDim.x / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) s[threadIdx.x] += s[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = s[0];
}
)";

TEST_F(LaunchesGpuTest, ATwoPassReductionMatchesTheCpu) {
  const uint32_t n = 1 << 20, blocks = n / 256;
  for (bool graph : {false, true, true}) {
    const std::vector<float> x = Random(n);
    JobRequest j;
    j.spec.kernel.source = kPartial;
    j.spec.sources.emplace_back().source = kTotal;
    j.spec.buffers = {Arg::In(0), Arg::Scratch(blocks * 4), Arg::Out(4)};
    j.spec.launches = {Launch("partial", blocks, 256, {Arg::Ref(0), Arg::Ref(1), Arg::U32(n)}),
                       Launch("total", 1, 256, {Arg::Ref(1), Arg::Ref(2), Arg::U32(blocks)}, 1)};
    j.spec.graph = graph;
    j.inputs = {Keep(x)};
    JobResult r = Run(j);
    ASSERT_EQ(r.state, JobState::kDone) << CodeName(r.code) << ": " << r.error;
    EXPECT_EQ(r.output_args, (std::vector<uint32_t>{2})) << "the scratch buffer stays";
    ASSERT_NE(r.Output(2), nullptr);
    const double want = std::accumulate(x.begin(), x.end(), 0.0);
    const float got = As<float>(*r.Output(2))[0];
    EXPECT_NEAR(got, want, 1e-3 * std::sqrt(double{n})) << "graph " << graph;
    // A graph's timing is the span of its launches (no events between them).
    ASSERT_EQ(r.timing.launch_us.size(), graph ? 0u : 2u);
    std::printf("two-pass sum of %u floats%s: kernel %llu us%s\n", n, graph ? " (graph)" : "",
                (unsigned long long)r.timing.kernel_us,
                graph ? ""
                      : (" (launches " + std::to_string(r.timing.launch_us[0]) + ", " +
                         std::to_string(r.timing.launch_us[1]) + ")")
                            .c_str());
  }
}

// y = a[k] * y + b[k], ten times, alternating two kernels of one source;
// then z = y (an out buffer) by a third.
constexpr char kChain[] = R"(
extern "C" __global__ void axpb(float* y, float a, float b, unsigned n) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * y[i] + b;
}
template <typename T> __global__ void axpb_t(T* y, T a, T b, unsigned n) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * y[i] + b;
}
extern "C" __global__ void copy(const float* y, float* z, unsigned n) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) z[i] = y[i];
}
)";

TEST_F(LaunchesGpuTest, ATenStepChainMatchesTheCpuPlainAndAsAReplayedGraph) {
  const uint32_t n = 100000;
  std::uniform_real_distribution<float> coef(-1.5f, 1.5f);
  // The same shape five times with fresh inputs and scalars: the first
  // graph job captures, the later ones replay it with their parameters.
  for (int round = 0; round < 6; ++round) {
    const bool graph = round % 2 == 1 || round >= 4;
    const std::vector<float> y0 = Random(n);
    std::vector<float> a(10), b(10);
    for (int k = 0; k < 10; ++k) a[k] = coef(rng_), b[k] = coef(rng_);
    JobRequest j;
    j.spec.kernel.source = kChain;
    j.spec.buffers = {Arg::InOut(0), Arg::Out(uint64_t{n} * 4)};
    for (int k = 0; k < 10; ++k) {
      KernelLaunch l = Launch(k % 2 ? "axpb_t<float>" : "axpb", (n + 255) / 256, 256,
                              {Arg::Ref(0), Arg::F32(a[k]), Arg::F32(b[k]), Arg::U32(n)});
      l.name_expression = k % 2 == 1;
      j.spec.launches.push_back(l);
    }
    j.spec.launches.push_back(Launch("copy", (n + 255) / 256, 256,
                                     {Arg::Ref(0), Arg::Ref(1), Arg::U32(n)}));
    j.spec.graph = graph;
    j.inputs = {Keep(y0)};
    JobResult r = Run(j);
    ASSERT_EQ(r.state, JobState::kDone) << CodeName(r.code) << ": " << r.error;
    ASSERT_NE(r.Output(0), nullptr);
    ASSERT_NE(r.Output(1), nullptr);
    const auto y = As<float>(*r.Output(0));
    const auto z = As<float>(*r.Output(1));
    ASSERT_EQ(y.size(), n);
    ASSERT_EQ(z.size(), n);
    size_t bad = 0;
    for (uint32_t i = 0; i < n; ++i) {
      float want = y0[i];
      for (int k = 0; k < 10; ++k) want = std::fma(a[k], want, b[k]);
      const float tol = 1e-4f * (1.0f + std::fabs(want));
      if (std::fabs(y[i] - want) > tol || z[i] != y[i]) ++bad;
    }
    EXPECT_EQ(bad, 0u) << "round " << round << (graph ? " (graph)" : "");
    EXPECT_EQ(r.timing.launch_us.size(), graph ? 0u : 11u);
  }
}

TEST_F(LaunchesGpuTest, ScratchIsZeroedAndNeverLeavesTheGpu) {
  // Launch 0 copies the scratch buffer (untouched: zeros) to out 1 and
  // then fills the scratch; launch 1 copies the scratch to out 2. Only the
  // outs come back; a later job's scratch is zeros again.
  constexpr char kSrc[] = R"(
extern "C" __global__ void first(unsigned* s, unsigned* o, unsigned n) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) { o[i] = s[i]; s[i] = 0xabcd0000u + i; }
}
extern "C" __global__ void second(const unsigned* s, unsigned* o, unsigned n) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) o[i] = s[i];
}
)";
  const uint32_t n = 1 << 16;
  for (int round = 0; round < 2; ++round) {
    JobRequest j;
    j.spec.kernel.source = kSrc;
    j.spec.buffers = {Arg::Scratch(uint64_t{n} * 4), Arg::Out(uint64_t{n} * 4),
                      Arg::Out(uint64_t{n} * 4)};
    j.spec.launches = {Launch("first", n / 256, 256, {Arg::Ref(0), Arg::Ref(1), Arg::U32(n)}),
                       Launch("second", n / 256, 256, {Arg::Ref(0), Arg::Ref(2), Arg::U32(n)})};
    JobResult r = Run(j);
    ASSERT_EQ(r.state, JobState::kDone) << CodeName(r.code) << ": " << r.error;
    EXPECT_EQ(r.output_args, (std::vector<uint32_t>{1, 2}));
    ASSERT_EQ(r.outputs.size(), 2u);
    const auto before = As<uint32_t>(r.outputs[0]);
    const auto after = As<uint32_t>(r.outputs[1]);
    size_t nonzero = 0, wrong = 0;
    for (uint32_t i = 0; i < n; ++i) {
      nonzero += before[i] != 0;
      wrong += after[i] != 0xabcd0000u + i;
    }
    EXPECT_EQ(nonzero, 0u) << "a scratch buffer reads as zeros (round " << round << ")";
    EXPECT_EQ(wrong, 0u) << "the second launch saw what the first wrote";
  }
}

TEST_F(LaunchesGpuTest, AnOffsetIntoABufferReachesTheKernel) {
  constexpr char kSrc[] = R"(
extern "C" __global__ void add(const float* x, const float* y, float* z, unsigned n) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) z[i] = x[i] + y[i];
}
)";
  const uint32_t n = 4096;
  const std::vector<float> x = Random(2 * n);
  JobRequest j;
  j.spec.kernel.source = kSrc;
  j.spec.buffers = {Arg::In(0), Arg::Out(uint64_t{n} * 4)};
  // The two halves of one input, added.
  j.spec.launches = {Launch("add", n / 256, 256,
                            {Arg::Ref(0), Arg::Ref(0, uint64_t{n} * 4), Arg::Ref(1), Arg::U32(n)})};
  j.inputs = {Keep(x)};
  JobResult r = Run(j);
  ASSERT_EQ(r.state, JobState::kDone) << CodeName(r.code) << ": " << r.error;
  ASSERT_NE(r.Output(1), nullptr);
  const auto z = As<float>(*r.Output(1));
  size_t wrong = 0;
  for (uint32_t i = 0; i < n; ++i) wrong += z[i] != x[i] + x[n + i];
  EXPECT_EQ(wrong, 0u);
}

TEST_F(LaunchesGpuTest, AFaultNamesTheLaunchThatFaulted) {
  constexpr char kSrc[] = R"(
extern "C" __global__ void fine(float* y) { y[threadIdx.x] += 1.0f; }
extern "C" __global__ void wild(float* y) { *(volatile float*)(0x10) = y[0]; }
)";
  JobRequest j;
  j.spec.kernel.source = kSrc;
  j.spec.buffers = {Arg::Out(1024)};
  j.spec.launches = {Launch("fine", 1, 32, {Arg::Ref(0)}), Launch("fine", 1, 32, {Arg::Ref(0)}),
                     Launch("wild", 1, 1, {Arg::Ref(0)}), Launch("fine", 1, 32, {Arg::Ref(0)})};
  JobResult r = Run(j);
  EXPECT_EQ(r.state, JobState::kFailed);
  EXPECT_EQ(r.code, Code::kKernelFault) << r.error;
  EXPECT_EQ(r.error.rfind("launch 2: ", 0), 0u) << r.error;
  std::printf("fault: %s\n", r.error.c_str());
}

}  // namespace
}  // namespace gpuq::testing
