// The broker as a real process (gpuqd) with real sockets, a real SQLite
// store and worker test doubles (gpuq-fake-worker, tests/fake_worker.cc) as
// real processes. No GPU is needed.
#include <gtest/gtest.h>
#include <arpa/inet.h>
#include <httplib.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>
#include <signal.h>
#include <sqlite3.h>

#include <atomic>
#include <algorithm>
#include <deque>
#include <fstream>
#include <sys/stat.h>

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <thread>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "gpuq/client.h"
#include "tests/broker_fixture.h"
#include "schema/codec.h"
#include "tests/process_util.h"
#include "tests/test_util.h"
#include "util/curve_keys.h"
#include "util/fd.h"

namespace gpuq {
namespace {

using schema::Arg;
using schema::JobState;
using testing::BrokerProcess;
using testing::BrokerTest;
using testing::kKernels;
using testing::Process;
using testing::TempDir;

TEST_F(BrokerTest, SubmittedJobRunsAndItsResultIsPushedBack) {
  AddWorker();
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  const std::string input = "\x01\x02\x03\xff";
  auto id = c->Submit(Job("k", input));
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  auto r = c->Wait(*id);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->state, JobState::kDone) << r->error;
  EXPECT_EQ(r->attempts, 1u);
  EXPECT_FALSE(r->device.empty());
  ASSERT_NE(r->Output(0), nullptr);
  EXPECT_EQ(*r->Output(0), std::string("\x02\x03\x04\x00", 4)) << "inout came back +1";
  ASSERT_NE(r->Output(2), nullptr);
  EXPECT_EQ(*r->Output(2), std::string(16, '\x03')) << "out came back filled";
  EXPECT_GE(r->timing.total_us, r->timing.queue_us);
  // The result stays fetchable, with its buffers.
  auto again = c->Fetch(*id);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->outputs, r->outputs);
}

TEST_F(BrokerTest, AClientThatSpinsGetsItsAnswersAndItsTimeouts) {
  ClientOptions o;
  o.spin = std::chrono::microseconds(2000);
  o.timeout = Millis(300);
  auto c = Client::Connect(broker_->client_endpoint(), o);
  ASSERT_TRUE(c.ok());
  // No worker yet: waiting ends in a timeout (spinning does not end it early
  // or make it hang).
  auto id = (*c)->Submit(Job("k", "a"));
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  auto none = (*c)->Wait(*id);
  EXPECT_EQ(none.status().code(), Code::kTimeout);
  AddWorker();
  for (int i = 0; i < 20; ++i) {
    auto more = (*c)->Submit(Job("k", std::string(1, static_cast<char>(i))));
    ASSERT_TRUE(more.ok()) << more.status().ToString();
    auto r = (*c)->Wait(*more, Millis(10000));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(*r->Output(0), std::string(1, static_cast<char>(i + 1)));
  }
}

TEST_F(BrokerTest, ResubmitWithTheSameKeyReturnsTheSameJob) {
  auto c = Connect();
  JobRequest j = Job("k", "abc");
  j.spec.key = "vm-3/job-17";
  auto first = c->Submit(j);
  ASSERT_TRUE(first.ok());
  auto second = c->Submit(j);
  ASSERT_TRUE(second.ok());
  EXPECT_EQ(*first, *second);
  j.spec.tenant = "other-tenant";  // keys are per tenant
  auto third = c->Submit(j);
  ASSERT_TRUE(third.ok());
  EXPECT_NE(*third, *first);
}

TEST_F(BrokerTest, CompileErrorEndsTheJobWithTheFullLog) {
  AddWorker();
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  JobRequest j = Job("k", "x");
  j.spec.kernel.source = "extern \"C\" __global__ void k(unsigned char* a) { oops(); }\n";
  auto id = c->Submit(j);
  ASSERT_TRUE(id.ok());
  auto r = c->Wait(*id);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->state, JobState::kFailed);
  EXPECT_EQ(r->code, Code::kCompileError);
  EXPECT_NE(r->error.find("oops"), std::string::npos) << r->error;
}

TEST_F(BrokerTest, KernelNameMissingFromTheSourceIsInvalid) {
  AddWorker();
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  auto id = c->Submit(Job("no_such_kernel", "x"));
  ASSERT_TRUE(id.ok());
  auto r = c->Wait(*id);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->code, Code::kInvalid);
  EXPECT_NE(r->error.find("no_such_kernel"), std::string::npos);
}

TEST_F(BrokerTest, BadSubmitsAreRefusedWithAClearCode) {
  auto c = Connect();
  JobRequest j = Job("k", "x");
  j.spec.kernel.options = {"-I/etc"};
  EXPECT_EQ(c->Submit(j).status().code(), Code::kInvalid);
  j = Job("k", "x");
  j.spec.launch.block = {2048, 1, 1};
  EXPECT_EQ(c->Submit(j).status().code(), Code::kInvalid);
  j = Job("k", "x");
  j.inputs.push_back("an extra frame no argument names");
  EXPECT_EQ(c->Submit(j).status().code(), Code::kInvalid);
  EXPECT_EQ(c->GetStatus(987654).status().code(), Code::kNotFound);
}

TEST_F(BrokerTest, QueuedJobCanBeCanceled) {
  auto c = Connect();  // no worker: the job stays queued
  auto id = c->Submit(Job("k", "x"));
  ASSERT_TRUE(id.ok());
  auto st = c->Cancel(*id);
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(*st, JobState::kCanceled);
  auto r = c->Wait(*id);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->state, JobState::kCanceled);
  // Canceling again reports the state it has.
  EXPECT_EQ(*c->Cancel(*id), JobState::kCanceled);
}

TEST_F(BrokerTest, FullTenantQueueIsRefusedWithARetryHint) {
  ASSERT_TRUE(StartBroker({"--max-queued-per-tenant", "3"})) << Log();
  auto c = Connect();
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(c->Submit(Job("k", "x")).ok());
  auto rid = c->SubmitAsync(Job("k", "x"));
  ASSERT_TRUE(rid.ok());
  auto e = c->Poll(Millis(5000));
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->kind, Client::Event::kRejected);
  EXPECT_EQ(e->error.code(), Code::kQueueFull);
  EXPECT_GT(e->retry_after_ms, 0u);
  JobRequest other = Job("k", "x");
  other.spec.tenant = "another";
  EXPECT_TRUE(c->Submit(other).ok()) << "another tenant's queue is not full";
}

TEST_F(BrokerTest, HigherPriorityRunsFirst) {
  auto c = Connect();
  std::vector<uint64_t> low, high;
  for (int i = 0; i < 5; ++i) low.push_back(*c->Submit(Job("slow", "x")));
  for (int i = 0; i < 5; ++i) {
    JobRequest j = Job("slow", "x");
    j.spec.priority = 9;
    high.push_back(*c->Submit(j));
  }
  AddWorker({"--slots", "1"});
  std::vector<uint64_t> order;
  while (order.size() < 10) {
    auto e = c->Poll(Millis(10000));
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    if (e->kind == Client::Event::kResult) order.push_back(e->id);
  }
  std::set<uint64_t> first_five(order.begin(), order.begin() + 5);
  EXPECT_EQ(first_five, std::set<uint64_t>(high.begin(), high.end()));
}

TEST_F(BrokerTest, OneTenantsFloodDoesNotStarveAnother) {
#if defined(__SANITIZE_THREAD__)
  // Shares of GPU time measured from jobs of 5-20 ms: under ThreadSanitizer
  // a job now and then holds its worker for hundreds of ms (the
  // instrumentation's own work: 223 ms measured), which is charged as GPU
  // time and swamps the measure. The ASan and Release builds run it.
  GTEST_SKIP() << "timing shares are not measurable under ThreadSanitizer";
#endif
  auto c = Connect();
  for (int i = 0; i < 40; ++i) {
    JobRequest j = Job("k", "x");
    j.spec.tenant = "flood";
    ASSERT_TRUE(c->Submit(j).ok());
  }
  std::set<uint64_t> small;
  for (int i = 0; i < 4; ++i) {
    JobRequest j = Job("k", "x");
    j.spec.tenant = "small";
    small.insert(*c->Submit(j));
  }
  AddWorker({"--slots", "1", "--delay-us", "5000"});
  // Each job's time on the worker (dispatch to result), placed on the
  // client's clock by when its result came.
  struct Ran {
    bool small;
    double start_us, held_us;
  };
  std::vector<Ran> ran;
  const auto t0 = std::chrono::steady_clock::now();
  while (ran.size() < 44) {
    auto e = c->Poll(Millis(20000));
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    if (e->kind != Client::Event::kResult) continue;
    const double now =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    const double held = static_cast<double>(e->result.timing.total_us - e->result.timing.queue_us);
    ran.push_back({small.count(e->id) > 0, now - held, held});
  }
  // Equal weights: while both had jobs queued (until either's last job
  // started), each held the GPU about half the time, whatever the lengths
  // of the jobs. First in, first out would give the small tenant nothing
  // until the flood had run.
  double last[2] = {0, 0};
  for (const Ran& r : ran) last[r.small] = std::max(last[r.small], r.start_us);
  const double window = std::min(last[0], last[1]);
  double held[2] = {0, 0};
  for (const Ran& r : ran) {
    if (r.start_us <= window) held[r.small] += r.held_us;
  }
  const double share = held[1] / (held[0] + held[1]);
  EXPECT_GT(share, 0.3) << "the small tenant's share of GPU time: " << share;
  EXPECT_LT(share, 0.7) << "the small tenant's share of GPU time: " << share;
}

TEST_F(BrokerTest, ModulesAreSentOnceAndTheWorkersSetStaysInStep) {
  AddWorker({"--slots", "1", "--module-slots", "2"});
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  // Three kernels cycling through a worker that keeps two modules: the
  // broker must resend each image exactly when the worker has dropped it.
  std::vector<uint64_t> ids;
  for (int round = 0; round < 4; ++round) {
    for (int k = 0; k < 3; ++k) {
      JobRequest j = Job("k", "x");
      j.spec.kernel.source = std::string(kKernels) + "// module " + std::to_string(k) + "\n";
      ids.push_back(*c->Submit(j));
    }
  }
  for (uint64_t id : ids) {
    auto r = c->Wait(id);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->state, JobState::kDone) << r->error;
  }
}

