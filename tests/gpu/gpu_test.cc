// GPU tests: real kernels on a real GPU, end to end through gpuqd and the
// gpuq-worker processes it supervises. Every output is checked against a CPU
// reference on fresh random inputs. Where there is no GPU (CI), every test
// reports itself skipped.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>

#include <filesystem>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <deque>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "gpuq/client.h"
#include "tests/gpu/gpu_fixture.h"

namespace gpuq {
namespace {

using schema::Arg;
using schema::JobState;
using schema::ScalarType;
using Clock = std::chrono::steady_clock;

using testing::GpuCount;

class GpuTest : public testing::GpuFixture {
 protected:
  static void SetUpTestSuite() { StartBroker("-1"); }
  static void TearDownTestSuite() { StopBroker(); }
};

constexpr char kSaxpy[] = R"(
extern "C" __global__ void saxpy(float a, const float* x, float* y, float* twice, unsigned n) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) { y[i] = a * x[i] + y[i]; twice[i] = 2.0f * x[i]; }
}
)";

JobRequest SaxpyJob(float a, std::string_view x, std::string_view y, unsigned n) {
  JobRequest j;
  j.spec.kernel.source = kSaxpy;
  j.spec.kernel.entry = "saxpy";
  j.spec.launch.grid = {(n + 255) / 256, 1, 1};
  j.spec.launch.block = {256, 1, 1};
  j.spec.args = {Arg::F32(a), Arg::In(0), Arg::InOut(1), Arg::Out(uint64_t{n} * 4), Arg::U32(n)};
  j.inputs = {x, y};
  return j;
}

void ExpectSaxpy(const JobResult& r, float a, const std::vector<float>& x,
                 const std::vector<float>& y) {
  ASSERT_EQ(r.state, JobState::kDone) << CodeName(r.code) << ": " << r.error;
  ASSERT_NE(r.Output(2), nullptr);
  ASSERT_NE(r.Output(3), nullptr);
  auto out = GpuTest::As<float>(*r.Output(2));
  auto twice = GpuTest::As<float>(*r.Output(3));
  ASSERT_EQ(out.size(), x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const float want = a * x[i] + y[i];
    ASSERT_NEAR(out[i], want, 1e-5f * (1 + std::fabs(want))) << "element " << i;
    ASSERT_EQ(twice[i], 2.0f * x[i]) << "element " << i;
  }
}

TEST_F(GpuTest, DeviceIsReported) {
  auto d = client_->Devices();
  ASSERT_TRUE(d.ok());
  ASSERT_FALSE(d->empty());
  const auto& dev = (*d)[0].device;
  EXPECT_FALSE(dev.name.empty());
  EXPECT_EQ(dev.uuid.rfind("GPU-", 0), 0u);
  EXPECT_GE(dev.cc_major, 7u);
  EXPECT_GT(dev.total_bytes, 1ull << 30);
  EXPECT_GT(dev.sm_count, 0u);
  EXPECT_GE(dev.max_shared_optin, dev.max_shared_per_block);
  std::printf("device: %s %s, %u SMs, %.1f GiB, shared %u/%u, %u workers\n", dev.name.c_str(),
              dev.Arch().c_str(), dev.sm_count, dev.total_bytes / 1073741824.0,
              dev.max_shared_per_block, dev.max_shared_optin, unsigned(d->size()));
}

TEST_F(GpuTest, EveryScalarTypeReachesTheKernel) {
  JobRequest j = Kernel(R"(
extern "C" __global__ void k(unsigned char a, signed char b, unsigned short c, short d,
                             unsigned e, int f, unsigned long long g, long long h, float i,
                             double j, unsigned char* out) {
  unsigned char* p = out;
  memcpy(p, &a, 1); p += 1; memcpy(p, &b, 1); p += 1; memcpy(p, &c, 2); p += 2;
  memcpy(p, &d, 2); p += 2; memcpy(p, &e, 4); p += 4; memcpy(p, &f, 4); p += 4;
  memcpy(p, &g, 8); p += 8; memcpy(p, &h, 8); p += 8; memcpy(p, &i, 4); p += 4;
  memcpy(p, &j, 8);
})",
                        "k", {1, 1, 1}, {1, 1, 1});
  const uint8_t a = rng_();
  const int8_t b = static_cast<int8_t>(rng_());
  const uint16_t c = rng_();
  const int16_t d = static_cast<int16_t>(rng_());
  const uint32_t e = rng_();
  const int32_t f = static_cast<int32_t>(rng_());
  const uint64_t g = (uint64_t(rng_()) << 32) | rng_();
  const int64_t h = -static_cast<int64_t>(g >> 1);
  const float fi = std::uniform_real_distribution<float>(-1e6, 1e6)(rng_);
  const double dj = std::uniform_real_distribution<double>(-1e300, 1e300)(rng_);
  j.spec.args = {Arg::Scalar(ScalarType::kU8, a),
                 Arg::Scalar(ScalarType::kI8, static_cast<uint8_t>(b)),
                 Arg::Scalar(ScalarType::kU16, c),
                 Arg::Scalar(ScalarType::kI16, static_cast<uint16_t>(d)),
                 Arg::Scalar(ScalarType::kU32, e),
                 Arg::I32(f),
                 Arg::Scalar(ScalarType::kU64, g),
                 Arg::Scalar(ScalarType::kI64, static_cast<uint64_t>(h)),
                 Arg::F32(fi),
                 Arg::F64(dj),
                 Arg::Out(42)};
  JobResult r = Run(j);
  ASSERT_EQ(r.state, JobState::kDone) << r.error;
  std::string want;
  auto put = [&](const auto& v) { want.append(reinterpret_cast<const char*>(&v), sizeof v); };
  put(a), put(b), put(c), put(d), put(e), put(f), put(g), put(h), put(fi), put(dj);
  EXPECT_EQ(*r.Output(10), want);
}

