// Sessions on a real GPU (PROTOCOL.md, "Sessions"): a chain of kernels over
// session buffers against a CPU reference on fresh random inputs; writes
// and reads in flight against a CPU model; freed and
// foreign handles refused; a kernel fault in one tenant's session leaving
// another tenant's session on the same GPU intact, byte for byte; a launch
// past its run-time limit doing the same, and launches within it not; a
// launch's own buffers (in, inout, out) beside the session's.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "tests/gpu/gpu_fixture.h"

namespace gpuq::testing {
namespace {

using schema::Arg;
using schema::JobState;

class SessionsGpuTest : public GpuFixture {
 protected:
  static void SetUpTestSuite() { StartBroker("1"); }
  static void TearDownTestSuite() { StopBroker(); }

  std::unique_ptr<Session> Open(const std::string& tenant, bool through_broker = false) {
    SessionOptions o;
    o.tenant = tenant;
    o.through_broker = through_broker;
    auto s = client_->OpenSession(o);
    EXPECT_TRUE(s.ok()) << s.status().ToString() << Log();
    return s.ok() ? std::move(*s) : nullptr;
  }
  void Chain(bool through_broker);
  static SessionLaunch L(const std::string& entry, unsigned n, std::vector<Arg> args) {
    SessionLaunch l;
    l.kernel.source = kKernels;
    l.kernel.entry = entry;
    l.launch.grid = {(n + 255) / 256, 1, 1};
    l.launch.block = {256, 1, 1};
    l.args = std::move(args);
    return l;
  }
  static constexpr char kKernels[] = R"(
extern "C" __global__ void saxpy(float a, const float* x, float* y, unsigned n) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + y[i];
}
extern "C" __global__ void scale_add(float* y, float s, float c, unsigned n) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = y[i] * s + c;
}
extern "C" __global__ void fault(float* p, unsigned n) {
  *(volatile float*)(p + (1ull << 40)) = 1.0f;
}
extern "C" __global__ void spin_ns(unsigned long long ns) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (t - t0 < ns);
}
extern "C" __global__ void endless(const unsigned* never) {
  while (*(volatile const unsigned*)never == 0) {
  }
}
)";
};

TEST_F(SessionsGpuTest, AChainOfKernelsOverSessionBuffersMatchesTheCpu) { Chain(false); }

TEST_F(SessionsGpuTest, AChainThroughTheBrokerMatchesTheCpu) { Chain(true); }

// Ten steps of two kernels over two buffers of a session, on fresh random
// inputs, against the CPU; directly or with every request through the
// broker (PROTOCOL.md, "Sessions through the broker").
void SessionsGpuTest::Chain(bool through_broker) {
  auto s = Open(through_broker ? "chain-relayed" : "chain", through_broker);
  ASSERT_TRUE(s);
  const unsigned n = 1 << 20;
  const uint64_t bytes = uint64_t{n} * 4;
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  std::vector<float> x(n), y(n);
  for (unsigned i = 0; i < n; ++i) x[i] = d(rng_), y[i] = d(rng_);
  auto bx = s->Alloc(bytes), by = s->Alloc(bytes);
  ASSERT_TRUE(bx.ok() && by.ok());
  ASSERT_TRUE(s->Write(*bx, 0, x.data(), bytes).ok());
  ASSERT_TRUE(s->Write(*by, 0, y.data(), bytes).ok());
  // Ten steps, all in flight at once, the buffers never leaving the GPU.
  std::vector<float> want = y;
  std::vector<uint64_t> tickets;
  for (int step = 0; step < 10; ++step) {
    const float a = d(rng_), sc = d(rng_), c = d(rng_);
    auto t1 = s->LaunchAsync(L("saxpy", n, {Arg::F32(a), Arg::Ref(*bx), Arg::Ref(*by), Arg::U32(n)}));
    auto t2 = s->LaunchAsync(L("scale_add", n, {Arg::Ref(*by), Arg::F32(sc), Arg::F32(c), Arg::U32(n)}));
    ASSERT_TRUE(t1.ok() && t2.ok());
    tickets.push_back(*t1);
    tickets.push_back(*t2);
    for (unsigned i = 0; i < n; ++i) {
      want[i] = std::fmaf(a, x[i], want[i]);
      want[i] = std::fmaf(want[i], sc, c);
    }
  }
  for (uint64_t t : tickets) {
    auto ns = s->Wait(t);
    ASSERT_TRUE(ns.ok()) << ns.status().ToString();
    EXPECT_GT(*ns, 0u);
  }
  auto got = s->Read(*by, 0, bytes);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  const float* g = reinterpret_cast<const float*>(got->data());
  for (unsigned i = 0; i < n; ++i) {
    ASSERT_NEAR(g[i], want[i], 1e-4f * (1 + std::fabs(want[i]))) << "element " << i;
  }
  // Bytes of a buffer at an offset, and a copy between buffers.
  ASSERT_TRUE(s->Copy(*bx, 4, *by, 0, 8).ok());
  auto part = s->Read(*bx, 0, 12);
  ASSERT_TRUE(part.ok());
  EXPECT_EQ(std::memcmp(part->data(), x.data(), 4), 0);
  EXPECT_EQ(std::memcmp(part->data() + 4, g, 8), 0);
  EXPECT_TRUE(s->Close().ok());
}

