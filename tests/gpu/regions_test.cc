// Registered regions on a real GPU (PROTOCOL.md, "Regions"): bytes read from
// and written to a client's region in place, against CPU references on fresh
// random inputs, with every byte outside the ranges left alone; a job of
// several launches over ranges and scratch; and 1 GiB each way.
#include <cmath>
#include <cstring>

#include "tests/gpu/gpu_fixture.h"

namespace gpuq::testing {
namespace {

using schema::Arg;
using schema::KernelLaunch;

class RegionsGpuTest : public GpuFixture {
 protected:
  static void SetUpTestSuite() { StartBroker("1"); }
  static void TearDownTestSuite() { StopBroker(); }

  std::unique_ptr<Region> NewRegion(uint64_t size) {
    auto r = client_->NewRegion(size);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? std::move(*r) : nullptr;
  }
  template <typename T>
  T* At(Region& r, uint64_t offset) {
    return reinterpret_cast<T*>(r.data() + offset);
  }
};

constexpr char kSaxpy[] = R"(
extern "C" __global__ void saxpy(float a, const float* x, float* y, unsigned n) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + y[i];
}
)";

TEST_F(RegionsGpuTest, SaxpyReadsAndWritesItsRangesInPlace) {
  const unsigned n = 1 << 20;
  const uint64_t bytes = uint64_t{n} * 4;
  // [guard page][x][y][guard]: the guards must come back as they were.
  const uint64_t guard = 4096;
  auto r = NewRegion(guard + 2 * bytes + guard);
  ASSERT_TRUE(r);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  std::vector<float> x(n), y(n);
  for (unsigned i = 0; i < n; ++i) x[i] = d(rng_), y[i] = d(rng_);
  memset(r->data(), 0xa5, r->size());
  std::memcpy(At<char>(*r, guard), x.data(), bytes);
  std::memcpy(At<char>(*r, guard + bytes), y.data(), bytes);
  const float a = d(rng_);
  JobRequest j = Kernel(kSaxpy, "saxpy", {n / 256, 1, 1}, {256, 1, 1});
  j.spec.args = {Arg::F32(a), r->In(guard, bytes), r->InOut(guard + bytes, bytes), Arg::U32(n)};
  JobResult res = Run(j);
  ASSERT_TRUE(res.ok()) << res.error;
  EXPECT_TRUE(res.outputs.empty());
  const float* got = At<float>(*r, guard + bytes);
  for (unsigned i = 0; i < n; ++i) {
    const float want = a * x[i] + y[i];
    ASSERT_NEAR(got[i], want, 1e-6f * (1.0f + std::fabs(want))) << i;
  }
  for (uint64_t i = 0; i < guard; ++i) {
    ASSERT_EQ(static_cast<uint8_t>(r->data()[i]), 0xa5) << i;
    ASSERT_EQ(static_cast<uint8_t>(r->data()[guard + 2 * bytes + i]), 0xa5) << i;
  }
  EXPECT_EQ(std::memcmp(At<char>(*r, guard), x.data(), bytes), 0) << "an in range is only read";
  // Again with new inputs in the same region: no per-job registration.
  for (unsigned i = 0; i < n; ++i) x[i] = d(rng_);
  std::memcpy(At<char>(*r, guard), x.data(), bytes);
  std::vector<float> y2(got, got + n);
  res = Run(j);
  ASSERT_TRUE(res.ok()) << res.error;
  for (unsigned i = 0; i < n; i += 997) {
    const float want = a * x[i] + y2[i];
    ASSERT_NEAR(got[i], want, 1e-6f * (1.0f + std::fabs(want))) << i;
  }
}

// A two-step job of several launches: scale a range into scratch, then add
// it to a second range and write a third; the scratch never comes back.
constexpr char kSteps[] = R"(
extern "C" __global__ void scale(const float* x, float* s, float a, unsigned n) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) s[i] = a * x[i];
}
extern "C" __global__ void add(const float* s, const float* y, float* out, unsigned n) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = s[i] + y[i];
}
)";