// The driver reads one argument per parameter the kernel declares, and as
// many bytes as the parameter has: a job with fewer arguments, or a
// narrower one, made the worker pass what lay past its argument array
// (garbage, or a crash of the worker). Refused, naming what differs; the
// worker serves on.
TEST_F(GpuTest, ArgumentsThatDoNotMatchTheKernelsParametersAreRefused) {
  const char* src = R"(
extern "C" __global__ void three(int* a, int* b, int* c) { *a = 1; *b = 2; *c = 3; }
extern "C" __global__ void wide(unsigned long long n, unsigned* out) { *out = (unsigned)n; }
)";
  JobRequest few = Kernel(src, "three", {1, 1, 1}, {1, 1, 1});
  few.spec.args = {Arg::Out(4)};
  JobResult r = Run(few);
  EXPECT_EQ(r.state, JobState::kFailed);
  EXPECT_EQ(r.code, Code::kInvalid) << r.error;
  EXPECT_NE(r.error.find("takes 3 arguments, 1 given"), std::string::npos) << r.error;
  JobRequest narrow = Kernel(src, "wide", {1, 1, 1}, {1, 1, 1});
  narrow.spec.args = {Arg::U32(7), Arg::Out(4)};
  r = Run(narrow);
  EXPECT_EQ(r.code, Code::kInvalid) << r.error;
  EXPECT_NE(r.error.find("argument 0 is 4 bytes"), std::string::npos) << r.error;
  // Matching arguments run, on the same worker.
  narrow.spec.args = {Arg::Scalar(ScalarType::kU64, 0x1234567800000009ull), Arg::Out(4)};
  r = Run(narrow);
  ASSERT_EQ(r.state, JobState::kDone) << r.error;
  EXPECT_EQ(*r.Output(1), std::string("\x09\0\0\0", 4));
}

// A module's __device__ variables are allocated when it loads, outside
// every buffer: one line of source took 16 GiB of the GPU for as long as
// the worker kept the module, from every other tenant's jobs. A kernel's
// local memory is reserved for every thread the GPU holds, and kept. Both
// are refused over the worker's bounds (64 MiB per module, 4 GiB of local
// memory by default; PTX is counted as the CUBIN it compiles to, in
// module_bounds_test.cc); a module within them runs, and its variables work.
TEST_F(GpuTest, ModulesAndKernelsOverTheirDeviceMemoryBoundsAreRefused) {
  const char* big = R"(
__device__ char big[1ull << 34];
extern "C" __global__ void touch(unsigned* out) { big[(1ull << 34) - 1] = 7; *out = big[(1ull << 34) - 1]; }
)";
  JobRequest job = Kernel(big, "touch", {1, 1, 1}, {1, 1, 1});
  job.spec.args = {Arg::Out(4)};
  JobResult r = Run(job);
  EXPECT_EQ(r.state, JobState::kFailed);
  EXPECT_EQ(r.code, Code::kResourceExhausted) << r.error;
  EXPECT_NE(r.error.find("over the limit of 64 MiB per module"), std::string::npos) << r.error;

  const char* local = R"(