// Writes and reads of up to 1 MiB travel through page-locked staging that
// the session's stream reuses once a copy has run; larger ones, and those
// past the staging cap, the old way. Hundreds in flight at once, of random
// sizes and offsets, interleaved with kernels: every read gives the bytes a
// CPU model of the buffer held when the read was sent.
TEST_F(SessionsGpuTest, ManyWritesAndReadsInFlightKeepTheirBytesAndOrder) {
  auto s = Open("staging");
  ASSERT_TRUE(s);
  const unsigned n = 1 << 20;  // floats: 4 MiB
  auto b = s->Alloc(uint64_t{n} * 4);
  ASSERT_TRUE(b.ok());
  std::vector<float> model(n, 0.0f);
  std::uniform_int_distribution<unsigned> pick(0, n - 1);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  struct Pending {
    uint64_t ticket;
    std::vector<float> want;
  };
  std::vector<Pending> reads;
  std::vector<uint64_t> others;
  for (int op = 0; op < 600; ++op) {
    // Sizes from one float to 1.25 MiB, so that some need no staging.
    const unsigned len = std::min<unsigned>(n, 1 + pick(rng_) % (op % 7 == 0 ? 327680 : 4096));
    const unsigned at = pick(rng_) % (n - len + 1);
    const int what = op % 10;
    if (what < 6) {
      std::vector<float> bytes(len);
      for (float& f : bytes) f = d(rng_);
      auto t = s->WriteAsync(*b, uint64_t{at} * 4, bytes.data(), uint64_t{len} * 4);
      ASSERT_TRUE(t.ok()) << t.status().ToString();
      others.push_back(*t);
      std::copy(bytes.begin(), bytes.end(), model.begin() + at);
    } else if (what < 9) {
      auto t = s->ReadAsync(*b, uint64_t{at} * 4, uint64_t{len} * 4);
      ASSERT_TRUE(t.ok()) << t.status().ToString();
      reads.push_back({*t, std::vector<float>(model.begin() + at, model.begin() + at + len)});
    } else {
      const float sc = d(rng_), c = d(rng_);
      auto t = s->LaunchAsync(L("scale_add", n, {Arg::Ref(*b), Arg::F32(sc), Arg::F32(c), Arg::U32(n)}));
      ASSERT_TRUE(t.ok()) << t.status().ToString();
      others.push_back(*t);
      for (float& f : model) f = std::fmaf(f, sc, c);
    }
  }
  for (uint64_t t : others) ASSERT_TRUE(s->Wait(t).ok());
  for (const Pending& r : reads) {
    auto got = s->WaitRead(r.ticket);
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    ASSERT_EQ(got->size(), r.want.size() * 4);
    const float* g = reinterpret_cast<const float*>(got->data());
    for (size_t i = 0; i < r.want.size(); ++i) {
      ASSERT_NEAR(g[i], r.want[i], 1e-4f * (1 + std::fabs(r.want[i]))) << "element " << i;
    }
  }
  EXPECT_TRUE(s->Close().ok());
}