TEST_F(BrokerTest, JobsOfAKilledWorkerAreRequeuedAndFinish) {
  // Heartbeats of 1 s: the suspects run alone afterwards, and a worker
  // silent for 3 heartbeats while running one convicts it; a loaded machine
  // under a sanitizer can stall a process for more than 300 ms.
  ASSERT_TRUE(StartBroker({"--heartbeat-ms", "1000"})) << Log();
  Process& doomed =
      AddWorker({"--slots", "4", "--delay-us", "300000", "--heartbeat-ms", "1000"});
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  std::vector<uint64_t> ids;
  for (int i = 0; i < 8; ++i) ids.push_back(*c->Submit(Job("k", std::string(1, char(i)))));
  ASSERT_TRUE(WaitDispatched(*c, ids[0]));
  doomed.Kill();
  AddWorker({"--slots", "4", "--heartbeat-ms", "1000"});
  int requeued = 0;
  for (size_t i = 0; i < ids.size(); ++i) {
    auto r = c->Wait(ids[i], Millis(20000));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->state, JobState::kDone) << r->error;
    ASSERT_NE(r->Output(0), nullptr);
    EXPECT_EQ(*r->Output(0), std::string(1, char(i + 1)));
    requeued += r->attempts > 1;
  }
  EXPECT_GE(requeued, 1) << "jobs in flight on the killed worker ran again";
}

TEST_F(BrokerTest, ASilentWorkerIsDeclaredGoneAndItsJobsRunElsewhere) {
  Process& frozen = AddWorker({"--slots", "2", "--delay-us", "200000"});
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  auto id = c->Submit(Job("k", "q"));
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(WaitDispatched(*c, *id));
  frozen.Signal(SIGSTOP);  // alive, but silent: no heartbeats
  AddWorker();
  auto r = c->Wait(*id, Millis(10000));
  frozen.Signal(SIGCONT);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->state, JobState::kDone);
  EXPECT_EQ(r->attempts, 2u);
  EXPECT_NE(Log().find("silent"), std::string::npos);
}

TEST_F(BrokerTest, AFaultingJobFailsAloneAndInnocentJobsFinish) {
  // Two workers; each fakes a sticky fault on "fault" (it exits, taking its
  // jobs with it) unless the job runs alone, when it reports kernel_fault.
  AddWorker({"--slots", "4", "--delay-us", "50000"});
  AddWorker({"--slots", "4", "--delay-us", "50000"});
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 2));
  std::vector<uint64_t> innocent;
  for (int i = 0; i < 6; ++i) innocent.push_back(*c->Submit(Job("k", "i")));
  auto culprit = c->Submit(Job("fault", "f"));
  ASSERT_TRUE(culprit.ok());
  for (int i = 0; i < 6; ++i) innocent.push_back(*c->Submit(Job("k", "i")));
  // Keep two workers up, as a supervisor would.
  std::atomic<bool> done{false};
  std::thread keeper([&] {
    while (!done) {
      for (auto& w : workers_) {
        if (!w.running()) {
          w = Process::Start({testing::BinPath("gpuq-fake-worker"), "--broker",
                              broker_->worker_endpoint(), "--heartbeat-ms", "100", "--slots",
                              "4", "--delay-us", "50000"},
                             dir_.File("workers.log"));
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  auto r = c->Wait(*culprit, Millis(30000));
  std::vector<JobResult> others;
  for (uint64_t id : innocent) {
    auto o = c->Wait(id, Millis(30000));
    if (o.ok()) others.push_back(*o);
  }
  done = true;
  keeper.join();
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->state, JobState::kFailed);
  EXPECT_EQ(r->code, Code::kKernelFault) << r->error;
  ASSERT_EQ(others.size(), innocent.size());
  for (const auto& o : others) EXPECT_EQ(o.state, JobState::kDone) << o.id << ": " << o.error;
}

TEST_F(BrokerTest, JobsArePlacedByArchitectureGpuAndFreeMemory) {
  AddWorker({"--arch", "sm_80", "--uuid", "GPU-a80"});
  AddWorker({"--arch", "sm_90", "--uuid", "GPU-b90"});
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 2));
  for (int i = 0; i < 4; ++i) {
    JobRequest by_gpu = Job("k", "g");
    by_gpu.spec.placement.gpu = "GPU-a80";
    auto r = c->Wait(*c->Submit(by_gpu));
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->device, "GPU-a80");
    JobRequest by_arch = Job("k", "a");
    by_arch.spec.placement.arch = "sm_90";
    r = c->Wait(*c->Submit(by_arch));
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->device, "GPU-b90");
  }
  // The doubles report 16 GiB free: a job that needs more waits, and can be
  // canceled; one that fits runs.
  JobRequest big = Job("k", "m");
  big.spec.placement.min_free_bytes = 32ull << 30;
  auto waiting = c->Submit(big);
  ASSERT_TRUE(waiting.ok());
  JobRequest fits = Job("k", "f");
  fits.spec.placement.min_free_bytes = 8ull << 30;
  auto ran = c->Wait(*c->Submit(fits));
  ASSERT_TRUE(ran.ok());
  EXPECT_EQ(ran->state, JobState::kDone);
  auto st = c->GetStatus(*waiting);
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->state, JobState::kQueued);
  EXPECT_EQ(*c->Cancel(*waiting), JobState::kCanceled);
}