extern "C" __global__ void deep(const unsigned* in, unsigned* out) {
  volatile unsigned stack[16384];
  for (unsigned i = 0; i < 16384; ++i) stack[i] = in[i & 3] + i;
  out[0] = stack[in[0] & 16383];
}
)";
  JobRequest deep = Kernel(local, "deep", {1, 1, 1}, {1, 1, 1});
  deep.inputs = {Keep(std::string(16, '\0'))};
  deep.spec.args = {Arg::In(0), Arg::Out(4)};
  r = Run(deep);
  EXPECT_EQ(r.code, Code::kResourceExhausted) << r.error;
  EXPECT_NE(r.error.find("bytes of local memory per thread"), std::string::npos) << r.error;

  const char* small = R"(
__device__ unsigned counter[1024];
extern "C" __global__ void count(unsigned* out) {
  atomicAdd(&counter[7], 1u);
  __syncthreads();
  if (threadIdx.x == 0) *out = counter[7];
}
)";
  JobRequest ok = Kernel(small, "count", {1, 1, 1}, {256, 1, 1});
  ok.spec.args = {Arg::Out(4)};
  r = Run(ok);
  ASSERT_EQ(r.state, JobState::kDone) << r.error;
  uint32_t got = 0;
  std::memcpy(&got, r.Output(0)->data(), 4);
  EXPECT_GE(got, 256u);
}

TEST_F(GpuTest, InOutAndInoutBuffersMatchTheCpu) {
  const unsigned n = 1 << 20;
  std::uniform_real_distribution<float> u(-100, 100);
  std::vector<float> x(n), y(n);
  for (auto& v : x) v = u(rng_);
  for (auto& v : y) v = u(rng_);
  const float a = u(rng_);
  JobResult r = Run(SaxpyJob(a, Keep(x), Keep(y), n));
  ExpectSaxpy(r, a, x, y);
  EXPECT_GT(r.timing.kernel_us, 0u);
  std::printf("saxpy 1M: h2d %llu us, kernel %llu us, d2h %llu us, total %llu us\n",
              (unsigned long long)r.timing.h2d_us, (unsigned long long)r.timing.kernel_us,
              (unsigned long long)r.timing.d2h_us, (unsigned long long)r.timing.total_us);
}

TEST_F(GpuTest, LargeBuffersGiveTheSameBytesByLocalFilesAndBySockets) {
  // 24 MiB in, inout and out: over the client's 1 MiB threshold, so the
  // default client passes them as files of the broker's local directory
  // (gpuqd's own worker reads and writes them); a client without local
  // buffers sends and receives the same bytes as frames.
  const unsigned n = 6u << 20;  // u32 words
  std::vector<uint32_t> a(n), b(n);
  for (auto& v : a) v = static_cast<uint32_t>(rng_());
  for (auto& v : b) v = static_cast<uint32_t>(rng_());
  JobRequest j = Kernel(
      "extern \"C\" __global__ void mix(const unsigned* a, unsigned* b, unsigned* out,\n"
      "                                  unsigned n) {\n"
      "  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n;\n"
      "       i += gridDim.x * blockDim.x) {\n"
      "    out[i] = a[i] ^ b[i];\n"
      "    b[i] = b[i] * 3u + 1u;\n"
      "  }\n"
      "}\n",
      "mix", {512, 1, 1}, {256, 1, 1});
  j.spec.args = {Arg::In(0), Arg::InOut(1), Arg::Out(uint64_t{n} * 4), Arg::U32(n)};
  j.inputs = {Keep(a), Keep(b)};
  std::vector<uint32_t> want_b(n), want_out(n);
  for (unsigned i = 0; i < n; ++i) {
    want_out[i] = a[i] ^ b[i];
    want_b[i] = b[i] * 3u + 1u;
  }
  const std::string_view wb(reinterpret_cast<const char*>(want_b.data()), n * 4u);
  const std::string_view wo(reinterpret_cast<const char*>(want_out.data()), n * 4u);
  ClientOptions sockets;
  sockets.timeout = Millis(60000);
  sockets.local_buffers = false;
  auto socket_client = Client::Connect(broker_->client_endpoint(), sockets);
  ASSERT_TRUE(socket_client.ok());
  for (Client* c : {client_.get(), socket_client->get()}) {
    auto id = c->Submit(j);
    ASSERT_TRUE(id.ok()) << id.status().ToString();
    auto r = c->Wait(*id, Millis(60000));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    ASSERT_EQ(r->state, JobState::kDone) << r->error;
    ASSERT_NE(r->Output(1), nullptr);
    ASSERT_NE(r->Output(2), nullptr);
    EXPECT_TRUE(*r->Output(1) == wb);
    EXPECT_TRUE(*r->Output(2) == wo);
    std::printf("%s: 24 MiB x 3: h2d %llu us, kernel %llu us, d2h %llu us, total %llu us\n",
                c == client_.get() ? "local files" : "sockets",
                (unsigned long long)r->timing.h2d_us, (unsigned long long)r->timing.kernel_us,
                (unsigned long long)r->timing.d2h_us, (unsigned long long)r->timing.total_us);
  }
  // Nothing of the client's or the worker's own is left in the directory.
  for (const auto& e : std::filesystem::directory_iterator(broker_->store() + ".blobs")) {
    if (!e.is_regular_file()) continue;  // the region channel's socket
    const std::string name = e.path().filename().string();
    EXPECT_TRUE(name[0] == 'j') << name;
  }
}

