// Tenants through gpuqd, with the worker test double: GPU time divided by
// weight, concurrency and rate limits, and the tenants file read again on
// SIGHUP (a bad file keeps the settings as they were).
#include <signal.h>
#include <sys/stat.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include <map>
#include <set>
#include <sstream>

#include "tests/broker_fixture.h"

namespace gpuq::testing {
namespace {

using schema::JobState;

// Kernels the test double runs for their names' milliseconds ("msN...").
constexpr char kTimed[] =
    "extern \"C\" __global__ void ms10(unsigned char* a, unsigned char* b) {}\n"
    "extern \"C\" __global__ void ms20(unsigned char* a, unsigned char* b) {}\n";

class TenantsTest : public BrokerTest {
 protected:
  void SetUp() override {}  // each test starts its broker with its tenants file

  bool StartWith(const std::string& tenants_json) {
    path_ = dir_.File("tenants.json");
    WriteFile(path_, tenants_json);
    return StartBroker({"--tenants", path_});
  }
  // Waits for a line of the broker's log.
  bool LogSays(const std::string& text) {
    for (int i = 0; i < 500; ++i) {
      if (Log().find(text) != std::string::npos) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  }
  JobRequest As(const std::string& tenant, const std::string& entry) {
    JobRequest j = Job(entry, "x");
    j.spec.tenant = tenant;
    j.spec.kernel.source = kTimed;
    return j;
  }
  std::string path_;
};

TEST_F(TenantsTest, GpuTimeDividesByWeightAmongBackloggedTenants) {
#if defined(__SANITIZE_THREAD__)
  // Shares of GPU time measured from jobs of 5-20 ms: under ThreadSanitizer
  // a job now and then holds its worker for hundreds of ms (the
  // instrumentation's own work: 223 ms measured), which is charged as GPU
  // time and swamps the measure. The ASan and Release builds run it.
  GTEST_SKIP() << "timing shares are not measurable under ThreadSanitizer";
#endif
  ASSERT_TRUE(StartWith(R"({"tenants": {"heavy": {"weight": 3}, "light": {"weight": 1}}})"))
      << Log();
  auto c = Connect();
  // Every job queued before a worker comes, so that both tenants are
  // backlogged from the first dispatch. heavy's jobs take 10 ms, light's
  // 20: round robin would give light two thirds of the GPU time; the
  // weights give it a quarter.
  std::map<uint64_t, bool> heavy_rid, heavy_job;
  for (int i = 0; i < 240; ++i) {
    const bool heavy = i % 2 == 0;
    auto rid = c->SubmitAsync(As(heavy ? "heavy" : "light", heavy ? "ms10" : "ms20"));
    ASSERT_TRUE(rid.ok());
    heavy_rid[*rid] = heavy;
  }
  while (heavy_job.size() < 240) {
    auto e = c->Poll(Millis(10000));
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    ASSERT_EQ(e->kind, Client::Event::kAccepted) << e->error.ToString();
    heavy_job[e->id] = heavy_rid.at(e->rid);
  }
  AddWorker({"--slots", "4"});
  // Each job's time on the worker: from dispatch to result (the broker's
  // timing), placed on the client's clock by when its result came.
  struct Ran {
    bool heavy;
    double start_us, held_us;
  };
  std::vector<Ran> ran;
  const auto t0 = std::chrono::steady_clock::now();
  while (ran.size() < 240) {
    auto e = c->Poll(Millis(20000));
    ASSERT_TRUE(e.ok()) << e.status().ToString() << Log();
    if (e->kind != Client::Event::kResult) continue;
    ASSERT_EQ(e->result.state, JobState::kDone) << e->result.error;
    const double now =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    const double held = static_cast<double>(e->result.timing.total_us - e->result.timing.queue_us);
    ran.push_back({heavy_job.at(e->result.id), now - held, held});
  }
  // The window: until the last of heavy's jobs started, while both were
  // backlogged.
  double heavy_last_start = 0;
  for (const Ran& r : ran) {
    if (r.heavy) heavy_last_start = std::max(heavy_last_start, r.start_us);
  }
  double heavy = 0, light = 0;
  for (const Ran& r : ran) {
    if (r.start_us > heavy_last_start) continue;
    (r.heavy ? heavy : light) += r.held_us;
  }
  const double share = heavy / (heavy + light);
  std::printf("heavy (weight 3) held the GPU %.1f%% of the time both were backlogged "
              "(%.0f ms of %.0f)\n",
              100 * share, heavy / 1000, (heavy + light) / 1000);
  EXPECT_NEAR(share, 0.75, 0.05);
}

TEST_F(TenantsTest, AConcurrencyLimitHoldsWhateverTheFreeSlots) {
  ASSERT_TRUE(StartWith(R"({"tenants": {"capped": {"max_concurrent": 2}}})")) << Log();
  AddWorker({"--slots", "8"});
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  std::vector<uint64_t> ids;
  for (int i = 0; i < 8; ++i) {
    auto id = c->Submit(As("capped", "ms20"));
    ASSERT_TRUE(id.ok()) << id.status().ToString();
    ids.push_back(*id);
  }
  // The broker's own count of jobs on workers (one snapshot per stats
  // reply), while only the capped tenant has jobs.
  uint64_t most = 0;
  for (int round = 0; round < 2000; ++round) {
    auto raw = c->Stats();
    ASSERT_TRUE(raw.ok());
    auto stats = nlohmann::json::from_msgpack(*raw);
    most = std::max<uint64_t>(most, stats.value("inflight", 0));
    if (stats.value("queued", 0) == 0 && stats.value("inflight", 0) == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  for (uint64_t id : ids) {
    auto r = c->Wait(id);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->state, JobState::kDone) << r->error;
  }
  EXPECT_EQ(most, 2u) << "at most max_concurrent at once, and that many";

  // Another tenant's job does not wait behind the capped tenant's queue.
  ids.clear();
  for (int i = 0; i < 6; ++i) ids.push_back(*c->Submit(As("capped", "ms20")));
  auto free_id = c->Submit(As("free", "ms20"));
  ASSERT_TRUE(free_id.ok());
  auto free_result = c->Wait(*free_id);
  auto last_capped = c->Wait(ids.back());
  ASSERT_TRUE(free_result.ok() && last_capped.ok());
  EXPECT_LT(free_result->timing.queue_us, last_capped->timing.queue_us);
}

// A canceled job whose kernel its worker still runs (no message stops a
// kernel) keeps its place among its tenant's jobs on GPUs until the worker
// answers or is gone: a tenant capped at one cannot cancel its way to more.
TEST_F(TenantsTest, ACanceledJobStillRunningCountsAgainstItsTenantsConcurrency) {
  ASSERT_TRUE(StartWith(R"({"tenants": {"capped": {"max_concurrent": 1}}})")) << Log();
  Process& first = AddWorker({"--slots", "4"});
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  JobRequest hang = Job("hang", "x");
  hang.spec.tenant = "capped";
  auto a = c->Submit(hang);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_TRUE(WaitDispatched(*c, *a));
  ASSERT_TRUE(c->Cancel(*a).ok());
  JobRequest quick = Job("k", "y");
  quick.spec.tenant = "capped";
  auto b = c->Submit(quick);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  auto st = c->GetStatus(*b);
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->state, JobState::kQueued) << "the canceled kernel still runs on a slot";
  // Its worker gone, the place is free: the job runs on the next worker.
  first.Kill();
  AddWorker({"--slots", "4"});
  auto r = c->Wait(*b, Millis(20000));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->state, JobState::kDone) << r->error;
}

// A submit with the idempotency key of a job that ran and left the broker's
// memory is taken, and may be sent to a worker, before the store finds the
// key; that attempt is dropped, and so is its place among its tenant's jobs
// on GPUs (it stayed, and a tenant capped at one ran nothing more).
TEST_F(TenantsTest, AKeyedSubmitOfAJobThatRanLeavesItsTenantsCountAsItWas) {
  ASSERT_TRUE(StartWith(R"({"tenants": {"capped": {"max_concurrent": 1}}})")) << Log();
  AddWorker({"--slots", "4"});
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  JobRequest keyed = Job("k", "x");
  keyed.spec.tenant = "capped";
  keyed.spec.key = "same";
  auto first = c->Submit(keyed);
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  auto done = c->Wait(*first, Millis(20000));
  ASSERT_TRUE(done.ok() && done->ok());
  for (int i = 0; i < 3; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // out of memory, in the store
    auto again = c->Submit(keyed);
    ASSERT_TRUE(again.ok()) << again.status().ToString();
    EXPECT_EQ(*again, *first) << "the key names the job it named";
  }
  JobRequest plain = Job("k", "y");
  plain.spec.tenant = "capped";
  auto id = c->Submit(plain);
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  auto r = c->Wait(*id, Millis(10000));
  ASSERT_TRUE(r.ok()) << r.status().ToString() << " (the tenant's count did not come down)";
  EXPECT_EQ(r->state, JobState::kDone) << r->error;
}

TEST_F(TenantsTest, ARateLimitRefusesWithQuotaExceededAndAHint) {
  ASSERT_TRUE(StartWith(R"({"default": {"jobs_per_s": 5}})")) << Log();
  auto c = Connect();
  int accepted = 0;
  Status refused;
  for (int i = 0; i < 8; ++i) {
    auto id = c->Submit(As("anyone", "ms10"));
    if (id.ok()) {
      ++accepted;
    } else if (refused.ok()) {
      refused = id.status();
    }
  }
  EXPECT_EQ(accepted, 5) << "a second's worth at once";
  EXPECT_EQ(refused.code(), Code::kQuotaExceeded) << refused.ToString();
  EXPECT_NE(refused.message().find("5 jobs/s"), std::string::npos) << refused.ToString();
  // Another tenant has its own bucket.
  EXPECT_TRUE(c->Submit(As("another", "ms10")).ok());
}

TEST_F(TenantsTest, SighupReadsTheFileAgainAndABadFileChangesNothing) {
  ASSERT_TRUE(StartWith(R"({"default": {"jobs_per_s": 1000}})")) << Log();
  auto c = Connect();
  ASSERT_TRUE(c->Submit(As("t", "ms10")).ok());
  ASSERT_TRUE(c->Submit(As("t", "ms10")).ok());
  WriteFile(path_, R"({"default": {"jobs_per_s": 1}})");
  broker_->process().Signal(SIGHUP);
  ASSERT_TRUE(LogSays("reloaded")) << Log();
  // One token at most is left in the bucket after the reload.
  int refused = 0;
  for (int i = 0; i < 3; ++i) refused += !c->Submit(As("t", "ms10")).ok();
  EXPECT_GE(refused, 2);
  WriteFile(path_, R"({"default": {"jobs_per_s": "many"}})");
  broker_->process().Signal(SIGHUP);
  ASSERT_TRUE(LogSays("not reloaded")) << Log();
  EXPECT_NE(Log().find("default.jobs_per_s: must be a number"), std::string::npos) << Log();
  auto id = c->Submit(As("t", "ms10"));
  ASSERT_FALSE(id.ok()) << "the old limit of 1 job/s stays";
  EXPECT_EQ(id.status().code(), Code::kQuotaExceeded);
}

// The file is read on the broker's loop: a FIFO put in its place held the
// loop in open() until a writer came (every client waited), and a file of
// any size was read whole first. Neither is read now; a link to a good
// file (as a Kubernetes ConfigMap mounts it) is.
TEST_F(TenantsTest, ATenantsFileThatIsNoRegularFileIsRefusedWithoutBlocking) {
  ASSERT_TRUE(StartWith(R"({"default": {"jobs_per_s": 1000}})")) << Log();
  auto c = Connect(Millis(3000));
  std::filesystem::remove(path_);
  ASSERT_EQ(mkfifo(path_.c_str(), 0600), 0);
  broker_->process().Signal(SIGHUP);
  ASSERT_TRUE(LogSays("not a regular file")) << Log();
  EXPECT_TRUE(c->Stats().ok()) << "the loop serves on";
  std::filesystem::remove(path_);
  const std::string real = dir_.File("real-tenants.json");
  WriteFile(real, R"({"default": {"jobs_per_s": 500}})");
  std::filesystem::create_symlink(real, path_);
  broker_->process().Signal(SIGHUP);
  ASSERT_TRUE(LogSays(path_ + " reloaded: ")) << Log();
}

TEST_F(TenantsTest, ABadTenantsFileStopsTheStart) {
  path_ = dir_.File("tenants.json");
  WriteFile(path_, R"({"tenants": {"a": {"weight": -1}}})");
  EXPECT_FALSE(StartBroker({"--tenants", path_}));
  EXPECT_NE(Log().find("tenants.a.weight"), std::string::npos) << Log();
}


TEST_F(TenantsTest, UsageEqualsWhatRanAcrossARestart) {
  ASSERT_TRUE(StartWith("{}")) << Log();
  AddWorker();
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  uint64_t gpu_us = 0, bytes_out = 0;
  for (int i = 0; i < 5; ++i) {
    JobRequest j = As("u1", "ms10");
    auto id = c->Submit(j);
    ASSERT_TRUE(id.ok()) << id.status().ToString();
    auto r = c->Wait(*id);
    ASSERT_TRUE(r.ok());
    ASSERT_EQ(r->state, JobState::kDone) << r->error;
    gpu_us += r->timing.total_us - r->timing.queue_us;
    for (const Bytes& o : r->outputs) bytes_out += o.size();
  }
  JobRequest broken = As("u1", "ms10");
  broken.spec.kernel.source = "this is not CUDA";
  auto bad = c->Submit(broken);
  ASSERT_TRUE(bad.ok());
  ASSERT_EQ(c->Wait(*bad)->code, Code::kCompileError);
  auto other = c->Submit(As("u2", "ms10"));
  ASSERT_TRUE(other.ok());
  ASSERT_TRUE(c->Wait(*other).ok());

  c.reset();
  ASSERT_EQ(broker_->Stop(), 0);
  ASSERT_TRUE(broker_->Start()) << Log();
  c = Connect();
  auto usage = c->Usage("u1");
  ASSERT_TRUE(usage.ok()) << usage.status().ToString();
  ASSERT_EQ(usage->size(), 1u);
  const schema::TenantUsage& u = (*usage)[0];
  EXPECT_EQ(u.tenant, "u1");
  EXPECT_EQ(u.done, 5u);
  EXPECT_EQ(u.failed, 1u);
  EXPECT_EQ(u.canceled + u.expired, 0u);
  EXPECT_EQ(u.gpu_us, gpu_us) << "the time each job held its GPU, summed";
  EXPECT_EQ(u.bytes_in, 6u) << "one byte of input each";
  EXPECT_EQ(u.bytes_out, bytes_out);
  auto all = c->Usage();
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 2u) << "every tenant, on the ipc endpoint";
  EXPECT_EQ((*all)[1].tenant, "u2");
  EXPECT_EQ((*all)[1].done, 1u);
  // A window that ends before the jobs did holds nothing of them.
  auto before = c->Usage("u1", 1, 3600000);
  ASSERT_TRUE(before.ok());
  EXPECT_TRUE(before->empty());
  EXPECT_EQ(c->Usage("u1", 5000, 5000).status().code(), Code::kInvalid);