// Untimed launches with a client that polls: it learns of each end from
// the word the GPU writes into the memory it shares with the session's
// process; the bytes are the CPU's.
TEST_F(SessionsGpuTest, UntimedLaunchesEndByTheGpusWordAndMatchTheCpu) {
  ClientOptions o;
  o.timeout = Millis(60000);
  o.spin = std::chrono::milliseconds(50);
  auto polling = Client::Connect(broker_->client_endpoint(), o);
  ASSERT_TRUE(polling.ok());
  SessionOptions so;
  so.tenant = "untimed";
  auto opened = (*polling)->OpenSession(so);
  ASSERT_TRUE(opened.ok()) << opened.status().ToString() << Log();
  Session& s = **opened;
  const unsigned n = 1 << 16;
  const uint64_t bytes = uint64_t{n} * 4;
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  std::vector<float> y(n);
  for (auto& v : y) v = d(rng_);
  auto by = s.Alloc(bytes);
  ASSERT_TRUE(by.ok());
  ASSERT_TRUE(s.Write(*by, 0, y.data(), bytes).ok());
  std::vector<float> want = y;
  for (int step = 0; step < 200; ++step) {
    const float sc = d(rng_), c = d(rng_);
    SessionLaunch l = L("scale_add", n, {Arg::Ref(*by), Arg::F32(sc), Arg::F32(c), Arg::U32(n)});
    l.timed = false;
    // Every tenth waited for at once, the rest kept in flight.
    auto t = s.LaunchAsync(l);
    ASSERT_TRUE(t.ok());
    if (step % 10 == 0) {
      auto ns = s.Wait(*t);
      ASSERT_TRUE(ns.ok()) << ns.status().ToString();
      EXPECT_EQ(*ns, 0u);
    }
    for (unsigned i = 0; i < n; ++i) want[i] = std::fmaf(want[i], sc, c);
  }
  auto got = s.Read(*by, 0, bytes);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  const float* g = reinterpret_cast<const float*>(got->data());
  for (unsigned i = 0; i < n; ++i) {
    ASSERT_NEAR(g[i], want[i], 1e-4f * (1 + std::fabs(want[i]))) << "element " << i;
  }
  EXPECT_TRUE(s.Close().ok());
}

// A region attached to a session: 64 MiB of fresh random floats from it to
// a buffer, a kernel over them, and back into another part of it, against
// the CPU; nothing travels in messages.
TEST_F(SessionsGpuTest, AnAttachedRegionsBytesRoundTripThroughAKernel) {
  auto s = Open("attach");
  ASSERT_TRUE(s);
  const unsigned n = 16u << 20;  // floats: 64 MiB
  const uint64_t bytes = uint64_t{n} * 4;
  auto region = client_->NewRegion(2 * bytes);
  ASSERT_TRUE(region.ok()) << region.status().ToString();
  float* mem = reinterpret_cast<float*>((*region)->data());
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  for (unsigned i = 0; i < n; ++i) mem[i] = d(rng_);
  auto h = s->Attach(**region);
  ASSERT_TRUE(h.ok()) << h.status().ToString() << Log();
  auto b = s->Alloc(bytes);
  ASSERT_TRUE(b.ok());
  const float sc = d(rng_), c = d(rng_);
  ASSERT_TRUE(s->WriteFrom(*b, 0, *h, 0, bytes).ok());
  ASSERT_TRUE(s->Launch(L("scale_add", n, {Arg::Ref(*b), Arg::F32(sc), Arg::F32(c), Arg::U32(n)})).ok());
  ASSERT_TRUE(s->ReadInto(*b, 0, bytes, *h, bytes).ok());
  for (unsigned i = 0; i < n; ++i) {
    const float want = std::fmaf(mem[i], sc, c);
    ASSERT_NEAR(mem[n + i], want, 1e-5f * (1 + std::fabs(want))) << "element " << i;
  }
  // Detached with a copy in flight: the copy runs, then the region is
  // unpinned; the session goes on.
  auto last = s->ReadIntoAsync(*b, 0, 4096, *h, 0);
  ASSERT_TRUE(last.ok());
  ASSERT_TRUE(s->Detach(*h).ok());
  ASSERT_TRUE(s->Wait(*last).ok());
  EXPECT_EQ(std::memcmp(mem, mem + n, 4096), 0) << "the copy sent before the detach ran";
  EXPECT_EQ(s->WriteFrom(*b, 0, *h, 0, 16).code(), Code::kNotFound);
  EXPECT_TRUE(s->Fill(*b, 0, 16, 0).ok());
  EXPECT_TRUE(s->Close().ok());
}