TEST_F(GpuTest, OneTwoAndThreeDimensionalLaunches) {
  constexpr char kIndex[] = R"(
extern "C" __global__ void index(unsigned* out) {
  unsigned bx = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  unsigned tx = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  unsigned per_block = blockDim.x * blockDim.y * blockDim.z;
  out[bx * per_block + tx] = bx * per_block + tx;
})";
  for (auto [grid, block] : {std::pair{schema::Dim3{37, 1, 1}, schema::Dim3{128, 1, 1}},
                             std::pair{schema::Dim3{5, 7, 1}, schema::Dim3{16, 8, 1}},
                             std::pair{schema::Dim3{3, 4, 5}, schema::Dim3{8, 4, 2}}}) {
    const uint64_t threads = grid.Count() * block.Count();
    JobRequest j = Kernel(kIndex, "index", grid, block);
    j.spec.args = {Arg::Out(threads * 4)};
    JobResult r = Run(j);
    ASSERT_EQ(r.state, JobState::kDone) << r.error;
    auto out = As<unsigned>(*r.Output(0));
    ASSERT_EQ(out.size(), threads);
    for (unsigned i = 0; i < threads; ++i) ASSERT_EQ(out[i], i) << "thread " << i;
  }
}

TEST_F(GpuTest, DynamicSharedMemoryAbove48KB) {
  constexpr unsigned kFloats = 24 * 1024;  // 96 KB of shared memory
  JobRequest j = Kernel(R"(
extern "C" __global__ void reverse(const float* in, float* out, unsigned n) {
  extern __shared__ float s[];
  for (unsigned i = threadIdx.x; i < n; i += blockDim.x) s[i] = in[i];
  __syncthreads();
  for (unsigned i = threadIdx.x; i < n; i += blockDim.x) out[i] = s[n - 1 - i];
})",
                        "reverse", {1, 1, 1}, {256, 1, 1});
  std::vector<float> in(kFloats);
  for (auto& v : in) v = std::uniform_real_distribution<float>(-1, 1)(rng_);
  j.spec.launch.shared_bytes = kFloats * 4;
  j.spec.args = {Arg::In(0), Arg::Out(kFloats * 4), Arg::U32(kFloats)};
  j.inputs = {Keep(in)};
  JobResult r = Run(j);
  ASSERT_EQ(r.state, JobState::kDone) << r.error;
  auto out = As<float>(*r.Output(1));
  for (unsigned i = 0; i < kFloats; ++i) ASSERT_EQ(out[i], in[kFloats - 1 - i]);
  // Beyond the device's opt-in limit: a clear error, not a launch failure.
  j.spec.launch.shared_bytes = 1u << 20;
  JobResult too_much = Run(j);
  EXPECT_EQ(too_much.state, JobState::kFailed);
  EXPECT_EQ(too_much.code, Code::kInvalid) << too_much.error;
}