  // The same through `gpuq usage`.
  std::string out;
  ASSERT_EQ(RunProgram({BinPath("gpuq"), "usage", "--broker", broker_->client_endpoint(),
                        "--tenant", "u1", "--since", "2020-01-01", "--json"},
                       &out),
            0)
      << out;
  auto parsed = nlohmann::json::parse(out, nullptr, false);
  ASSERT_TRUE(parsed.is_array() && parsed.size() == 1) << out;
  EXPECT_EQ(parsed[0]["done"], 5);
  EXPECT_EQ(parsed[0]["gpu_us"], gpu_us);
  ASSERT_EQ(RunProgram({BinPath("gpuq"), "usage", "--broker", broker_->client_endpoint(),
                        "--since", "yesterday", "--json"},
                       &out),
            2)
      << out;
  EXPECT_NE(out.find("neither Unix seconds nor"), std::string::npos) << out;
  // Seconds past what milliseconds of a u64 hold: refused (the CLI aborted
  // on one past a u64, and wrapped one past a thousandth of it).
  for (const char* since : {"99999999999999999999", "18446744073709552"}) {
    ASSERT_EQ(RunProgram({BinPath("gpuq"), "usage", "--broker", broker_->client_endpoint(),
                          "--since", since, "--json"},
                         &out),
              2)
        << out;
    EXPECT_NE(out.find("past any time"), std::string::npos) << out;
  }
}


TEST_F(TenantsTest, MetricsNameTheTopTenantsAndSumTheRest) {
  ASSERT_TRUE(StartWith("{}")) << Log();
  AddWorker({"--slots", "8"});
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  std::vector<uint64_t> ids;
  for (int t = 0; t < 25; ++t) {
    char name[8];
    std::snprintf(name, sizeof name, "t%02d", t);
    // t00 runs two jobs: the most GPU time.
    for (int k = 0; k < (t == 0 ? 2 : 1); ++k) {
      auto id = c->Submit(As(name, "ms10"));
      ASSERT_TRUE(id.ok());
      ids.push_back(*id);
    }
  }
  for (uint64_t id : ids) ASSERT_TRUE(c->Wait(id).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(400));  // the next render
  httplib::Client http("127.0.0.1", broker_->metrics_port());
  auto res = http.Get("/metrics");
  ASSERT_TRUE(res);
  std::set<std::string> named;
  std::istringstream lines(res->body);
  for (std::string line; std::getline(lines, line);) {
    const std::string series = "gpuq_tenant_gpu_seconds_total{tenant=\"";
    if (line.rfind(series, 0) == 0) named.insert(line.substr(series.size(), 3));
  }
  EXPECT_EQ(named.size(), 21u) << "20 tenants and other:\n" << res->body;
  EXPECT_TRUE(named.count("t00"));
  EXPECT_TRUE(named.count("oth"));
  EXPECT_NE(res->body.find("gpuq_tenant_jobs_finished_total{tenant=\"other\",outcome=\"done\"} 5"),
            std::string::npos)
      << res->body;
  EXPECT_NE(res->body.find("gpuq_tenant_jobs_finished_total{tenant=\"t00\",outcome=\"done\"} 2"),
            std::string::npos);
}

}  // namespace
}  // namespace gpuq::testing