TEST_F(SessionsGpuTest, FreedAndForeignHandlesAreRefused) {
  auto a = Open("hands-a"), b = Open("hands-b");
  ASSERT_TRUE(a && b);
  auto ha = a->Alloc(4096), hb = b->Alloc(4096);
  ASSERT_TRUE(ha.ok() && hb.ok());
  ASSERT_TRUE(a->Fill(*ha, 0, 4096, 0x5a).ok());
  EXPECT_EQ(b->Read(*ha, 0, 16).status().code(), Code::kNotFound)
      << "a's handle means nothing in b's session (another process)";
  EXPECT_EQ(b->Launch(L("scale_add", 16, {Arg::Ref(*ha), Arg::F32(1), Arg::F32(1), Arg::U32(16)}))
                .status()
                .code(),
            Code::kNotFound);
  ASSERT_TRUE(a->Free(*ha).ok());
  EXPECT_EQ(a->Read(*ha, 0, 16).status().code(), Code::kNotFound) << "use after free";
  EXPECT_EQ(a->Launch(L("scale_add", 16, {Arg::Ref(*ha), Arg::F32(1), Arg::F32(1), Arg::U32(16)}))
                .status()
                .code(),
            Code::kNotFound);
  auto fresh = a->Alloc(4096);
  ASSERT_TRUE(fresh.ok());
  auto zeros = a->Read(*fresh, 0, 4096);
  ASSERT_TRUE(zeros.ok());
  EXPECT_EQ(*zeros, std::string(4096, '\0')) << "new memory reads as zeros, not freed bytes";
}

// A launch with fewer arguments than the kernel's parameters, or a
// narrower one, made the driver read past the session process's argument
// array: garbage passed, or the process (every session of its tenant on
// that GPU) gone. Refused; the session goes on.
TEST_F(SessionsGpuTest, ArgumentsThatDoNotMatchTheKernelsParametersAreRefused) {
  auto s = Open("args");
  ASSERT_TRUE(s);
  auto y = s->Alloc(64);
  ASSERT_TRUE(y.ok());
  auto few = s->Launch(L("scale_add", 16, {Arg::Ref(*y)}));
  EXPECT_EQ(few.status().code(), Code::kInvalid) << few.status().ToString();
  EXPECT_NE(few.status().message().find("takes 4 arguments, 1 given"), std::string::npos)
      << few.status().ToString();
  auto narrow =
      s->Launch(L("scale_add", 16, {Arg::Ref(*y), Arg::F32(1), Arg::F64(1), Arg::U32(16)}));
  EXPECT_EQ(narrow.status().code(), Code::kInvalid) << narrow.status().ToString();
  ASSERT_TRUE(s->Fill(*y, 0, 64, 0).ok());
  ASSERT_TRUE(
      s->Launch(L("scale_add", 16, {Arg::Ref(*y), Arg::F32(1), Arg::F32(2), Arg::U32(16)})).ok());
  auto got = s->Read(*y, 0, 64);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  std::vector<float> twos(16, 2.0f);
  EXPECT_EQ(*got, std::string(reinterpret_cast<const char*>(twos.data()), 64));
}

// A module's variables and a kernel's local memory are device memory
// outside the session's buffers and its limit: over the session process's
// bounds (64 MiB per module, 4 GiB of local memory) the launch is refused
// and the session goes on.
TEST_F(SessionsGpuTest, ModulesOverTheirDeviceMemoryBoundIsRefused) {
  auto s = Open("module-bounds");
  ASSERT_TRUE(s);
  auto y = s->Alloc(64);
  ASSERT_TRUE(y.ok());
  SessionLaunch big = L("touch", 1, {Arg::Ref(*y)});
  big.kernel.source = R"(
__device__ char big[1ull << 34];
extern "C" __global__ void touch(unsigned* out) { big[(1ull << 34) - 1] = 7; *out = big[(1ull << 34) - 1]; }
)";
  auto r = s->Launch(big);
  EXPECT_EQ(r.status().code(), Code::kResourceExhausted) << r.status().ToString();
  EXPECT_NE(r.status().message().find("over the limit of 64 MiB per module"), std::string::npos)
      << r.status().ToString();
  ASSERT_TRUE(s->Fill(*y, 0, 64, 0).ok());
  ASSERT_TRUE(
      s->Launch(L("scale_add", 16, {Arg::Ref(*y), Arg::F32(1), Arg::F32(2), Arg::U32(16)})).ok());
  auto got = s->Read(*y, 0, 64);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  std::vector<float> twos(16, 2.0f);
  EXPECT_EQ(*got, std::string(reinterpret_cast<const char*>(twos.data()), 64));
}