// The opt-in to more than 48 KB of shared memory is the kernel's attribute,
// shared by the worker's streams: it was set to each launch's own size, so
// a job asking for 64 KB, checked between another's check (160 KB) and its
// launch, made that launch fail (CUDA_ERROR_INVALID_VALUE). Jobs of both
// sizes at once from several clients all run, each with its own bytes.
TEST_F(GpuTest, ConcurrentJobsOfOneKernelWithDifferentSharedMemoryAllRun) {
  const char* src = R"(
extern "C" __global__ void last(unsigned n, unsigned* out) {
  extern __shared__ unsigned char s[];
  for (unsigned i = threadIdx.x; i < n; i += blockDim.x) s[i] = (unsigned char)(i * 7 + n);
  __syncthreads();
  if (threadIdx.x == 0) *out = s[n - 1] + n;
})";
  constexpr int kClients = 4, kJobs = 60;
  std::vector<std::thread> threads;
  std::atomic<int> done{0}, wrong{0};
  std::mutex mu;
  std::string first_error;
  for (int c = 0; c < kClients; ++c) {
    threads.emplace_back([&, c] {
      auto client = Client::Connect(broker_->client_endpoint());
      if (!client.ok()) return;
      std::vector<std::pair<uint64_t, uint32_t>> ids;
      for (int i = 0; i < kJobs; ++i) {
        const uint32_t n = (i + c) % 2 ? 160u << 10 : 64u << 10;
        JobRequest j = Kernel(src, "last", {1, 1, 1}, {256, 1, 1});
        j.spec.launch.shared_bytes = n;
        j.spec.args = {Arg::U32(n), Arg::Out(4)};
        auto id = (*client)->Submit(j);
        if (id.ok()) ids.emplace_back(*id, n);
      }
      for (auto [id, n] : ids) {
        auto r = (*client)->Wait(id, Millis(60000));
        if (!r.ok() || !r->ok()) {
          std::lock_guard lock(mu);
          if (first_error.empty()) first_error = r.ok() ? r->error : r.status().ToString();
          continue;
        }
        uint32_t got = 0;
        std::memcpy(&got, r->Output(1)->data(), 4);
        const uint32_t want = static_cast<unsigned char>((n - 1) * 7 + n) + n;
        (got == want ? done : wrong)++;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(done.load(), kClients * kJobs) << first_error;
  EXPECT_EQ(wrong.load(), 0);
}

TEST_F(GpuTest, TemplatesThroughNameExpressions) {
  constexpr char kScale[] = R"(
template <typename T> __global__ void scale(T* x, T s, unsigned n) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] *= s;
})";
  const unsigned n = 1000;
  std::vector<float> xf(n);
  std::vector<double> xd(n);
  for (unsigned i = 0; i < n; ++i) xd[i] = xf[i] = std::uniform_real_distribution<float>(-9, 9)(rng_);
  JobRequest jf = Kernel(kScale, "scale<float>", {4, 1, 1}, {256, 1, 1});
  jf.spec.kernel.name_expression = true;
  jf.spec.args = {Arg::InOut(0), Arg::F32(1.5f), Arg::U32(n)};
  jf.inputs = {Keep(xf)};
  JobRequest jd = Kernel(kScale, "scale<double>", {4, 1, 1}, {256, 1, 1});
  jd.spec.kernel.name_expression = true;
  jd.spec.args = {Arg::InOut(0), Arg::F64(-2.25), Arg::U32(n)};
  jd.inputs = {Keep(xd)};
  JobResult rf = Run(jf), rd = Run(jd);
  ASSERT_EQ(rf.state, JobState::kDone) << rf.error;
  ASSERT_EQ(rd.state, JobState::kDone) << rd.error;
  auto of = As<float>(*rf.Output(0));
  auto od = As<double>(*rd.Output(0));
  for (unsigned i = 0; i < n; ++i) {
    ASSERT_EQ(of[i], xf[i] * 1.5f);
    ASSERT_EQ(od[i], xd[i] * -2.25);
  }
}

