// Jobs of several launches through gpuqd, with the worker test double
// (PROTOCOL.md, "Jobs of several launches"): buffers declared once and
// named by index, sources compiled once each by NVRTC, module images sent
// once per module, limits, and errors that name their launch or source.
// The launches' results on a GPU are the GPU tests' (tests/gpu/).
#include <gtest/gtest.h>

#include "tests/broker_fixture.h"

namespace gpuq::testing {
namespace {

using schema::Arg;
using schema::JobState;
using schema::KernelLaunch;

// A second source: its kernel `m` takes two buffers.
constexpr char kSecondSource[] =
    "extern \"C\" __global__ void m(unsigned char* a, unsigned char* b) {}\n"
    "template <typename T> __global__ void t(T* a) {}\n";

class LaunchesTest : public BrokerTest {
 protected:
  // An inout buffer (0), 64 scratch bytes (1) and an 8-byte out buffer (2);
  // k from source 0, then m from source 1, then `last` from source 0.
  JobRequest Launches(const std::string& input, const std::string& last = "k") {
    inputs_.push_back(input);
    JobRequest j;
    j.spec.kernel.source = kKernels;
    j.spec.sources.emplace_back().source = kSecondSource;
    j.spec.buffers = {Arg::InOut(0), Arg::Scratch(64), Arg::Out(8)};
    KernelLaunch l;
    l.launch.grid = {1, 1, 1};
    l.launch.block = {32, 1, 1};
    l.entry = "k";
    l.args = {Arg::Ref(0), Arg::Ref(1)};
    j.spec.launches.push_back(l);
    l.source = 1;
    l.entry = "m";
    l.args = {Arg::Ref(1, 32), Arg::Ref(2)};
    j.spec.launches.push_back(l);
    l.source = 0;
    l.entry = last;
    l.args = {Arg::Ref(2), Arg::Ref(0)};
    j.spec.launches.push_back(l);
    j.inputs = {inputs_.back()};
    return j;
  }
};

TEST_F(LaunchesTest, AJobOfSeveralLaunchesReturnsItsOutBuffersByIndex) {
  AddWorker();
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  auto id = c->Submit(Launches(std::string("\x01\x02\xff", 3)));
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  auto r = c->Wait(*id);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->state, JobState::kDone) << r->error;
  EXPECT_EQ(r->output_args, (std::vector<uint32_t>{0, 2})) << "inout and out; scratch never";
  ASSERT_NE(r->Output(0), nullptr);
  EXPECT_EQ(*r->Output(0), std::string("\x02\x03\x00", 3)) << "the test double adds 1";
  ASSERT_NE(r->Output(2), nullptr);
  EXPECT_EQ(*r->Output(2), std::string(8, '\x03')) << "out buffer 2 filled with 2 + 1";
  EXPECT_EQ(r->Output(1), nullptr);
  EXPECT_EQ(r->timing.launch_us, (std::vector<uint64_t>{1, 1, 1})) << "one time per launch";
  // Fetched from the store, the same.
  auto again = c->Fetch(*id);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(again->output_args, r->output_args);
  EXPECT_EQ(again->timing.launch_us, r->timing.launch_us);
}

TEST_F(LaunchesTest, ModuleImagesTravelOncePerModule) {
  // The test double fails a job whose module it was never sent; jobs of
  // one and of several launches share modules by key.
  AddWorker();
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  for (int i = 0; i < 3; ++i) {
    auto id = c->Submit(i == 1 ? Job("k", "ab") : Launches("ab"));
    ASSERT_TRUE(id.ok()) << id.status().ToString();
    auto r = c->Wait(*id);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->state, JobState::kDone) << "job " << i << ": " << r->error;
  }
}

TEST_F(LaunchesTest, AMissingKernelOrACompileErrorNamesItsSource) {
  AddWorker();
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  JobRequest j = Launches("x");
  j.spec.launches[1].entry = "no_such_kernel";
  auto id = c->Submit(j);
  ASSERT_TRUE(id.ok());
  auto r = c->Wait(*id);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->code, Code::kInvalid) << r->error;
  EXPECT_NE(r->error.find("source 1"), std::string::npos) << r->error;
  EXPECT_NE(r->error.find("no_such_kernel"), std::string::npos) << r->error;

  j = Launches("x");
  j.spec.sources[0].source = "extern \"C\" __global__ void m(unsigned char* a) { oops(); }\n";
  id = c->Submit(j);
  ASSERT_TRUE(id.ok());
  r = c->Wait(*id);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->code, Code::kCompileError);
  EXPECT_NE(r->error.find("oops"), std::string::npos) << r->error;
  EXPECT_NE(r->error.find("source 1"), std::string::npos) << r->error;
}