// gpuqd's module bound reaches the workers it starts and the session
// processes: 1 MiB refuses a module of a 2 MiB __device__ array in a job and
// in a session (the session process kept its default of 64 MiB, and gpuqd
// had no such option).
class SessionsBoundGpuTest : public SessionsGpuTest {
 protected:
  static void SetUpTestSuite() {
    StartBroker("1", {"--module-memory-mib", "1", "--session-kernels-memory-mib", "1"});
  }
  static void TearDownTestSuite() { StopBroker(); }
};

TEST_F(SessionsBoundGpuTest, GpuqdsModuleBoundReachesItsWorkersAndSessionProcesses) {
  const std::string source = R"(
__device__ char big[2 << 20];
extern "C" __global__ void touch(unsigned* out) { big[(2 << 20) - 1] = 7; *out = big[(2 << 20) - 1]; }
)";
  const char* kSaid = "over the limit of 1 MiB per module";
  JobRequest j = Kernel(source, "touch", {1, 1, 1}, {1, 1, 1});
  j.spec.args = {Arg::Out(4)};
  JobResult job = Run(j);
  EXPECT_EQ(job.state, JobState::kFailed);
  EXPECT_EQ(job.code, Code::kResourceExhausted) << job.error;
  EXPECT_NE(job.error.find(kSaid), std::string::npos) << job.error;
  auto s = Open("module-bound-1mib");
  ASSERT_TRUE(s);
  auto y = s->Alloc(4);
  ASSERT_TRUE(y.ok());
  SessionLaunch l = L("touch", 1, {Arg::Ref(*y)});
  l.kernel.source = source;
  auto r = s->Launch(l);
  EXPECT_EQ(r.status().code(), Code::kResourceExhausted) << r.status().ToString();
  EXPECT_NE(r.status().message().find(kSaid), std::string::npos) << r.status().ToString();
  // Under the bound, the session serves on.
  ASSERT_TRUE(s->Fill(*y, 0, 4, 0).ok());
  ASSERT_TRUE(s->Launch(L("scale_add", 1, {Arg::Ref(*y), Arg::F32(1), Arg::F32(2), Arg::U32(1)})).ok());
  auto got = s->Read(*y, 0, 4);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  const float two = 2.0f;
  EXPECT_EQ(*got, std::string(reinterpret_cast<const char*>(&two), 4));
}

// The modules of the kernels a tenant's sessions hold count together
// (--session-kernels-memory-mib 1): with a kernel of a 600 KiB array held,
// another is refused; the first goes on computing, and once its session
// ends the second loads and computes.
TEST_F(SessionsBoundGpuTest, TheModulesOfHeldKernelsAreBoundedInAll) {
  auto kernel = [](int i, Arg out) {
    const std::string n = std::to_string(i);
    SessionLaunch l = L("set" + n, 1, {out});
    l.kernel.source = "__device__ unsigned big" + n + "[150 << 10];\n" +
                      "extern \"C\" __global__ void set" + n + "(unsigned* out) { big" + n +
                      "[(150 << 10) - 1] = " + n + "; *out = big" + n + "[(150 << 10) - 1]; }\n";
    return l;
  };
  auto read = [](Session& s, uint64_t buffer) -> uint32_t {
    auto got = s.Read(buffer, 0, 4);
    if (!got.ok() || got->size() != 4) return 0;
    uint32_t v = 0;
    memcpy(&v, got->data(), 4);
    return v;
  };
  {
    auto s = Open("kernels-bound");
    ASSERT_TRUE(s);
    auto y = s->Alloc(4);
    ASSERT_TRUE(y.ok());
    ASSERT_TRUE(s->Launch(kernel(1, Arg::Ref(*y))).ok());
    EXPECT_EQ(read(*s, *y), 1u);
    auto r = s->Launch(kernel(2, Arg::Ref(*y)));
    EXPECT_EQ(r.status().code(), Code::kResourceExhausted) << r.status().ToString();
    EXPECT_NE(r.status().message().find("of the 1048576 bytes"), std::string::npos)
        << r.status().ToString();
    ASSERT_TRUE(s->Fill(*y, 0, 4, 0).ok());
    ASSERT_TRUE(s->Launch(kernel(1, Arg::Ref(*y))).ok());
    EXPECT_EQ(read(*s, *y), 1u) << "the held kernel goes on";
    ASSERT_TRUE(s->Close().ok());
  }
  auto s = Open("kernels-bound");
  ASSERT_TRUE(s);
  auto y = s->Alloc(4);
  ASSERT_TRUE(y.ok());
  auto r = s->Launch(kernel(2, Arg::Ref(*y)));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(read(*s, *y), 2u);
}