TEST_F(GpuTest, HundredsOfConcurrentJobsFromSeveralClients) {
  constexpr int kClients = 4, kJobsEach = 100;
  std::atomic<int> good{0};
  std::vector<std::thread> threads;
  for (int c = 0; c < kClients; ++c) {
    threads.emplace_back([&, c] {
      auto client = Connect();
      std::mt19937 rng(c);
      std::deque<std::vector<float>> xs, ys;
      std::vector<float> as;
      std::vector<uint64_t> ids;
      for (int i = 0; i < kJobsEach; ++i) {
        const unsigned n = 1000 + rng() % 5000;
        xs.emplace_back(n);
        ys.emplace_back(n);
        for (auto& v : xs.back()) v = std::uniform_real_distribution<float>(-5, 5)(rng);
        for (auto& v : ys.back()) v = std::uniform_real_distribution<float>(-5, 5)(rng);
        as.push_back(std::uniform_real_distribution<float>(-3, 3)(rng));
        std::string_view x(reinterpret_cast<const char*>(xs.back().data()), n * 4);
        std::string_view y(reinterpret_cast<const char*>(ys.back().data()), n * 4);
        auto id = client->Submit(SaxpyJob(as.back(), x, y, n));
        if (id.ok()) ids.push_back(*id);
      }
      for (size_t i = 0; i < ids.size(); ++i) {
        auto r = client->Wait(ids[i], Millis(60000));
        if (!r.ok()) continue;
        bool ok = true;
        [&] { ExpectSaxpy(*r, as[i], xs[i], ys[i]); ok = !::testing::Test::HasFatalFailure(); }();
        good += ok;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(good.load(), kClients * kJobsEach);
}

constexpr char kSpin[] = R"(
extern "C" __global__ void spin(unsigned long long cycles, float* out) {
  unsigned long long t0 = clock64();
  while (clock64() - t0 < cycles) {}
  out[threadIdx.x] = 1.0f;
})";
constexpr char kFault[] = R"(
extern "C" __global__ void fault(float* out) {
  float* bad = reinterpret_cast<float*>(0x10);
  bad[threadIdx.x] = 1.0f;
  out[0] = 2.0f;
})";
constexpr char kRunaway[] = R"(
extern "C" __global__ void runaway(volatile int* flag) { while (flag[0] == 0) {} })";

JobRequest Spin(unsigned long long cycles) {
  JobRequest j;
  j.spec.kernel.source = kSpin;
  j.spec.kernel.entry = "spin";
  j.spec.launch.block = {32, 1, 1};
  j.spec.args = {Arg::Scalar(ScalarType::kU64, cycles), Arg::Out(128)};
  return j;
}

TEST_F(GpuTest, AFaultingKernelFailsAloneAmongInnocentJobs) {
  std::vector<uint64_t> innocent;
  for (int i = 0; i < 12; ++i) innocent.push_back(*client_->Submit(Spin(2000000)));
  JobRequest f = Kernel(kFault, "fault", {1, 1, 1}, {32, 1, 1});
  f.spec.args = {Arg::Out(4)};
  auto culprit = client_->Submit(f);
  ASSERT_TRUE(culprit.ok());
  for (int i = 0; i < 12; ++i) innocent.push_back(*client_->Submit(Spin(2000000)));
  auto r = client_->Wait(*culprit, Millis(60000));
  const auto fault_seen = Clock::now();
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->state, JobState::kFailed);
  EXPECT_EQ(r->code, Code::kKernelFault) << r->error;
  EXPECT_NE(r->error.find("CUDA_ERROR_"), std::string::npos) << r->error;
  for (uint64_t id : innocent) {
    auto o = client_->Wait(id, Millis(60000));
    ASSERT_TRUE(o.ok()) << o.status().ToString();
    EXPECT_EQ(o->state, JobState::kDone) << "job " << id << ": " << o->error;
  }
  // Recovery: the GPU serves a new job.
  auto after = Run(Spin(1000));
  EXPECT_EQ(after.state, JobState::kDone) << after.error;
  std::printf("fault: culprit failed with %s; %zu innocent jobs done; a new job done %.0f ms "
              "after the fault was reported\n",
              r->error.substr(0, r->error.find(':')).c_str(), innocent.size(),
              std::chrono::duration<double, std::milli>(Clock::now() - fault_seen).count());
}

TEST_F(GpuTest, ARunawayKernelTimesOutAloneAndTheGpuServesAgain) {
  std::vector<uint64_t> innocent;
  for (int i = 0; i < 4; ++i) innocent.push_back(*client_->Submit(Spin(1000000)));
  JobRequest j = Kernel(kRunaway, "runaway", {1, 1, 1}, {1, 1, 1});
  j.spec.args = {Arg::Out(4)};
  j.spec.time_limit_ms = 1000;
  const auto submitted = Clock::now();
  auto runaway = client_->Submit(j);
  ASSERT_TRUE(runaway.ok());
  for (int i = 0; i < 4; ++i) innocent.push_back(*client_->Submit(Spin(1000000)));
  auto r = client_->Wait(*runaway, Millis(60000));
  const auto timed_out = Clock::now();
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->state, JobState::kFailed);
  EXPECT_EQ(r->code, Code::kTimeout) << r->error;
  for (uint64_t id : innocent) {
    auto o = client_->Wait(id, Millis(60000));
    ASSERT_TRUE(o.ok()) << o.status().ToString();
    EXPECT_EQ(o->state, JobState::kDone) << "job " << id << ": " << o->error;
  }
  auto after = Run(Spin(1000));
  EXPECT_EQ(after.state, JobState::kDone) << after.error;
  std::printf("runaway: timed out %.0f ms after submit (limit 1000 ms); the GPU served a new "
              "job %.0f ms after the timeout\n",
              std::chrono::duration<double, std::milli>(timed_out - submitted).count(),
              std::chrono::duration<double, std::milli>(Clock::now() - timed_out).count());
}