TEST_F(BrokerTest, AsyncClientFuturesAndCallbacksFromSeveralThreads) {
  AddWorker({"--slots", "8"});
  auto sync = Connect();
  ASSERT_TRUE(WaitForWorkers(*sync, 1));
  auto async = AsyncClient::Connect(broker_->client_endpoint());
  ASSERT_TRUE(async.ok());
  AsyncClient& c = **async;
  std::atomic<int> good{0}, called_back{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::vector<std::pair<std::future<StatusOr<uint64_t>>, char>> submitted;
      for (int i = 0; i < 25; ++i) {
        std::string input(1, static_cast<char>(t * 25 + i));
        JobRequest j;
        j.spec.kernel.source = kKernels;
        j.spec.kernel.entry = "k";
        j.spec.args = {Arg::InOut(0)};
        j.inputs = {input};  // copied by Submit: `input` may go now
        submitted.emplace_back(c.Submit(j), input[0]);
      }
      for (auto& [f, byte] : submitted) {
        StatusOr<uint64_t> id = f.get();
        EXPECT_TRUE(id.ok()) << id.status().ToString();
        if (!id.ok()) continue;
        c.OnResult(*id, [&](StatusOr<JobResult> r) { called_back += r.ok(); });
        StatusOr<JobResult> r = c.Result(*id).get();
        EXPECT_TRUE(r.ok() && r->ok()) << *id << ": "
                                      << (r.ok() ? r->error : r.status().ToString());
        if (r.ok() && r->ok() && *r->Output(0) == std::string(1, static_cast<char>(byte + 1))) {
          ++good;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(good.load(), 100);
  for (int i = 0; i < 100 && called_back < 100; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(called_back.load(), 100);
}

TEST_F(BrokerTest, ClosingAnAsyncClientResolvesWhatIsPending) {
  auto async = AsyncClient::Connect(broker_->client_endpoint());
  ASSERT_TRUE(async.ok());
  auto id = (*async)->Submit(Job("k", "x")).get();  // no worker: it stays queued
  ASSERT_TRUE(id.ok());
  auto pending = (*async)->Result(*id);
  async->reset();
  auto r = pending.get();
  EXPECT_EQ(r.status().code(), Code::kUnavailable);
}

extern "C" int gpuq_c_api_scenario(const char* endpoint, char* why, size_t why_size);
extern "C" int gpuq_c_api_nulls(const char* endpoint, char* why, size_t why_size);

TEST_F(BrokerTest, TheCApiRefusesNullsAndDoesNothing) {
  AddWorker();
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  char why[512] = "";
  EXPECT_EQ(gpuq_c_api_nulls(broker_->client_endpoint().c_str(), why, sizeof why), 0) << why;
}

TEST_F(BrokerTest, TheCApiSubmitsWaitsAndReadsResults) {
  AddWorker();
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  char why[512] = "";
  EXPECT_EQ(gpuq_c_api_scenario(broker_->client_endpoint().c_str(), why, sizeof why), 0) << why;
}

// The files of a gpuq submit of several launches: two sources, each with
// the macro its own --option defines (a compile error otherwise), and two
// inputs.
void WriteSeveralLaunchFiles(const TempDir& dir) {
  testing::WriteFile(dir.File("k.cu"),
                     std::string(kKernels) + "static_assert(STEP == 1, \"source 0\");\n");
  testing::WriteFile(dir.File("t.cu"),
                     "template <int N> __global__ void scale(unsigned char* a, unsigned char* b, "
                     "float f) {}\nstatic_assert(STEP == 2, \"source 1\");\n");
  testing::WriteFile(dir.File("x.bin"), std::string(16, '\x09'));
  testing::WriteFile(dir.File("y.bin"), "\x01\x02\x03");
}

TEST_F(BrokerTest, GpuqSubmitBuildsAJobOfSeveralLaunchesFromItsOptionsInOrder) {
  TempDir dir;
  WriteSeveralLaunchFiles(dir);
  std::string out;
  // No worker yet: the job waits, then goes to the raw worker as it was built.
  ASSERT_EQ(testing::RunProgram(
                {testing::BinPath("gpuq"), "submit", dir.File("k.cu"), "--broker",
                 broker_->client_endpoint(), "--json", "--option", "-DSTEP=1", "--source",
                 dir.File("t.cu"), "--option", "-DSTEP=2", "--in", dir.File("x.bin"), "--out",
                 "8", "--scratch", "64", "--launch", "k:1:32", "--arg", "buf:0", "--arg",
                 "buf:2", "--launch-expression", "1/scale<2>:2,1:64:256", "--arg", "buf:2:16",
                 "--arg", "buf:1", "--arg", "f32:2.5", "--inout", dir.File("y.bin"), "--launch",
                 "k:1:32", "--arg", "buf:1:4", "--arg", "buf:3", "--graph"},
                &out),
            0)
      << out;
  const auto submitted = nlohmann::json::parse(out, nullptr, false);
  ASSERT_TRUE(submitted.contains("id")) << out;
  testing::RawWorker w(broker_->worker_endpoint());
  w.Ready();
  auto job = w.Receive(Millis(30000));  // after both sources compile
  ASSERT_TRUE(job && job->header.op == schema::BrokerOp::kJob) << Log();
  const schema::BrokerMessage& m = job->header;
  EXPECT_EQ(m.id, submitted["id"].get<uint64_t>());
  EXPECT_TRUE(m.graph);
  ASSERT_EQ(m.modules.size(), 2u);
  ASSERT_EQ(m.buffers.size(), 4u);
  EXPECT_EQ(m.buffers[0].kind, schema::ArgKind::kIn);
  EXPECT_EQ(m.buffers[1], Arg::Out(8));
  EXPECT_EQ(m.buffers[2], Arg::Scratch(64));
  EXPECT_EQ(m.buffers[3].kind, schema::ArgKind::kInOut);
  ASSERT_EQ(m.launches.size(), 3u);
  EXPECT_EQ(m.launches[0].entry, "k");
  EXPECT_EQ(m.launches[0].launch, (schema::LaunchSpec{{1, 1, 1}, {32, 1, 1}, 0}));
  EXPECT_EQ(m.launches[0].args, (std::vector<Arg>{Arg::Ref(0), Arg::Ref(2)}));
  EXPECT_NE(m.launches[1].source, m.launches[0].source) << "launch 1 is of source 1";
  EXPECT_EQ(m.launches[1].entry.rfind("_Z5scaleILi2E", 0), 0u)
      << "the name expression, lowered: " << m.launches[1].entry;
  EXPECT_EQ(m.launches[1].launch, (schema::LaunchSpec{{2, 1, 1}, {64, 1, 1}, 256}));
  EXPECT_EQ(m.launches[1].args, (std::vector<Arg>{Arg::Ref(2, 16), Arg::Ref(1), Arg::F32(2.5f)}));
  EXPECT_EQ(m.launches[2].source, m.launches[0].source);
  EXPECT_EQ(m.launches[2].args, (std::vector<Arg>{Arg::Ref(1, 4), Arg::Ref(3)}));
  // The inputs' frames, after the module images.
  ASSERT_LT(m.buffers[0].frame, job->payload.size());
  ASSERT_LT(m.buffers[3].frame, job->payload.size());
  EXPECT_EQ(job->payload[m.buffers[0].frame], std::string(16, '\x09'));
  EXPECT_EQ(job->payload[m.buffers[3].frame], "\x01\x02\x03");
}

TEST_F(BrokerTest, GpuqSubmitWaitsForAJobOfSeveralLaunchesAndWritesItsBuffers) {
  AddWorker();
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  TempDir dir;
  WriteSeveralLaunchFiles(dir);
  const std::vector<std::string> submit = {
      testing::BinPath("gpuq"), "submit", dir.File("k.cu"), "--broker",
      broker_->client_endpoint(), "--option", "-DSTEP=1"};
  auto run = [&](std::vector<std::string> extra, std::string* out) {
    std::vector<std::string> argv = submit;
    argv.insert(argv.end(), extra.begin(), extra.end());
    return testing::RunProgram(argv, out);
  };
  const std::vector<std::string> job = {
      "--in", dir.File("x.bin"), "--out", "8", "--scratch", "64", "--inout", dir.File("y.bin"),
      "--launch", "k:1:32", "--arg", "buf:0", "--arg", "buf:2",
      "--launch", "k:1:32", "--arg", "buf:1:4", "--arg", "buf:3", "--wait"};
  std::string out;
  std::vector<std::string> with_json = job;
  with_json.insert(with_json.end(), {"--json", "--output", dir.File("r")});
  ASSERT_EQ(run(with_json, &out), 0) << out;
  const auto r = nlohmann::json::parse(out, nullptr, false);
  ASSERT_FALSE(r.is_discarded()) << out;
  EXPECT_EQ(r["state"], "done") << out;
  EXPECT_EQ(r["timing"]["launch_us"], nlohmann::json::array({1, 1})) << out;
  EXPECT_EQ(r["outputs"], nlohmann::json::parse(R"([{"arg": 1, "bytes": 8},
                                                    {"arg": 3, "bytes": 3}])"))
      << "out and inout buffers come back by buffer index, in and scratch do not";
  EXPECT_EQ(testing::ReadFile(dir.File("r.arg1.bin")), std::string(8, '\x02'));
  EXPECT_EQ(testing::ReadFile(dir.File("r.arg3.bin")).size(), 3u);
  EXPECT_FALSE(std::filesystem::exists(dir.File("r.arg0.bin")));
  EXPECT_FALSE(std::filesystem::exists(dir.File("r.arg2.bin")));
  // As text, each launch's time.
  ASSERT_EQ(run(job, &out), 0) << out;
  EXPECT_NE(out.find("launches: 1 us, 1 us"), std::string::npos) << out;

  // What does not fit a job of several launches, refused with its reason.
  const std::vector<std::pair<std::vector<std::string>, std::string>> refused = {
      {{"--launch", "k:1:32", "--kernel", "k"}, "--kernel belongs to a job of one launch"},
      {{"--launch", "k:1:32", "--grid", "2"}, "--grid belongs to a job of one launch"},
      {{"--out", "8", "--arg", "buf:0", "--launch", "k:1:32"}, "before any --launch"},
      {{"--kernel", "k", "--arg", "buf:0"}, "belong to a job of several launches"},
      {{"--kernel", "k", "--scratch", "8"}, "--scratch belongs to a job of several launches"},
      {{"--kernel", "k", "--source", dir.File("t.cu")}, "--source belongs"},
      {{"--kernel", "k", "--graph"}, "--graph belongs"},
      {{"--launch", "k:32"}, "--launch is [SOURCE/]ENTRY:GRID:BLOCK[:SHARED]"},
      {{"--launch", "k:1:32:x"}, "--launch is"},
      // Dimensions past 2^32 - 1, or negative, were cast: 4294967297 ran as 1.
      {{"--launch", "k:4294967297:32"}, "--launch is"},
      {{"--kernel", "k", "--grid", "4294967297"}, "--grid and --block are"},
      {{"--kernel", "k", "--block", "-1"}, "--grid and --block are"},
      // --output without --wait wrote nothing and exited 0.
      {{"--kernel", "k", "--out", "8", "--output", dir.File("never")}, "--output needs --wait"},
      {{"--launch", "k:1:32", "--arg", "buf:x"}, "buf:INDEX[:OFFSET]"},
      // The broker's refusal: a buffer the job does not declare.
      {{"--out", "8", "--launch", "k:1:32", "--arg", "buf:5"}, "buffer 5"},
  };
  for (const auto& [extra, reason] : refused) {
    std::vector<std::string> argv = extra;
    argv.push_back("--json");
    EXPECT_EQ(run(argv, &out), 2) << out;
    const auto e = nlohmann::json::parse(out, nullptr, false);
    EXPECT_EQ(e.is_object() ? e.value("code", "") : "", "invalid") << out;
    EXPECT_NE(out.find(reason), std::string::npos) << reason << " not in " << out;
  }
}

TEST_F(BrokerTest, GpuqTopShowsTheLiveQueueInATerminal) {
  if (testing::RunProgram({"/bin/sh", "-c", "command -v tmux >/dev/null"}) != 0) {
    GTEST_SKIP() << "tmux is not installed";
  }
  // Heartbeats of 1 s both ways: on a loaded machine a worker silent for
  // 3 x 100 ms was declared lost, and the view showed no worker.
  ASSERT_TRUE(StartBroker({"--heartbeat-ms", "1000"})) << Log();
  // Jobs of 300 ms each, one at a time: the queue lasts 9 s, and the view
  // finds it there however long tmux and gpuq take to start (with 20 ms jobs
  // a loaded machine drained the queue before the first screen).
  AddWorker({"--slots", "1", "--delay-us", "300000", "--heartbeat-ms", "1000"});
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  for (int i = 0; i < 30; ++i) {
    JobRequest j = Job("k", "t");
    j.spec.tenant = "guest-7";
    ASSERT_TRUE(c->SubmitAsync(j).ok());
  }
  const std::string session = "gpuq-top-" + std::to_string(getpid());
  const std::string tmux = "tmux -L " + session;
  ASSERT_EQ(testing::RunProgram(
                {"/bin/sh", "-c",
                 tmux + " new-session -d -s top -x 120 -y 40 '" + testing::BinPath("gpuq") +
                     " top --broker " + broker_->client_endpoint() + " --interval-ms 100'"}),
            0);
  std::string screen;
  for (int i = 0; i < 50; ++i) {  // until the view shows the queue draining
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    testing::RunProgram({"/bin/sh", "-c", tmux + " capture-pane -p -t top"}, &screen);
    if (screen.find("guest-7") != std::string::npos &&
        screen.find("throughput") != std::string::npos &&
        screen.find("fake:") != std::string::npos) {
      break;
    }
  }
  EXPECT_NE(screen.find("gpuq top"), std::string::npos) << screen;
  EXPECT_NE(screen.find("queued by tenant: guest-7="), std::string::npos) << screen;
  EXPECT_NE(screen.find("fake:"), std::string::npos) << "the worker is listed\n" << screen;
  EXPECT_NE(screen.find("throughput:"), std::string::npos) << screen;
  // q quits: the session ends.
  testing::RunProgram({"/bin/sh", "-c", tmux + " send-keys -t top q"});
  int alive = 0;
  for (int i = 0; i < 50; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    alive = testing::RunProgram({"/bin/sh", "-c", tmux + " has-session -t top 2>/dev/null"});
    if (alive != 0) break;
  }
  EXPECT_NE(alive, 0) << "gpuq top did not quit on q";
  testing::RunProgram({"/bin/sh", "-c", tmux + " kill-server 2>/dev/null"});
}

// ------------------------------------------------------------ CURVE

class CurveTest : public ::testing::Test {
 protected:
  CurveTest() = default;
  // gpuqd's options besides the usual ones.
  explicit CurveTest(std::vector<std::string> extra) : extra_(std::move(extra)) {}
  void SetUp() override {
    for (const char* name : {"broker", "alpha", "beta", "ops", "stranger", "worker", "rogue"}) {
      auto keys = NewCurveKeyPair();
      ASSERT_TRUE(keys.ok());
      ASSERT_TRUE(WriteCurveKeyPair(*keys, dir_.File(name)).ok());
      keys_[name] = *keys;
    }
    testing::WriteFile(dir_.File("clients.keys"),
                       "# public key, tenant\n" + keys_["alpha"].public_key + " alpha\n" +
                           keys_["beta"].public_key + " beta\n" + keys_["ops"].public_key +
                           " ops operator\n");
    testing::WriteFile(dir_.File("workers.keys"), keys_["worker"].public_key + " gpu-host-1\n");
    const std::string ready = dir_.File("ready.json");
    std::vector<std::string> argv = {
        testing::BinPath("gpuqd"), "--listen", "tcp://127.0.0.1:*", "--worker-listen",
        "tcp://127.0.0.1:*", "--store", dir_.File("jobs.db"), "--cache", dir_.File("k.db"),
        "--heartbeat-ms", "100", "--curve-secret", dir_.File("broker.key"),
        "--allowed-keys", dir_.File("clients.keys"), "--worker-keys", dir_.File("workers.keys"),
        "--ready-file", ready};
    argv.insert(argv.end(), extra_.begin(), extra_.end());
    if (std::find(extra_.begin(), extra_.end(), "--workers") == extra_.end()) {
      argv.insert(argv.end(), {"--workers", "0"});
    }
    broker_ = Process::Start(argv, dir_.File("gpuqd.log"));
    for (int i = 0; i < 500 && !std::filesystem::exists(ready); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    auto j = nlohmann::json::parse(testing::ReadFile(ready), nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << testing::ReadFile(dir_.File("gpuqd.log"));
    client_ep_ = j["client"];
    worker_ep_ = j["worker"];
  }

  std::unique_ptr<Client> As(const std::string& who) {
    ClientOptions o;
    o.timeout = Millis(2000);
    o.server_key = keys_["broker"].public_key;
    o.public_key = keys_[who].public_key;
    o.secret_key = keys_[who].secret_key;
    auto c = Client::Connect(client_ep_, o);
    EXPECT_TRUE(c.ok());
    return std::move(*c);
  }

  Process Worker(const std::string& who) {
    return Process::Start({testing::BinPath("gpuq-fake-worker"), "--broker", worker_ep_,
                           "--heartbeat-ms", "100", "--server-key", dir_.File("broker.pub"),
                           "--key", dir_.File(who + ".key")},
                          dir_.File("workers.log"));
  }

  JobRequest Job() {
    JobRequest j;
    j.spec.kernel.source = kKernels;
    j.spec.kernel.entry = "k";
    j.spec.args = {Arg::Out(4)};
    return j;
  }

  std::vector<std::string> extra_;
  TempDir dir_;
  std::map<std::string, CurveKeyPair> keys_;
  Process broker_;
  std::string client_ep_, worker_ep_;
};

// With 1 MiB that a connection may leave unread.
class CurveSmallBudgetTest : public CurveTest {
 protected:
  CurveSmallBudgetTest() : CurveTest({"--max-unread-mb", "1"}) {}
};

// Another tenant's ended job is no job at all, whatever its result: the
// store reads none of it for the asker, so no error of that reading (its
// output larger than the asker may hold unread) tells it apart from a job
// that does not exist.
TEST_F(CurveSmallBudgetTest, AnotherTenantsEndedJobIsNoJobWhateverItsResult) {
  Process worker = Worker("worker");
  auto alpha = As("alpha"), beta = As("beta");
  JobRequest j = Job();
  j.spec.args = {Arg::Out(2 << 20)};  // a file of the store, over beta's budget
  auto id = alpha->Submit(j);
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  bool done = false;
  for (int i = 0; i < 1000 && !done; ++i) {
    auto st = alpha->GetStatus(*id);
    done = st.ok() && st->state == JobState::kDone;
    if (!done) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_TRUE(done);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // out of memory, in the store
  auto fetched = beta->Fetch(*id);
  EXPECT_EQ(fetched.status().code(), Code::kNotFound) << fetched.status().ToString();
  auto unknown = beta->Fetch(*id + 1000);
  EXPECT_EQ(unknown.status().code(), Code::kNotFound);
  EXPECT_EQ(fetched.status().message().find("bytes"), std::string::npos)
      << "nothing of its size: " << fetched.status().ToString();
}

TEST_F(CurveTest, AnUnknownKeyIsRefused) {
  auto stranger = As("stranger");
  auto id = stranger->Submit(Job());
  EXPECT_EQ(id.status().code(), Code::kTimeout) << "the handshake fails: nothing is delivered";
  EXPECT_NE(testing::ReadFile(dir_.File("gpuqd.log")).find("is not allowed"), std::string::npos);
  auto alpha = As("alpha");
  EXPECT_TRUE(alpha->Submit(Job()).ok()) << "an allowed key is served";
}

TEST_F(CurveTest, TheTenantIsTheKeysAndATenantSeesOnlyItsOwnJobs) {
  auto alpha = As("alpha"), beta = As("beta");
  JobRequest j = Job();
  j.spec.tenant = "beta";  // claimed; the key says alpha
  auto id = alpha->Submit(j);
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  auto stats = nlohmann::json::from_msgpack(*alpha->Stats());
  EXPECT_EQ(stats["queued_by_tenant"], nlohmann::json({{"alpha", 1}}));
  EXPECT_EQ(beta->GetStatus(*id).status().code(), Code::kNotFound);
  EXPECT_EQ(beta->Fetch(*id).status().code(), Code::kNotFound);
  EXPECT_EQ(beta->Cancel(*id).status().code(), Code::kNotFound);
  auto st = alpha->GetStatus(*id);
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->state, JobState::kQueued) << "beta's cancel changed nothing";
  // Idempotency keys are per tenant too.
  JobRequest keyed = Job();
  keyed.spec.key = "same-key";
  EXPECT_NE(*alpha->Submit(keyed), *beta->Submit(keyed));
}

TEST_F(CurveTest, ATenantsStatsShowItsOwnJobsAndAnOperatorSeesAll) {
  auto alpha = As("alpha"), beta = As("beta"), ops = As("ops");
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(alpha->Submit(Job()).ok());
  ASSERT_TRUE(beta->Submit(Job()).ok());
  auto mine = nlohmann::json::from_msgpack(*beta->Stats());
  EXPECT_EQ(mine["queued"], 1);
  EXPECT_EQ(mine["queued_by_tenant"], nlohmann::json({{"beta", 1}}));
  EXPECT_FALSE(mine.contains("submitted")) << "the broker's totals count other tenants' jobs";
  EXPECT_FALSE(mine.contains("finished"));
  auto all = nlohmann::json::from_msgpack(*ops->Stats());
  EXPECT_EQ(all["queued"], 4);
  EXPECT_EQ(all["queued_by_tenant"], nlohmann::json({{"alpha", 3}, {"beta", 1}}));
  EXPECT_EQ(all["submitted"], 4);
}

TEST_F(CurveTest, ATenantSeesItsOwnUsageAndAnOperatorEveryTenants) {
  Process worker = Worker("worker");
  auto alpha = As("alpha"), beta = As("beta"), ops = As("ops");
  for (auto* c : {alpha.get(), alpha.get(), beta.get()}) {
    auto id = c->Submit(Job());
    ASSERT_TRUE(id.ok()) << id.status().ToString();
    auto r = c->Wait(*id, Millis(5000));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
  }
  auto mine = alpha->Usage();
  ASSERT_TRUE(mine.ok()) << mine.status().ToString();
  ASSERT_EQ(mine->size(), 1u);
  EXPECT_EQ((*mine)[0].tenant, "alpha");
  EXPECT_EQ((*mine)[0].done, 2u);
  EXPECT_EQ(alpha->Usage("beta").status().code(), Code::kForbidden);
  auto own_by_name = beta->Usage("beta");
  ASSERT_TRUE(own_by_name.ok());
  EXPECT_EQ((*own_by_name)[0].done, 1u);
  auto all = ops->Usage();
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 2u);
  EXPECT_EQ((*all)[0].tenant, "alpha");
  EXPECT_EQ((*all)[1].tenant, "beta");
}

TEST_F(CurveTest, OnlyWorkersWithAllowedKeysRegister) {
  Process rogue = Worker("rogue");
  auto alpha = As("alpha");
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  EXPECT_TRUE(alpha->Devices()->empty());
  Process good = Worker("worker");
  for (int i = 0; i < 200 && alpha->Devices()->empty(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_EQ(alpha->Devices()->size(), 1u);
  auto r = alpha->Wait(*alpha->Submit(Job()));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->state, JobState::kDone);
}

// gpuqd supervising one worker (the test double, which takes gpuq-worker's
// command line) with CURVE on its worker endpoint.
class CurveSupervisedTest : public CurveTest {
 protected:
  CurveSupervisedTest()
      : CurveTest({"--workers", "1", "--worker-bin", testing::BinPath("gpuq-fake-worker")}) {}

  // The supervised worker's pid, once it has registered.
  pid_t Registered() {
    auto alpha = As("alpha");
    for (int i = 0; i < 1000 && alpha->Devices()->empty(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    if (alpha->Devices()->size() != 1) return -1;
    // gpuqd's children (every thread's): the worker is the one running
    // the test double (others are compile helpers).
    for (const auto& task : std::filesystem::directory_iterator(
             "/proc/" + std::to_string(broker_.pid()) + "/task")) {
      std::ifstream children(task.path() / "children");
      for (pid_t p; children >> p;) {
        const std::string cmdline = testing::ReadFile("/proc/" + std::to_string(p) + "/cmdline");
        if (cmdline.find("gpuq-fake-worker") != std::string::npos) return p;
      }
    }
    return -1;
  }
};

// The workers gpuqd supervised had no key for a CURVE worker endpoint: they
// were refused, silently, and tried again for ever.
TEST_F(CurveSupervisedTest, SupervisedWorkersReachACurveWorkerEndpoint) {
  ASSERT_GT(Registered(), 0) << testing::ReadFile(dir_.File("gpuqd.log"));
  auto alpha = As("alpha");
  auto r = alpha->Wait(*alpha->Submit(Job()));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->state, JobState::kDone);
  // The secret key the workers were given is for the owner's eyes only.
  bool found = false;
  for (const auto& f : std::filesystem::recursive_directory_iterator(dir_.path())) {
    if (f.path().filename() != "supervised-worker.key") continue;
    found = true;
    struct stat st {};
    ASSERT_EQ(stat(f.path().c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u) << f.path();
  }
  EXPECT_TRUE(found);
}

// A gpuqd killed by SIGKILL left its supervised workers behind: each
// connected to the next gpuqd beside the workers that one started, two
// processes for one GPU.
TEST_F(CurveSupervisedTest, SupervisedWorkersEndWithAKilledGpuqd) {
  const pid_t worker = Registered();
  ASSERT_GT(worker, 0) << testing::ReadFile(dir_.File("gpuqd.log"));
  broker_.Kill();
  // Gone, or a zombie that its new parent has yet to reap.
  auto ended = [worker] {
    std::ifstream stat("/proc/" + std::to_string(worker) + "/stat");
    std::string pid, comm, state;
    return !(stat >> pid >> comm >> state) || state == "Z";
  };
  for (int i = 0; i < 500 && !ended(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  const bool gone = ended();
  if (!gone) kill(worker, SIGKILL);
  EXPECT_TRUE(gone);
}

TEST(CurveConfigTest, TcpWithoutCurveIsRefusedUnlessInsecure) {
  TempDir dir;
  std::string out;
  int rc = testing::RunProgram({testing::BinPath("gpuqd"), "--listen", "tcp://127.0.0.1:*",
                                "--store", dir.File("j.db"), "--cache", dir.File("k.db"),
                                "--workers", "0"},
                               &out);
  EXPECT_EQ(rc, 2);
}

// ------------------------------------------------------------ crash safety

int64_t QueryInt(const std::string& db_path, const std::string& sql) {
  sqlite3* db = nullptr;
  int64_t v = -1;
  if (sqlite3_open_v2(db_path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK) {
    sqlite3_stmt* s = nullptr;
    if (sqlite3_prepare_v2(db, sql.c_str(), -1, &s, nullptr) == SQLITE_OK &&
        sqlite3_step(s) == SQLITE_ROW) {
      v = sqlite3_column_int64(s, 0);
    }
    sqlite3_finalize(s);
  }
  sqlite3_close(db);
  return v;
}

TEST_F(BrokerTest, BrokerKilledAgainAndAgainLosesNoAcknowledgedJob) {
  AddWorker({"--slots", "8"});
  // Submits go on until the broker has been killed kKills times (and at
  // least kMinJobs were acknowledged).
  constexpr int kKills = 8, kMinJobs = 300;
  std::map<int, uint64_t> acked;  // submit number -> job id
  std::atomic<bool> submitting{true};
  std::atomic<int> kills{0};
  std::thread killer([&] {
    std::mt19937 rng(42);
    while (submitting && kills < kKills) {
      std::this_thread::sleep_for(std::chrono::milliseconds(30 + rng() % 120));
      if (!submitting) break;
      broker_->Kill();  // SIGKILL: no chance to flush anything
      ++kills;
      if (!broker_->Start()) return;
    }
  });
  {
    auto c = Connect(Millis(500));
    for (int i = 0; i < 100000 && (i < kMinJobs || kills < kKills); ++i) {
      JobRequest j = Job("k", std::to_string(i));
      j.spec.key = "storm-" + std::to_string(i);
      for (;;) {  // retry with the same key until acknowledged
        auto id = c->Submit(j);
        if (id.ok()) {
          acked[i] = *id;
          break;
        }
        ASSERT_TRUE(id.status().code() == Code::kTimeout ||
                    id.status().code() == Code::kUnavailable)
            << id.status().ToString();
      }
    }
  }
  submitting = false;
  killer.join();
  ASSERT_TRUE(broker_->process().running() || broker_->Start());
  EXPECT_EQ(kills.load(), kKills);
  const int jobs = static_cast<int>(acked.size());

  auto c = Connect();
  std::set<uint64_t> ids;
  for (const auto& [i, id] : acked) {
    EXPECT_TRUE(ids.insert(id).second) << "two keys got one job id";
    StatusOr<JobResult> r = Error(Code::kTimeout, "");
    for (int attempt = 0; attempt < 3 && !r.ok(); ++attempt) r = c->Wait(id, Millis(20000));
    ASSERT_TRUE(r.ok()) << "job " << id << ": " << r.status().ToString();
    EXPECT_EQ(r->state, JobState::kDone) << "job " << id << ": " << r->error;
    std::string expect = std::to_string(i);
    for (char& ch : expect) ch = static_cast<char>(ch + 1);
    EXPECT_EQ(*r->Output(0), expect) << "job " << id << " ran with its own input";
  }
  broker_->Stop();
  // Exactly once: one row per key, each ended once, none left over.
  EXPECT_EQ(QueryInt(broker_->store(), "SELECT COUNT(*) FROM jobs"), jobs);
  EXPECT_EQ(QueryInt(broker_->store(), "SELECT COUNT(DISTINCT client_key) FROM jobs"), jobs);
  EXPECT_EQ(QueryInt(broker_->store(), "SELECT COUNT(*) FROM jobs WHERE state = 'done'"), jobs);
  EXPECT_EQ(QueryInt(broker_->store(), "SELECT COUNT(*) FROM results"), jobs);
  std::printf("storm: %d jobs acknowledged across %d kills of the broker\n", jobs, kills.load());
}

TEST_F(BrokerTest, QueuedJobsSurviveARestartAndRunAfterwards) {
  auto c = Connect();
  std::vector<uint64_t> ids;
  for (int i = 0; i < 5; ++i) ids.push_back(*c->Submit(Job("k", "r")));
  broker_->Kill();
  ASSERT_TRUE(broker_->Start());
  EXPECT_EQ(broker_->resumed(), 5u);
  AddWorker();
  for (uint64_t id : ids) {
    auto r = c->Wait(id, Millis(20000));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->state, JobState::kDone);
  }
}

TEST_F(BrokerTest, LargeBuffersSurviveAKillAndComeBackWhole) {
  // 1 MiB buffers go to the store's blob files, not into SQLite.
  auto c = Connect();
  std::vector<std::pair<uint64_t, std::string>> jobs;
  for (int i = 0; i < 3; ++i) {
    std::string input(1 << 20, '\0');
    for (size_t b = 0; b < input.size(); ++b) input[b] = static_cast<char>(b * 31 + i);
    auto id = c->Submit(Job("k", input, 100000));
    ASSERT_TRUE(id.ok()) << id.status().ToString();
    jobs.emplace_back(*id, input);
  }
  broker_->Kill();
  ASSERT_TRUE(broker_->Start()) << Log();
  EXPECT_EQ(broker_->resumed(), 3u);
  AddWorker();
  for (const auto& [id, input] : jobs) {
    auto r = c->Wait(id, Millis(20000));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    ASSERT_EQ(r->state, JobState::kDone) << r->error;
    ASSERT_NE(r->Output(0), nullptr);
    std::string expect = input;
    for (char& ch : expect) ch = static_cast<char>(ch + 1);
    EXPECT_TRUE(*r->Output(0) == expect) << "inout came back +1, byte for byte";
    ASSERT_NE(r->Output(2), nullptr);
    EXPECT_EQ(*r->Output(2), std::string(100000, '\x03'));
    auto again = c->Fetch(id);  // from the store's files
    ASSERT_TRUE(again.ok()) << again.status().ToString();
    EXPECT_TRUE(*again->Output(0) == expect);
  }
  // The inputs' files went with the jobs' ends; each result's two large
  // outputs remain.
  std::set<std::string> files;
  for (const auto& e : std::filesystem::directory_iterator(broker_->store() + ".blobs")) {
    if (!e.is_regular_file()) continue;  // the region channel's socket
    files.insert(e.path().filename().string());
  }
  std::set<std::string> expect;
  for (const auto& [id, input] : jobs) {
    expect.insert("j" + std::to_string(id) + ".o0");
    expect.insert("j" + std::to_string(id) + ".o1");
  }
  EXPECT_EQ(files, expect);
}

TEST_F(BrokerTest, LocalBuffersTravelAsFilesAndComeBackWhole) {
  // A client and a worker on the broker's host pass large buffers as files
  // of its local directory: the bytes never cross a socket.
  // Heartbeats of 1 s both ways: under ThreadSanitizer on a loaded machine,
  // 300 ms of silence while the files were written once lost the worker
  // three times over, and the job with it.
  ASSERT_TRUE(StartBroker({"--heartbeat-ms", "1000"})) << Log();
  const std::string local = broker_->store() + ".blobs";
  AddWorker({"--local-dir", local, "--heartbeat-ms", "1000"});
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  std::string input(3 << 20, '\0');
  for (size_t b = 0; b < input.size(); ++b) input[b] = static_cast<char>(b * 13);
  const uint64_t out_size = 2 << 20;
  auto id = c->Submit(Job("k", input, out_size));
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  auto r = c->Wait(*id);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->state, JobState::kDone) << r->error;
  std::string expect = input;
  for (char& ch : expect) ch = static_cast<char>(ch + 1);
  ASSERT_NE(r->Output(0), nullptr);
  EXPECT_TRUE(*r->Output(0) == expect) << "inout came back +1, byte for byte";
  ASSERT_NE(r->Output(2), nullptr);
  EXPECT_EQ(*r->Output(2), std::string(out_size, '\x03'));
  // The worker read the input from its file and wrote both outputs to files.
  const std::string log = testing::ReadFile(dir_.File("workers.log"));
  EXPECT_NE(log.find("input 0 from local file " + local + "/j" + std::to_string(*id) + ".i0"),
            std::string::npos)
      << log;
  EXPECT_NE(log.find("output 0 to local file"), std::string::npos) << log;
  EXPECT_NE(log.find("output 2 to local file"), std::string::npos) << log;
  // What is left is the result's, under the store's names: nothing of the
  // client's or the worker's own, and the input went with the job.
  std::set<std::string> files;
  for (const auto& e : std::filesystem::directory_iterator(local)) {
    if (!e.is_regular_file()) continue;  // the region channel's socket
    files.insert(e.path().filename().string());
  }
  EXPECT_EQ(files, (std::set<std::string>{"j" + std::to_string(*id) + ".o0",
                                          "j" + std::to_string(*id) + ".o1"}));
  // Fetched later, the result reads the same.
  auto again = c->Fetch(*id);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_TRUE(*again->Output(0) == expect);
}

TEST_F(BrokerTest, AnInputBufferIsTheFileTheBrokerTakes) {
  const std::string local = broker_->store() + ".blobs";
  auto c = Connect();
  auto buf = c->NewInput(2 << 20);
  ASSERT_TRUE(buf.ok()) << buf.status().ToString();
  for (size_t b = 0; b < (*buf)->size(); ++b) (*buf)->data()[b] = static_cast<char>(b * 7);
  const std::string input((*buf)->view());
  // Made in the local directory, mapped.
  std::vector<std::string> made;
  for (const auto& e : std::filesystem::directory_iterator(local)) {
    if (!e.is_regular_file()) continue;  // the region channel's socket
    made.push_back(e.path().filename().string());
  }
  ASSERT_EQ(made.size(), 1u);
  EXPECT_EQ(made[0].rfind("c-", 0), 0u);
  struct stat before {};
  ASSERT_EQ(stat((local + "/" + made[0]).c_str(), &before), 0);
  JobRequest j = Job("k", "", 16);
  j.inputs = {(*buf)->view()};
  auto id = c->Submit(j);
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  // No worker yet: the queued job's input is that very file, renamed.
  struct stat taken {};
  ASSERT_EQ(stat((local + "/j" + std::to_string(*id) + ".i0").c_str(), &taken), 0);
  EXPECT_EQ(taken.st_ino, before.st_ino);
  EXPECT_FALSE(std::filesystem::exists(local + "/" + made[0]));
  AddWorker({"--local-dir", local});
  auto r = c->Wait(*id, Millis(20000));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->state, JobState::kDone) << r->error;
  std::string expect = input;
  for (char& ch : expect) ch = static_cast<char>(ch + 1);
  EXPECT_TRUE(*r->Output(0) == expect);
  // A buffer never submitted takes its file with it.
  {
    auto unused = c->NewInput(2 << 20);
    ASSERT_TRUE(unused.ok());
  }
  for (const auto& e : std::filesystem::directory_iterator(local)) {
    EXPECT_NE(e.path().filename().string().rfind("c-", 0), 0u) << e.path();
  }
}

TEST_F(BrokerTest, OutputFilesOfAWorkerThatDiedAreRemoved) {
  // Each attempt's worker writes its output files, then dies before it can
  // name them: the broker removes what each lost attempt left.
  // Heartbeats of 1 s both ways: a worker that was silent while it wrote its
  // files (ThreadSanitizer, a loaded machine) was declared lost before it
  // wrote them, and the files it wrote afterwards were no lost attempt's.
  ASSERT_TRUE(StartBroker({"--heartbeat-ms", "1000"})) << Log();
  const std::string local = broker_->store() + ".blobs";
  AddWorker({"--local-dir", local, "--heartbeat-ms", "1000"});
  AddWorker({"--local-dir", local, "--heartbeat-ms", "1000"});
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 2));
  auto id = c->Submit(Job("wcrash", std::string(2 << 20, 'x'), 1 << 20));
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  auto r = c->Wait(*id, Millis(20000));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->state, JobState::kFailed);
  EXPECT_EQ(r->code, Code::kKernelFault) << r->error;
  for (const auto& e : std::filesystem::directory_iterator(local)) {
    EXPECT_NE(e.path().filename().string().rfind("w-", 0), 0u) << e.path();
  }
  const std::string log = testing::ReadFile(dir_.File("workers.log"));
  EXPECT_NE(log.find("output 0 to local file w-" + std::to_string(*id) + "-"), std::string::npos)
      << "the first attempt wrote its files: " << log;
}

TEST_F(BrokerTest, TheAsyncClientUsesLocalBuffersToo) {
  const std::string local = broker_->store() + ".blobs";
  AddWorker({"--local-dir", local});
  auto sync = Connect();
  ASSERT_TRUE(WaitForWorkers(*sync, 1));
  auto c = AsyncClient::Connect(broker_->client_endpoint());
  ASSERT_TRUE(c.ok());
  std::string input(2 << 20, '\0');
  for (size_t b = 0; b < input.size(); ++b) input[b] = static_cast<char>(b * 5);
  auto id = (*c)->Submit(Job("k", input, 1 << 20)).get();
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  auto r = (*c)->Result(*id).get();
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->state, JobState::kDone) << r->error;
  std::string expect = input;
  for (char& ch : expect) ch = static_cast<char>(ch + 1);
  EXPECT_TRUE(*r->Output(0) == expect);
  EXPECT_EQ(*r->Output(2), std::string(1 << 20, '\x03'));
  EXPECT_NE(testing::ReadFile(dir_.File("workers.log"))
                .find("input 0 from local file " + local + "/j" + std::to_string(*id) + ".i0"),
            std::string::npos);
  // A refused submit leaves none of its files.
  JobRequest bad = Job("k", input);
  bad.spec.launch.block = {2048, 1, 1};
  auto refused = (*c)->Submit(bad).get();
  EXPECT_EQ(refused.status().code(), Code::kInvalid);
  for (const auto& e : std::filesystem::directory_iterator(local)) {
    EXPECT_NE(e.path().filename().string().rfind("c-", 0), 0u) << e.path();
  }
}

TEST_F(BrokerTest, LocalFilesOnlyAWorkerOnTheHostCanReachAreSentAsFrames) {
  // The same client; a worker without the local directory (another host)
  // gets the bytes as frames and returns frames.
  AddWorker();
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  const std::string input(2 << 20, '\x41');
  auto id = c->Submit(Job("k", input, 1 << 20));
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  auto r = c->Wait(*id);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->state, JobState::kDone) << r->error;
  EXPECT_EQ(*r->Output(0), std::string(2 << 20, '\x42'));
  EXPECT_EQ(*r->Output(2), std::string(1 << 20, '\x03'));
  EXPECT_EQ(testing::ReadFile(dir_.File("workers.log")).find("local file"), std::string::npos);
}

TEST_F(BrokerTest, LocalFilesThatAreNotTheClientsOwnAreRefused) {
  AddWorker();
  const std::string local = broker_->store() + ".blobs";
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  // A finished job leaves its large output in the store: a file another
  // client must not be able to name as its input.
  auto victim = c->Submit(Job("k", std::string(2 << 20, 'v'), 16));
  ASSERT_TRUE(victim.ok());
  ASSERT_TRUE(c->Wait(*victim).ok());
  const std::string stored = "j" + std::to_string(*victim) + ".o0";
  ASSERT_TRUE(std::filesystem::exists(local + "/" + stored));

  testing::WriteFile(local + "/c-short", "four");
  std::filesystem::create_symlink("/etc/hostname", local + "/c-link");
  zmq::context_t ctx;
  zmq::socket_t raw(ctx, zmq::socket_type::dealer);
  raw.set(zmq::sockopt::linger, 0);
  raw.connect(broker_->client_endpoint());
  auto submit = [&](const std::string& name, uint64_t size) -> schema::ClientReply {
    schema::ClientRequest req;
    req.op = schema::ClientOp::kSubmit;
    req.rid = 9;
    req.job = Job("k", "").spec;
    req.job.args[0] = Arg::InOut(0);
    req.job.files = {{name, size}};
    const std::string h = schema::EncodeClientRequest(req);
    std::vector<zmq::message_t> frames;
    frames.emplace_back(schema::kClientProtocol.data(), schema::kClientProtocol.size());
    frames.emplace_back(h.data(), h.size());
    zmq::send_multipart(raw, frames);
    zmq::pollitem_t item = {raw.handle(), 0, ZMQ_POLLIN, 0};
    zmq::poll(&item, 1, std::chrono::milliseconds(5000));
    std::vector<zmq::message_t> reply;
    schema::ClientReply r;
    if (!(item.revents & ZMQ_POLLIN) || !zmq::recv_multipart(raw, std::back_inserter(reply))) {
      return r;
    }
    EXPECT_TRUE(schema::DecodeClientReply(reply[1].to_string_view(), {}, {}, &r).ok());
    return r;
  };
  for (const auto& [name, size] : std::vector<std::pair<std::string, uint64_t>>{
           {stored, 2 << 20},          // the store's own file: another job's output
           {"../jobs.db", 4096},       // a path
           {"c-absent", 10},           // no such file
           {"c-short", 10},            // not the size named
           {"c-link", 5}}) {           // a symbolic link
    const schema::ClientReply r = submit(name, size);
    EXPECT_EQ(r.op, schema::ReplyOp::kError) << name;
    EXPECT_EQ(r.code, Code::kInvalid) << name << ": " << r.error;
  }
  // The store's file is untouched; what the broker refused and could name
  // is gone.
  EXPECT_TRUE(std::filesystem::exists(local + "/" + stored));
  auto out = c->Fetch(*victim);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(*out->Output(0), std::string(2 << 20, 'w'));
  EXPECT_FALSE(std::filesystem::exists(local + "/c-short"));
  EXPECT_TRUE(std::filesystem::exists("/etc/hostname"));
  EXPECT_TRUE(broker_->process().running());
}

// ------------------------------------------------------------ hostile peers

TEST_F(BrokerTest, MalformedOversizedAndOutOfOrderMessagesGetErrorsWhileServingGoesOn) {
  AddWorker();
  zmq::context_t ctx;
  zmq::socket_t raw(ctx, zmq::socket_type::dealer);
  raw.set(zmq::sockopt::linger, 0);
  raw.connect(broker_->client_endpoint());
  std::mt19937 rng(7);
  auto garbage = [&](size_t n) {
    std::string s(n, '\0');
    for (char& ch : s) ch = static_cast<char>(rng());
    return s;
  };
  // A bounded storm of bad messages, each answered with an error.
  std::vector<std::vector<std::string>> bad = {
      {"GPUQ/1"},                                 // no header
      {"GPUQ/9", "\x80"},                          // other version
      {"HTTP/1.1", "GET /"},                       // not our protocol
      {"GPUQ/1", "\xc1"},                          // invalid msgpack
      {"GPUQ/1", std::string("\x82\xa2op\xa7" "explode\xa3rid\x05", 17)},  // unknown op
      {"GPUQ/1", std::string("\x82\xa2op\xa6status\xa3rid\x06", 16)},     // missing id
      {"GPUQ/1", std::string("\x81\xa2op\xa5stats", 10), "stray payload"},
  };
  for (int i = 0; i < 200; ++i) bad.push_back({"GPUQ/1", garbage(1 + rng() % 300)});
  bad.push_back({"GPUQ/1", std::string(17u << 20, '\x90')});  // over the header limit
  for (const auto& msg : bad) {
    std::vector<zmq::message_t> frames;
    for (const auto& f : msg) frames.emplace_back(f.data(), f.size());
    zmq::send_multipart(raw, frames);
  }
  size_t errors = 0;
  for (size_t i = 0; i < bad.size(); ++i) {
    zmq::pollitem_t item = {raw.handle(), 0, ZMQ_POLLIN, 0};
    zmq::poll(&item, 1, std::chrono::milliseconds(20000));
    if (!(item.revents & ZMQ_POLLIN)) break;
    std::vector<zmq::message_t> reply;
    ASSERT_TRUE(zmq::recv_multipart(raw, std::back_inserter(reply)));
    ASSERT_GE(reply.size(), 2u);
    schema::ClientReply r;
    ASSERT_TRUE(schema::DecodeClientReply(reply[1].to_string_view(), {}, {}, &r).ok());
    EXPECT_EQ(r.op, schema::ReplyOp::kError);
    EXPECT_NE(r.code, Code::kOk);
    ++errors;
  }
  EXPECT_EQ(errors, bad.size()) << "every bad message gets an error reply";
  // Out of order: a worker result from a connection that never said ready.
  zmq::socket_t rogue(ctx, zmq::socket_type::dealer);
  rogue.set(zmq::sockopt::linger, 0);
  rogue.connect(broker_->worker_endpoint());
  schema::WorkerMessage m;
  m.op = schema::WorkerOp::kResult;
  m.id = 1;
  m.attempt = 1;
  std::string h = schema::EncodeWorkerMessage(m);
  std::vector<zmq::message_t> frames;
  frames.emplace_back(schema::kWorkerProtocol.data(), schema::kWorkerProtocol.size());
  frames.emplace_back(h.data(), h.size());
  zmq::send_multipart(rogue, frames);
  std::vector<zmq::message_t> answer;
  zmq::pollitem_t item = {rogue.handle(), 0, ZMQ_POLLIN, 0};
  zmq::poll(&item, 1, std::chrono::milliseconds(20000));
  ASSERT_TRUE(item.revents & ZMQ_POLLIN);
  ASSERT_TRUE(zmq::recv_multipart(rogue, std::back_inserter(answer)));
  schema::BrokerMessage bm;
  ASSERT_TRUE(schema::DecodeBrokerMessage(answer[1].to_string_view(), {}, {}, &bm).ok());
  EXPECT_EQ(bm.op, schema::BrokerOp::kDisconnect);
  // And the broker still serves.
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  auto id = c->Submit(Job("k", "ok"));
  ASSERT_TRUE(id.ok());
  auto r = c->Wait(*id);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->state, JobState::kDone);
  EXPECT_TRUE(broker_->process().running());
}

// ------------------------------------------------------------ observability

TEST_F(BrokerTest, StatsShowQueueInFlightOutcomesAndLatencies) {
  auto c = Connect();
  ASSERT_TRUE(c->Submit(Job("k", "a")).ok());  // stays queued: no worker yet
  AddWorker({"--slots", "1"});
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  auto r = c->Wait(*c->Submit(Job("k", "b")));
  ASSERT_TRUE(r.ok());
  JobRequest bad = Job("k", "c");
  bad.spec.kernel.source = "syntax error";
  auto b = c->Wait(*c->Submit(bad));
  ASSERT_TRUE(b.ok());
  auto raw = c->Stats();
  ASSERT_TRUE(raw.ok());
  auto s = nlohmann::json::from_msgpack(*raw);
  EXPECT_EQ(s["finished"]["done"], 2);
  EXPECT_EQ(s["finished"]["compile_error"], 1);
  EXPECT_EQ(s["submitted"], 3);
  EXPECT_EQ(s["workers"].size(), 1u);
  EXPECT_GE(s["latency_us"]["total"]["count"].get<int>(), 2);
  EXPECT_GT(s["latency_us"]["total"]["p50"].get<double>(), 0);
  // The cache file's size is read off the broker's loop, soon after a compile.
  for (int i = 0; i < 100 && s["cache"]["entries"].get<int>() < 1; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    s = nlohmann::json::from_msgpack(*c->Stats());
  }
  EXPECT_GE(s["cache"]["entries"].get<int>(), 1);
}

TEST_F(BrokerTest, MetricsEndpointServesValidPrometheusText) {
  AddWorker();
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  ASSERT_TRUE(c->Wait(*c->Submit(Job("k", "m"))).ok());
  // Rendered every 250 ms; polled, since a worker lost to a long stall of
  // the machine (ThreadSanitizer's) is missing until it registers again.
  httplib::Client http("127.0.0.1", broker_->metrics_port());
  auto res = http.Get("/metrics");
  for (int i = 0; i < 100; ++i) {
    ASSERT_TRUE(res);
    if (res->body.find("gpuq_workers 1") != std::string::npos &&
        res->body.find("gpuq_jobs_finished_total{outcome=\"done\"} 1") != std::string::npos) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    res = http.Get("/metrics");
  }
  EXPECT_EQ(res->status, 200);
  EXPECT_NE(res->body.find("gpuq_jobs_finished_total{outcome=\"done\"} 1"), std::string::npos)
      << res->body;
  EXPECT_NE(res->body.find("gpuq_job_phase_seconds_bucket{phase=\"total\",le=\"+Inf\"} 1"),
            std::string::npos);
  EXPECT_NE(res->body.find("gpuq_workers 1"), std::string::npos);
  const std::string file = dir_.File("metrics.txt");
  testing::WriteFile(file, res->body);
  std::string out;
  int rc = testing::RunProgram({"/bin/sh", "-c", "promtool check metrics < " + file + " 2>&1"},
                               &out);
  if (rc == 127) GTEST_SKIP() << "promtool is not installed";
  EXPECT_EQ(rc, 0) << out;
}

// A free TCP port on loopback (bound, then released for the child to take).
int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

bool HavePrometheus() {
  return testing::RunProgram({"/bin/sh", "-c", "command -v prometheus >/dev/null"}) == 0;
}

// A real Prometheus in `dir` scraping `metrics_port` every second; returns
// its HTTP port.
int StartPrometheus(const TempDir& dir, int metrics_port, std::optional<Process>* prom) {
  const int port = FreePort();
  testing::WriteFile(dir.File("prometheus.yml"),
                     "global:\n  scrape_interval: 1s\n"
                     "scrape_configs:\n  - job_name: gpuq\n    static_configs:\n"
                     "      - targets: ['127.0.0.1:" +
                         std::to_string(metrics_port) + "']\n");
  prom->emplace(Process::Start(
      {"/usr/bin/prometheus", "--config.file=" + dir.File("prometheus.yml"),
       "--storage.tsdb.path=" + dir.File("tsdb"),
       "--web.listen-address=127.0.0.1:" + std::to_string(port)},
      dir.File("prometheus.log")));
  return port;
}

TEST_F(BrokerTest, ARealPrometheusIngestsTheMetrics) {
  if (!HavePrometheus()) GTEST_SKIP() << "prometheus is not installed";
  AddWorker();
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  ASSERT_TRUE(c->Wait(*c->Submit(Job("k", "p"))).ok());
  std::optional<Process> prom;
  const int port = StartPrometheus(dir_, broker_->metrics_port(), &prom);
  httplib::Client http("127.0.0.1", port);
  http.set_connection_timeout(1);
  http.set_read_timeout(2);
  std::string body;
  bool ingested = false;
  for (int i = 0; i < 300 && !ingested; ++i) {  // up to 30 s
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    auto res = http.Get("/api/v1/query?query=gpuq_jobs_finished_total%7Boutcome%3D%22done%22%7D");
    if (!res || res->status != 200) continue;
    body = res->body;
    auto j = nlohmann::json::parse(body, nullptr, false);
    if (j.is_discarded() || j["data"]["result"].empty()) continue;
    ingested = j["data"]["result"][0]["value"][1] == "1";
  }
  EXPECT_TRUE(ingested) << body << testing::ReadFile(dir_.File("prometheus.log"));
  // The phase histogram made it too.
  auto res = http.Get(
      "/api/v1/query?query=gpuq_job_phase_seconds_count%7Bphase%3D%22total%22%7D");
  ASSERT_TRUE(res);
  EXPECT_NE(res->body.find("\"result\":[{"), std::string::npos) << res->body;
}

// Every query of the dashboard (deploy/k8s/base/gpuq-dashboard.json) parses
// and returns data on a real Prometheus scraping a live gpuqd, whose worker
// (the test double) reports GPU health.
TEST_F(BrokerTest, EveryDashboardQueryRunsOnARealPrometheus) {
  if (!HavePrometheus()) GTEST_SKIP() << "prometheus is not installed";
  const auto dashboard = nlohmann::json::parse(
      testing::ReadFile(std::string(GPUQ_SOURCE_DIR) + "/deploy/k8s/base/gpuq-dashboard.json"));
  std::vector<std::string> exprs;
  for (const auto& panel : dashboard.at("panels")) {
    for (const auto& target : panel.at("targets")) exprs.push_back(target.at("expr"));
  }
  ASSERT_GE(exprs.size(), 20u);
  AddWorker({"--health"});
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(c->Wait(*c->Submit(Job("k", std::to_string(i)))).ok());
  // One that waits, for the queue's series.
  JobRequest waiting = Job("k", "w");
  waiting.spec.placement.gpu = "GPU-not-here";
  ASSERT_TRUE(c->Submit(waiting).ok());
  std::optional<Process> prom;
  const int port = StartPrometheus(dir_, broker_->metrics_port(), &prom);
  httplib::Client http("127.0.0.1", port);
  http.set_connection_timeout(1);
  http.set_read_timeout(5);
  auto query = [&](const std::string& expr) -> nlohmann::json {
    auto res = http.Post("/api/v1/query", httplib::Params{{"query", expr}});
    if (!res) return nullptr;
    return nlohmann::json::parse(res->body, nullptr, false);
  };
  // Rates need two scrapes in their window: wait for five.
  for (int i = 0; i < 300; ++i) {
    auto j = query("count_over_time(gpuq_uptime_seconds[30s])");
    if (j.is_object() && !j["data"]["result"].empty() &&
        j["data"]["result"][0]["value"][1] >= "5") {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  for (std::string expr : exprs) {
    for (const auto& [var, value] : {std::pair{"$__rate_interval", "30s"},
                                      std::pair{"$__interval", "1s"},
                                      std::pair{"$__range", "30s"}}) {
      for (size_t at; (at = expr.find(var)) != std::string::npos;) {
        expr.replace(at, std::string(var).size(), value);
      }
    }
    auto j = query(expr);
    ASSERT_TRUE(j.is_object()) << expr << ": no answer";
    EXPECT_EQ(j["status"], "success") << expr << ": " << j.dump();
    EXPECT_FALSE(j["data"]["result"].empty()) << expr << ": no data";
  }
}

// A GPU whose worker reports a critical Xid is drained: no more jobs go to
// it, what it held runs elsewhere, and devices, stats and /metrics say so.
TEST_F(BrokerTest, AGpuWithACriticalXidIsDrainedAndItsJobsRunElsewhere) {
  AddWorker({"--health", "--xid-after-jobs", "1", "--uuid", "GPU-failing", "--delay-us", "200000"});
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  auto first = c->Wait(*c->Submit(Job("k", "1")));
  ASSERT_TRUE(first.ok() && first->ok());
  EXPECT_EQ(first->device, "GPU-failing");
  // The next may be dispatched before the Xid is heard (then it is taken
  // back) or after (then it waits): either way it does not end there.
  auto second = c->Submit(Job("k", "2"));
  ASSERT_TRUE(second.ok());
  std::string drain;
  for (int i = 0; i < 200 && drain.empty(); ++i) {
    auto d = c->Devices();
    if (d.ok() && !d->empty()) drain = (*d)[0].health.drain;
    if (drain.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_NE(drain.find("Xid 79"), std::string::npos) << drain;
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  auto st = c->GetStatus(*second);
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->state, JobState::kQueued) << "a job went to a drained GPU";
  AddWorker({"--health", "--uuid", "GPU-healthy"});
  auto r = c->Wait(*second, Millis(10000));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(r->ok()) << r->error;
  EXPECT_EQ(r->device, "GPU-healthy");
  // Polled: a worker lost to a long stall of the machine registers again,
  // and its ready carries the same health.
  bool listed = false;
  nlohmann::json s;
  for (int i = 0; i < 100 && !listed; ++i) {
    auto stats = c->Stats();
    ASSERT_TRUE(stats.ok());
    s = nlohmann::json::from_msgpack(*stats);
    for (const auto& w : s["workers"]) {
      if (w["uuid"] == "GPU-failing") listed = w.value("drained", "").find("Xid 79") != std::string::npos;
    }
    if (!listed) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_TRUE(listed) << s.dump();
  httplib::Client http("127.0.0.1", broker_->metrics_port());
  std::string text;
  // Drains counted: one, or more if a stall of the machine lost the
  // worker and it registered again (its ready carries the Xid again).
  auto drained = [&]() -> long {
    const std::string key = "\ngpuq_gpus_drained_total ";
    const size_t at = text.find(key);
    return at == std::string::npos ? 0 : std::atol(text.c_str() + at + key.size());
  };
  // Polled until all of it shows: rendered every 250 ms, and a worker that
  // a stall of the machine lost is missing from a rendering until it has
  // registered again (this failed once under ThreadSanitizer).
  const std::string failing = "gpuq_gpu_drained{gpu=\"GPU-failing\"";
  for (int i = 0; i < 200; ++i) {
    auto res = http.Get("/metrics");
    if (res) text = res->body;
    if (drained() >= 1 && text.find("GPU-healthy") != std::string::npos &&
        text.find(failing) != std::string::npos) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_GE(drained(), 1) << text;
  EXPECT_NE(text.find(failing), std::string::npos) << text;
  EXPECT_NE(text.find("gpuq_gpu_temperature_celsius{gpu=\"GPU-healthy\""), std::string::npos)
      << text;
}

// /healthz says the broker's loop turns; /readyz waits for the workers it
// was told to expect.
TEST_F(BrokerTest, HealthAndReadinessEndpoints) {
  ASSERT_TRUE(StartBroker({"--expect-workers", "1"})) << Log();
  httplib::Client http("127.0.0.1", broker_->metrics_port());
  auto health = http.Get("/healthz");
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200) << health->body;
  auto ready = http.Get("/readyz");
  ASSERT_TRUE(ready);
  EXPECT_EQ(ready->status, 503);
  EXPECT_NE(ready->body.find("0 of 1 expected workers"), std::string::npos) << ready->body;
  AddWorker();
  int status = 0;
  for (int i = 0; i < 200 && status != 200; ++i) {
    auto r = http.Get("/readyz");
    status = r ? r->status : 0;
    if (status != 200) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(status, 200);
}

// Connections that say nothing held the metrics server's threads (8 on a
// small host) for 5 s each: /healthz went unanswered meanwhile, which a
// liveness probe takes for a dead gpuqd. And a request's body, which no
// route takes, was read whatever its size.
TEST_F(BrokerTest, IdleConnectionsHoldOffNoProbe) {
  ASSERT_TRUE(StartBroker()) << Log();
  std::vector<UniqueFd> idle;
  for (int i = 0; i < 16; ++i) {
    UniqueFd fd(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(broker_->metrics_port()));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    idle.push_back(std::move(fd));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // each taken by a thread
  httplib::Client http("127.0.0.1", broker_->metrics_port());
  http.set_read_timeout(std::chrono::seconds(3));
  auto health = http.Get("/healthz");
  ASSERT_TRUE(health) << "no answer in 3 s: " << httplib::to_string(health.error());
  EXPECT_EQ(health->status, 200);
  auto big = http.Post("/healthz", std::string(1 << 20, 'x'), "text/plain");
  ASSERT_TRUE(big);
  EXPECT_EQ(big->status, 413);
}

// A supervised worker that can never run (no driver, no such GPU) is
// retired; /readyz waited for it for ever ("0 of 3 expected workers").
// Here the real gpuq-worker: with no driver (CI) all three retire; with a
// one-GPU driver, two.
TEST(ReadinessTest, RetiredWorkersAreNotWaitedFor) {
  TempDir dir;
  BrokerProcess broker(dir.path(), {"--worker-bin", testing::BinPath("gpuq-worker")}, "3");
  ASSERT_TRUE(broker.Start()) << testing::ReadFile(dir.File("gpuqd.log"));
  httplib::Client http("127.0.0.1", broker.metrics_port());
  int status = 0;
  std::string body;
  for (int i = 0; i < 500 && status != 200; ++i) {
    auto r = http.Get("/readyz");
    status = r ? r->status : 0;
    body = r ? r->body : "";
    if (status != 200) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(status, 200) << body << testing::ReadFile(dir.File("gpuqd.log"));
}

// ------------------------------------------------------------ bulk data

// A large result travels beside the control plane: it delays no other
// client's job much and no worker is declared lost while it moves (its
// heartbeats go on its liveness connection). The figures are printed, not
// asserted: machines are noisy. GPUQ_BIG_RESULT_MIB sets the size (256 by
// default; 1024 on a machine with the memory for it).
TEST(BulkTest, ALargeResultHoldsUpNoOneAndLosesNoWorker) {
  const char* env = getenv("GPUQ_BIG_RESULT_MIB");
  // Under ThreadSanitizer every copy of the bytes is instrumented (a 256 MiB
  // result took 13 s on 2 cores): a smaller one keeps the test about the
  // design rather than the instrumentation.
#if defined(__SANITIZE_THREAD__)
  constexpr uint64_t kDefaultMib = 32;
#else
  constexpr uint64_t kDefaultMib = 256;
#endif
  const uint64_t mib = env ? std::strtoull(env, nullptr, 10) : kDefaultMib;
  TempDir dir;
  // A heartbeat of 1 s: a worker is lost after 3 s of silence, less than
  // the transfer takes on a loaded machine under a sanitizer (7 s seen), so
  // a loop that the transfer held up would lose one.
  BrokerProcess broker(dir.path(), {"--max-queued-bytes", std::to_string(4 * (mib << 20)),
                                    "--max-unread-mb", std::to_string(2 * mib),
                                    "--heartbeat-ms", "1000"});
  ASSERT_TRUE(broker.Start()) << testing::ReadFile(dir.File("gpuqd.log"));
  auto worker = [&](const std::string& uuid) {
    return Process::Start({testing::BinPath("gpuq-fake-worker"), "--broker",
                           broker.worker_endpoint(), "--heartbeat-ms", "1000", "--uuid", uuid},
                          dir.File("workers.log"));
  };
  Process big_worker = worker("GPU-big"), small_worker = worker("GPU-small");
  ClientOptions o;
  o.timeout = Millis(120000);
  o.local_buffers = false;
  auto big = Client::Connect(broker.client_endpoint(), o);
  auto small = Client::Connect(broker.client_endpoint(), o);
  ASSERT_TRUE(big.ok() && small.ok());
  for (int i = 0; i < 500 && (*small)->Devices()->size() < 2; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_EQ((*small)->Devices()->size(), 2u);
  auto job = [](const std::string& gpu, uint64_t out) {
    JobRequest j;
    j.spec.kernel.source = kKernels;
    j.spec.kernel.entry = "k";
    j.spec.args = {Arg::Out(out)};
    j.spec.placement.gpu = gpu;
    return j;
  };
  // One trivial job at a time, timed from submit to result.
  auto trivial_p99 = [&](const std::function<bool()>& go_on, size_t at_least) {
    std::vector<double> us;
    while (us.size() < at_least || go_on()) {
      const auto t0 = std::chrono::steady_clock::now();
      auto id = (*small)->Submit(job("GPU-small", 16));
      EXPECT_TRUE(id.ok()) << id.status().ToString();
      if (!id.ok()) break;
      auto r = (*small)->Wait(*id);
      EXPECT_TRUE(r.ok() && r->ok());
      us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0)
                       .count());
    }
    std::sort(us.begin(), us.end());
    return std::pair{us[us.size() / 2], us[us.size() * 99 / 100]};
  };
  const auto [quiet_p50, quiet_p99] = trivial_p99([] { return false; }, 200);
  std::atomic<bool> moving{true};
  StatusOr<JobResult> result = Status(Code::kInternal, "not run");
  std::thread mover([&] {
    auto id = (*big)->Submit(job("GPU-big", mib << 20));
    result = id.ok() ? (*big)->Wait(*id) : StatusOr<JobResult>(id.status());
    moving = false;
  });
  const auto t0 = std::chrono::steady_clock::now();
  const auto [busy_p50, busy_p99] = trivial_p99([&] { return moving.load(); }, 50);
  mover.join();
  const double moved_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_TRUE(result.ok()) << result.status().ToString();
  ASSERT_EQ(result->state, JobState::kDone) << result->error;
  ASSERT_NE(result->Output(0), nullptr);
  EXPECT_EQ(result->Output(0)->size(), mib << 20);
  const std::string log = testing::ReadFile(dir.File("gpuqd.log"));
  EXPECT_EQ(log.find("is gone"), std::string::npos) << "a worker was declared lost";
  std::printf("%llu MiB result in %.2f s; another client's trivial job, one at a time: "
              "p50 %.0f us / p99 %.0f us quiet, p50 %.0f us / p99 %.0f us meanwhile\n",
              static_cast<unsigned long long>(mib), moved_s, quiet_p50, quiet_p99, busy_p50,
              busy_p99);
  ::testing::Test::RecordProperty("quiet_p99_us", std::to_string(quiet_p99));
  ::testing::Test::RecordProperty("busy_p99_us", std::to_string(busy_p99));
}

}  // namespace
}  // namespace gpuq