TEST_F(SessionsGpuTest, AFaultInOneTenantsSessionLeavesAnotherTenantsIntact) {
  auto a = Open("fault-a"), b = Open("fault-b");
  ASSERT_TRUE(a && b);
  const unsigned n = 1 << 16;
  std::vector<float> keep(n);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  for (float& v : keep) v = d(rng_);
  auto hb = b->Alloc(n * 4);
  ASSERT_TRUE(hb.ok());
  ASSERT_TRUE(b->Write(*hb, 0, keep.data(), n * 4).ok());
  auto ha = a->Alloc(n * 4);
  ASSERT_TRUE(ha.ok());
  auto f = a->Launch(L("fault", 1, {Arg::Ref(*ha), Arg::U32(n)}));
  EXPECT_EQ(f.status().code(), Code::kSessionLost) << f.status().ToString();
  EXPECT_EQ(a->Alloc(16).status().code(), Code::kSessionLost);
  auto got = b->Read(*hb, 0, n * 4);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(std::memcmp(got->data(), keep.data(), n * 4), 0) << "b's bytes, exactly";
  // b's session still runs kernels.
  ASSERT_TRUE(b->Launch(L("scale_add", n, {Arg::Ref(*hb), Arg::F32(2), Arg::F32(0), Arg::U32(n)})).ok());
  auto twice = b->Read(*hb, 0, 4);
  ASSERT_TRUE(twice.ok());
  float v;
  std::memcpy(&v, twice->data(), 4);
  EXPECT_EQ(v, 2 * keep[0]);
  // And the tenant that faulted opens a new session.
  auto again = Open("fault-a");
  ASSERT_TRUE(again);
  EXPECT_TRUE(again->Alloc(16).ok());
}

TEST_F(SessionsGpuTest, ALaunchsOwnBuffersMatchTheCpuBesideTheSessionsBuffers) {
  auto s = Open("own");
  ASSERT_TRUE(s);
  const unsigned n = 1 << 18;
  const uint64_t bytes = uint64_t{n} * 4;
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  std::vector<float> x(n), y(n);
  for (unsigned i = 0; i < n; ++i) x[i] = d(rng_), y[i] = d(rng_);
  auto by = s->Alloc(bytes);
  ASSERT_TRUE(by.ok());
  ASSERT_TRUE(s->Write(*by, 0, y.data(), bytes).ok());
  // x comes with each launch (in), y stays in the session, and a copy of
  // it goes in and out (inout): all in flight at once.
  std::vector<uint64_t> tickets;
  std::vector<float> want = y, a(8);
  for (int step = 0; step < 8; ++step) {
    a[step] = d(rng_);
    SessionLaunch l = L("saxpy", n, {Arg::F32(a[step]), Arg::In(0), Arg::Ref(*by), Arg::U32(n)});
    l.inputs = {std::string_view(reinterpret_cast<const char*>(x.data()), bytes)};
    auto t = s->LaunchAsync(l);
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    tickets.push_back(*t);
    for (unsigned i = 0; i < n; ++i) want[i] = std::fmaf(a[step], x[i], want[i]);
  }
  SessionLaunch io = L("saxpy", n, {Arg::F32(3), Arg::In(1), Arg::InOut(0), Arg::U32(n)});
  io.inputs = {std::string_view(reinterpret_cast<const char*>(y.data()), bytes),
               std::string_view(reinterpret_cast<const char*>(x.data()), bytes)};
  auto t_io = s->LaunchAsync(io);
  ASSERT_TRUE(t_io.ok()) << t_io.status().ToString();
  for (uint64_t t : tickets) ASSERT_TRUE(s->Wait(t).ok());
  std::vector<std::string> out;
  auto ns = s->Wait(*t_io, &out);
  ASSERT_TRUE(ns.ok()) << ns.status().ToString();
  EXPECT_GT(*ns, 0u);
  ASSERT_EQ(out.size(), 1u);
  ASSERT_EQ(out[0].size(), bytes);
  const float* io_got = reinterpret_cast<const float*>(out[0].data());
  for (unsigned i = 0; i < n; ++i) {
    const float w = std::fmaf(3.0f, x[i], y[i]);
    ASSERT_NEAR(io_got[i], w, 1e-6f * (1 + std::fabs(w))) << "inout element " << i;
  }
  auto got = s->Read(*by, 0, bytes);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  const float* g = reinterpret_cast<const float*>(got->data());
  for (unsigned i = 0; i < n; ++i) {
    ASSERT_NEAR(g[i], want[i], 1e-5f * (1 + std::fabs(want[i]))) << "element " << i;
  }
  // An out buffer starts as zeros: 1 * 0 + 0.5 everywhere.
  SessionLaunch zeros =
      L("scale_add", n, {Arg::Out(bytes), Arg::F32(1), Arg::F32(0.5f), Arg::U32(n)});
  ASSERT_TRUE(s->Launch(zeros, &out).ok());
  ASSERT_EQ(out.size(), 1u);
  const float* z = reinterpret_cast<const float*>(out[0].data());
  EXPECT_EQ(z[0], 0.5f);
  EXPECT_EQ(z[n - 1], 0.5f);
}