// A worker of one stream that registers again while a runaway kernel of its
// runs (the broker was stopped, so silent) is sent that job again: a second
// attempt of the same id, waiting behind the first. The first attempt keeps
// its run-time limit, and the worker ends itself at it (the second attempt
// took the first one's place in the worker's books, and the stream stayed
// taken for good).
class GpuOneStreamTest : public testing::GpuFixture {
 protected:
  static void SetUpTestSuite() { StartBroker("0"); }
  static void TearDownTestSuite() { StopBroker(); }
  testing::Process StartWorker() {
    return testing::Process::Start(
        {testing::BinPath("gpuq-worker"), "--broker", broker_->worker_endpoint(), "--device", "0",
         "--streams", "1", "--slots", "4", "--heartbeat-ms", "300"},
        dir_->File("gpuqd.log"));
  }
  bool WaitDevices(size_t n) {
    for (int i = 0; i < 600; ++i) {
      auto d = client_->Devices();
      if (d.ok() && d->size() == n) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }
};

TEST_F(GpuOneStreamTest, ARunawayAttemptKeepsItsLimitWhenItsJobIsSentAgain) {
  testing::Process worker = StartWorker();
  ASSERT_TRUE(WaitDevices(1)) << Log();
  JobRequest j = Kernel(kRunaway, "runaway", {1, 1, 1}, {1, 1, 1});
  j.spec.args = {Arg::Out(4)};
  j.spec.time_limit_ms = 6000;
  auto id = client_->Submit(j);
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  bool dispatched = false;
  for (int i = 0; i < 500 && !dispatched; ++i) {
    auto st = client_->GetStatus(*id);
    dispatched = st.ok() && st->state == JobState::kDispatched;
    if (!dispatched) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_TRUE(dispatched);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // running
  const pid_t broker = broker_->process().pid();
  ASSERT_EQ(kill(broker, SIGSTOP), 0);
  std::this_thread::sleep_for(std::chrono::seconds(2));  // the worker hears nothing: ready again
  ASSERT_EQ(kill(broker, SIGCONT), 0);
  const int status = worker.Wait(Millis(30000));
  EXPECT_NE(status, -1) << "the worker still runs the runaway kernel, 30 s on";
  if (status == -1) worker.Kill();
  auto r = client_->Wait(*id, Millis(120000));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->state, JobState::kFailed) << r->error;
  std::printf("a runaway job sent again: %s: %s\n", CodeName(r->code).data(), r->error.c_str());
  // A new worker serves the GPU.
  testing::Process next = StartWorker();
  ASSERT_TRUE(WaitDevices(1)) << Log();
  auto after = Run(Spin(1000));
  EXPECT_EQ(after.state, JobState::kDone) << after.error;
}

// A worker whose output file cannot be written whole (a file size limit
// here; a full disk does the same) fails that job resource_exhausted,
// leaves no part of the file behind, and serves on. Before: SIGXFSZ ended
// the worker (its jobs were run again elsewhere), and on a full disk the
// partial file stayed and the job said io_error.
TEST_F(GpuOneStreamTest, AnOutputFileThatCannotBeWrittenWholeFailsItsJobAlone) {
  ASSERT_TRUE(WaitDevices(0)) << Log();  // the last test's worker is gone
  const std::string blobs = broker_->store() + ".blobs";
  rlimit old{};
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old), 0);
  rlimit small = old;
  small.rlim_cur = 1 << 20;  // inherited by the worker forked below
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
  testing::Process worker = testing::Process::Start(
      {testing::BinPath("gpuq-worker"), "--broker", broker_->worker_endpoint(), "--device", "0",
       "--local-dir", blobs, "--heartbeat-ms", "300"},
      dir_->File("fsize-worker.log"));
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &old), 0);
  ASSERT_TRUE(WaitDevices(1)) << Log();
  const char* kFill =
      "extern \"C\" __global__ void fill(unsigned* out, unsigned n) {\n"
      "  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;\n"
      "  if (i < n) out[i] = i * 2654435761u;\n}\n";
  auto job = [&](unsigned n) {
    JobRequest j = Kernel(kFill, "fill", {(n + 255) / 256, 1, 1}, {256, 1, 1});
    j.spec.args = {Arg::Out(n * 4ull), Arg::U32(n)};
    return j;
  };
  // 4 MiB out: asked as a file of the local directory (ClientOptions::
  // local_min_bytes), over the worker's 1 MiB limit on a file.
  JobResult big = Run(job(1u << 20));
  EXPECT_EQ(big.state, JobState::kFailed);
  EXPECT_EQ(big.code, Code::kResourceExhausted) << big.error;
  EXPECT_EQ(big.attempts, 1u) << "the job ran again: its worker was lost";
  EXPECT_TRUE(big.outputs.empty());
  std::vector<std::string> left;
  for (const auto& e : std::filesystem::directory_iterator(blobs)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("w-", 0) == 0) left.push_back(name);
  }
  EXPECT_TRUE(left.empty()) << left.size() << " partial output files left, e.g. " << left[0];
  EXPECT_TRUE(worker.running()) << testing::ReadFile(dir_->File("fsize-worker.log"));
  // The same worker serves on.
  JobResult after = Run(job(1u << 16));
  ASSERT_EQ(after.state, JobState::kDone) << after.error;
  std::vector<uint32_t> got = As<uint32_t>(*after.Output(0));
  ASSERT_EQ(got.size(), 1u << 16);
  for (uint32_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], i * 2654435761u) << i;
  EXPECT_TRUE(worker.running());
  worker.Kill();
  ASSERT_TRUE(WaitDevices(0)) << Log();
}