TEST_F(LaunchesTest, NameExpressionsOfOneSourceCompileTogether) {
  AddWorker();
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  JobRequest j = Launches("x");
  for (const char* e : {"t<float>", "t<int>"}) {
    KernelLaunch l;
    l.source = 1;
    l.entry = e;
    l.name_expression = true;
    l.launch.block = {1, 1, 1};
    l.args = {Arg::Ref(2)};
    j.spec.launches.push_back(l);
  }
  auto id = c->Submit(j);
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  auto r = c->Wait(*id);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->state, JobState::kDone) << r->error;
  EXPECT_EQ(r->timing.launch_us.size(), 5u);
}

// What the broker admits, its workers must read. A job of 256 buffers and
// two sources took 258 payload frames on its first dispatch (the images
// travel with it), past the 257 a worker decoded; a name expression whose
// lowered name passed 1 KiB (a long type behind a short alias) made an
// entry past the worker's bound on names. The worker dropped such a job,
// and the broker waited its time limit and gave the worker up. Both run.
// Heartbeats of 500 ms: a loaded machine that delays one by 300 ms must not
// look like that loss.
TEST_F(LaunchesTest, WhatTheBrokerAdmitsAWorkerReads) {
  ASSERT_TRUE(StartBroker({"--heartbeat-ms", "500"})) << Log();
  AddWorker({"--heartbeat-ms", "500"});
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  JobRequest wide;
  wide.spec.kernel.source = kKernels;
  wide.spec.sources.emplace_back().source = kSecondSource;
  wide.spec.time_limit_ms = 2000;
  for (uint32_t i = 0; i < 256; ++i) {
    wide.spec.buffers.push_back(Arg::In(i));
    wide.inputs.push_back("x");
  }
  KernelLaunch l;
  l.launch.block = {1, 1, 1};
  l.entry = "k";
  l.args = {Arg::Ref(0), Arg::Ref(1)};
  wide.spec.launches.push_back(l);
  l.source = 1;
  l.entry = "m";
  l.args = {Arg::Ref(254), Arg::Ref(255)};
  wide.spec.launches.push_back(l);
  auto id = c->Submit(wide);
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  auto r = c->Wait(*id);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->state, JobState::kDone) << r->error;

  const std::string name(1500, 'L');
  JobRequest deep = Job("t<Long>", "ab");
  deep.spec.kernel.source = "struct " + name + " {};\nusing Long = " + name + ";\n" +
                            "template <typename T> __global__ void t(unsigned char* a) {}\n";
  deep.spec.kernel.name_expression = true;
  deep.spec.time_limit_ms = 2000;
  id = c->Submit(deep);
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  r = c->Wait(*id);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->state, JobState::kDone) << r->error;
  auto d = c->Devices();
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->size(), 1u) << "the worker was given up\n" << Log();
}

TEST_F(LaunchesTest, AFaultNamesItsLaunch) {
  AddWorker();
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  auto id = c->Submit(Launches("x", "fault"));
  ASSERT_TRUE(id.ok());
  auto r = c->Wait(*id);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->code, Code::kKernelFault) << r->error;
  EXPECT_EQ(r->error.rfind("launch 2: ", 0), 0u) << r->error;
}

TEST_F(LaunchesTest, TheBrokersLimitsRefuseAJobAndNameTheLimit) {
  ASSERT_TRUE(StartBroker({"--max-launches", "2", "--max-scratch-mb", "1"})) << Log();
  AddWorker();
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  auto id = c->Submit(Launches("x"));
  ASSERT_FALSE(id.ok());
  EXPECT_EQ(id.status().code(), Code::kTooLarge);
  EXPECT_NE(id.status().message().find("'launches' is over its limit of 2"), std::string::npos)
      << id.status().ToString();
  JobRequest j = Launches("x");
  j.spec.launches.pop_back();
  j.spec.buffers[1] = Arg::Scratch((1u << 20) + 1);
  id = c->Submit(j);
  ASSERT_FALSE(id.ok());
  EXPECT_EQ(id.status().code(), Code::kTooLarge);
  EXPECT_NE(id.status().message().find("scratch"), std::string::npos) << id.status().ToString();
  j.spec.buffers[1] = Arg::Scratch(64);
  id = c->Submit(j);
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  auto r = c->Wait(*id);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->state, JobState::kDone) << r->error;
}

TEST_F(LaunchesTest, OptionsOfEverySourceAreChecked) {
  auto c = Connect();
  JobRequest j = Launches("x");
  j.spec.sources[0].options = {"-I/etc"};
  auto id = c->Submit(j);
  ASSERT_FALSE(id.ok());
  EXPECT_EQ(id.status().code(), Code::kInvalid);
  EXPECT_NE(id.status().message().find("source 1"), std::string::npos) << id.status().ToString();
}

}  // namespace
}  // namespace gpuq::testing