TEST_F(SessionsGpuTest, ALaunchPastItsRunTimeLimitEndsOnlyItsTenantsSessions) {
  SessionOptions limited;
  limited.tenant = "limit-a";
  limited.time_limit = std::chrono::milliseconds(400);
  auto opened = client_->OpenSession(limited);
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  auto& a = *opened;
  auto b = Open("limit-b");
  ASSERT_TRUE(b);
  const unsigned n = 1 << 16;
  std::vector<float> keep(n);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  for (float& v : keep) v = d(rng_);
  auto hb = b->Alloc(n * 4);
  ASSERT_TRUE(hb.ok());
  ASSERT_TRUE(b->Write(*hb, 0, keep.data(), n * 4).ok());
  // Eight launches of 150 ms sent at once: 1.2 s of work, each launch well
  // within the limit. None is cut short.
  std::vector<uint64_t> tickets;
  for (int i = 0; i < 8; ++i) {
    auto t = a->LaunchAsync(L("spin_ns", 1, {Arg::Scalar(schema::ScalarType::kU64, 150'000'000)}));
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    tickets.push_back(*t);
  }
  for (uint64_t t : tickets) {
    auto ns = a->Wait(t);
    ASSERT_TRUE(ns.ok()) << ns.status().ToString() << Log();
    EXPECT_GE(*ns, 140'000'000u) << "it ran its whole time";
  }
  auto never = a->Alloc(4);  // zeros: the kernel waits for a word nothing writes
  ASSERT_TRUE(never.ok());
  const auto t0 = std::chrono::steady_clock::now();
  auto endless = a->LaunchAsync(L("endless", 1, {Arg::Ref(*never)}));
  ASSERT_TRUE(endless.ok());
  // A kernel not loaded yet: its module's load waits in the driver for the
  // endless one (the watchdog must not).
  auto behind = a->LaunchAsync(L("scale_add", 1, {Arg::Ref(*never), Arg::F32(1), Arg::F32(0),
                                                  Arg::U32(1)}));
  ASSERT_TRUE(behind.ok());
  auto f = a->Wait(*endless);
  const auto waited = std::chrono::steady_clock::now() - t0;
  EXPECT_EQ(f.status().code(), Code::kSessionLost) << f.status().ToString();
  EXPECT_NE(f.status().message().find("run-time limit of 400 ms"), std::string::npos)
      << f.status().ToString();
  EXPECT_GE(waited, std::chrono::milliseconds(400)) << "never before its limit";
  auto got = b->Read(*hb, 0, n * 4);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(std::memcmp(got->data(), keep.data(), n * 4), 0) << "b's bytes, exactly";
  ASSERT_TRUE(
      b->Launch(L("scale_add", n, {Arg::Ref(*hb), Arg::F32(2), Arg::F32(0), Arg::U32(n)})).ok());
  auto again = Open("limit-a");
  ASSERT_TRUE(again);
  EXPECT_TRUE(again->Launch(L("spin_ns", 1, {Arg::Scalar(schema::ScalarType::kU64, 1000)})).ok());
  printf("an endless launch under a 400 ms limit ended its session after %.0f ms\n",
         std::chrono::duration<double, std::milli>(waited).count());
}

}  // namespace
}  // namespace gpuq::testing