// ------------------------------------------------------------ several GPUs

TEST_F(GpuTest, JobsArePlacedOnTheGpuTheyName) {
  if (GpuCount() < 2) GTEST_SKIP() << "needs two or more GPUs";
  auto devices = client_->Devices();
  ASSERT_TRUE(devices.ok());
  for (const auto& w : *devices) {
    JobRequest j = Spin(1000);
    j.spec.placement.gpu = w.device.uuid;
    JobResult r = Run(j);
    EXPECT_EQ(r.state, JobState::kDone) << r.error;
    EXPECT_EQ(r.device, w.device.uuid);
  }
}

TEST_F(GpuTest, AFaultOnOneGpuLeavesTheOthersServing) {
  if (GpuCount() < 2) GTEST_SKIP() << "needs two or more GPUs";
  auto devices = client_->Devices();
  ASSERT_TRUE(devices.ok());
  const std::string bad_gpu = (*devices)[0].device.uuid;
  std::vector<uint64_t> elsewhere;
  auto submit_elsewhere = [&](int n) {
    for (int i = 0; i < n; ++i) {
      JobRequest j = Spin(2000000);  // about 1 ms
      j.spec.placement.gpu = (*devices)[1 + i % (devices->size() - 1)].device.uuid;
      elsewhere.push_back(*client_->Submit(j));
    }
  };
  submit_elsewhere(20);
  JobRequest f = Kernel(kFault, "fault", {1, 1, 1}, {32, 1, 1});
  f.spec.args = {Arg::Out(4)};
  f.spec.placement.gpu = bad_gpu;
  auto culprit = client_->Submit(f);
  ASSERT_TRUE(culprit.ok());
  submit_elsewhere(20);
  auto r = client_->Wait(*culprit, Millis(60000));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->code, Code::kKernelFault) << r->error;
  for (uint64_t id : elsewhere) {
    auto o = client_->Wait(id, Millis(60000));
    ASSERT_TRUE(o.ok());
    EXPECT_EQ(o->state, JobState::kDone) << o->error;
    EXPECT_NE(o->device, bad_gpu);
    EXPECT_EQ(o->attempts, 1u) << "a job on another GPU was disturbed by the fault";
  }
  std::printf("fault on %s: %zu jobs on the other GPU(s) all done on their first attempt\n",
              bad_gpu.c_str(), elsewhere.size());
}

TEST_F(GpuTest, JobsNeedingMoreMemoryGoToTheGpuThatHasIt) {
  if (GpuCount() < 2) GTEST_SKIP() << "needs two or more GPUs";
  // Memory held by another process on one GPU shows in the free memory the
  // workers report; wait for a heartbeat to carry it.
  std::vector<schema::WorkerView> ws;
  for (int i = 0; i < 50; ++i) {
    ws = *client_->Devices();
    auto [lo, hi] = std::minmax_element(ws.begin(), ws.end(), [](auto& a, auto& b) {
      return a.device.free_bytes < b.device.free_bytes;
    });
    if (hi->device.free_bytes - lo->device.free_bytes > (8ull << 30)) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  auto [lo, hi] = std::minmax_element(ws.begin(), ws.end(), [](auto& a, auto& b) {
    return a.device.free_bytes < b.device.free_bytes;
  });
  if (hi->device.free_bytes - lo->device.free_bytes <= (8ull << 30)) {
    GTEST_SKIP() << "needs GPUs whose free memory differs by more than 8 GiB (hold memory on "
                    "one with another process)";
  }
  const uint64_t need = lo->device.free_bytes + (hi->device.free_bytes - lo->device.free_bytes) / 2;
  for (int i = 0; i < 5; ++i) {
    JobRequest j = Spin(1000);
    j.spec.placement.min_free_bytes = need;
    JobResult r = Run(j);
    EXPECT_EQ(r.state, JobState::kDone) << r.error;
    EXPECT_EQ(r.device, hi->device.uuid);
  }
  std::printf("free memory: %s %.1f GiB, %s %.1f GiB; jobs needing %.1f GiB ran on %s\n",
              lo->device.uuid.c_str(), lo->device.free_bytes / 1073741824.0,
              hi->device.uuid.c_str(), hi->device.free_bytes / 1073741824.0,
              need / 1073741824.0, hi->device.uuid.c_str());
}

}  // namespace
}  // namespace gpuq