TEST_F(RegionsGpuTest, AJobOfSeveralLaunchesOverRangesAndScratch) {
  const unsigned n = 300000;
  const uint64_t bytes = uint64_t{n} * 4;
  auto r = NewRegion(3 * bytes);
  ASSERT_TRUE(r);
  std::uniform_real_distribution<float> d(-4.0f, 4.0f);
  float* x = At<float>(*r, 0);
  float* y = At<float>(*r, bytes);
  for (unsigned i = 0; i < n; ++i) x[i] = d(rng_), y[i] = d(rng_);
  const float a = d(rng_);
  JobRequest j;
  j.spec.kernel.source = kSteps;
  j.spec.buffers = {r->In(0, bytes), Arg::Scratch(bytes), r->In(bytes, bytes),
                    r->Out(2 * bytes, bytes)};
  const uint32_t grid = (n + 255) / 256;
  KernelLaunch s1;
  s1.entry = "scale";
  s1.launch.grid = {grid, 1, 1};
  s1.launch.block = {256, 1, 1};
  s1.args = {Arg::Ref(0), Arg::Ref(1), Arg::F32(a), Arg::U32(n)};
  KernelLaunch s2 = s1;
  s2.entry = "add";
  s2.args = {Arg::Ref(1), Arg::Ref(2), Arg::Ref(3), Arg::U32(n)};
  j.spec.launches = {s1, s2};
  for (bool graph : {false, true}) {
    j.spec.graph = graph;
    memset(At<char>(*r, 2 * bytes), 0, bytes);
    JobResult res = Run(j);
    ASSERT_TRUE(res.ok()) << res.error;
    EXPECT_TRUE(res.output_args.empty());
    const float* out = At<float>(*r, 2 * bytes);
    for (unsigned i = 0; i < n; ++i) {
      const float want = a * x[i] + y[i];
      ASSERT_NEAR(out[i], want, 1e-5f * (1.0f + std::fabs(want))) << i << (graph ? " graph" : "");
    }
  }
}

constexpr char kMix[] = R"(
extern "C" __global__ void mix(const unsigned* in, unsigned* out, unsigned key,
                               unsigned long long n) {
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x) {
    out[i] = (in[i] ^ key) * 2654435761u + (unsigned)i;
  }
}
)";

TEST_F(RegionsGpuTest, OneGibibyteEachWay) {
  const uint64_t bytes = 1ull << 30, n = bytes / 4;
  auto r = NewRegion(2 * bytes);
  ASSERT_TRUE(r);
  unsigned* in = At<unsigned>(*r, 0);
  std::uniform_int_distribution<unsigned> d;
  const unsigned seed = d(rng_), key = d(rng_);
  // A fast generator: fresh bytes each run without a minute of mt19937.
  uint64_t s = seed | 1;
  for (uint64_t i = 0; i < n; ++i) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    in[i] = static_cast<unsigned>(s);
  }
  JobRequest j = Kernel(kMix, "mix", {2048, 1, 1}, {256, 1, 1});
  j.spec.args = {r->In(0, bytes), r->Out(bytes, bytes), Arg::U32(key),
                 Arg::Scalar(schema::ScalarType::kU64, n)};
  JobResult res = Run(j);
  ASSERT_TRUE(res.ok()) << res.error;
  const unsigned* out = At<unsigned>(*r, bytes);
  uint64_t wrong = 0;
  for (uint64_t i = 0; i < n; ++i) {
    wrong += out[i] != (in[i] ^ key) * 2654435761u + static_cast<unsigned>(i);
  }
  EXPECT_EQ(wrong, 0u);
  std::printf("1 GiB each way through a region: h2d %.1f GB/s, d2h %.1f GB/s, job %.3f s\n",
              bytes / 1e3 / std::max<uint64_t>(1, res.timing.h2d_us),
              bytes / 1e3 / std::max<uint64_t>(1, res.timing.d2h_us), res.timing.total_us / 1e6);
}

}  // namespace
}  // namespace gpuq::testing
