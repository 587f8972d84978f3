// The broker's parts on their own, with a clock the test drives: the job
// table and its bounds, the worker registry, the stats encoding.
#include <gtest/gtest.h>

#include <sstream>

#include <nlohmann/json.hpp>

#include <sys/socket.h>

#include "broker/job_table.h"
#include "broker/relay_io.h"
#include "broker/metrics.h"
#include "broker/regions.h"
#include "broker/worker_registry.h"
#include "schema/filename.h"
#include "tests/golden_messages.h"
#include "tests/manual_clock.h"

namespace gpuq::broker {
namespace {

using schema::JobState;
using testing::ManualClock;

std::unique_ptr<Job> NewJob(uint64_t id, const std::string& tenant, uint64_t bytes = 0,
                            int64_t deadline_ms = 0) {
  auto j = std::make_unique<Job>();
  j->id = id;
  j->tenant = tenant;
  j->input_bytes = j->held_bytes = bytes;
  j->deadline_ms = deadline_ms;
  j->durable = true;
  return j;
}

TEST(JobTableTest, BoundsAreExactAndCountEveryJobUntilItEnds) {
  JobTable t({/*jobs=*/3, /*per tenant=*/2, /*bytes=*/100});
  uint64_t retry = 0;
  ASSERT_TRUE(t.CanAdmit("a", 40, &retry).ok());
  t.Add(NewJob(1, "a", 40));
  ASSERT_TRUE(t.CanAdmit("a", 40, &retry).ok());
  t.Add(NewJob(2, "a", 40));
  EXPECT_EQ(t.CanAdmit("a", 0, &retry).code(), Code::kQueueFull) << "per tenant";
  EXPECT_GT(retry, 0u);
  EXPECT_EQ(t.CanAdmit("b", 21, &retry).code(), Code::kQueueFull) << "bytes";
  ASSERT_TRUE(t.CanAdmit("b", 20, &retry).ok());
  t.Add(NewJob(3, "b", 20));
  EXPECT_EQ(t.CanAdmit("c", 0, &retry).code(), Code::kQueueFull) << "jobs";
  // An ended job stops counting, though it stays until its result commits.
  t.End(*t.Find(1), JobState::kDone);
  EXPECT_NE(t.Find(1), nullptr);
  EXPECT_TRUE(t.CanAdmit("a", 40, &retry).ok());
  t.Remove(1);
  EXPECT_EQ(t.active(), 2u);
  EXPECT_EQ(t.active_bytes(), 60u);
}

TEST(JobTableTest, DeadlinesExpireQueuedJobsInOrderAndWaitForTheirRow) {
  ManualClock clock;
  JobTable t({});
  const int64_t now = clock.UnixMs();
  t.Queue(t.Add(NewJob(1, "a", 0, now + 100)));
  t.Queue(t.Add(NewJob(2, "a", 0, now + 50)));
  Job& pending = t.Add(NewJob(3, "a", 0, now + 10));
  pending.durable = false;
  EXPECT_TRUE(t.Expired(now).empty());
  clock.Advance(std::chrono::milliseconds(60));
  EXPECT_EQ(t.Expired(clock.UnixMs()), std::vector<uint64_t>({2}));
  pending.durable = true;
  clock.Advance(std::chrono::milliseconds(60));
  EXPECT_EQ(t.Expired(clock.UnixMs()), std::vector<uint64_t>({3, 1}))
      << "the waiting job first: its deadline passed first";
}

TEST(JobTableTest, EndedJobsLeaveTheDeadlineHeap) {
  // Every job with a deadline left 16 bytes in the heap until that deadline
  // came (up to 366 days): at 50,000 such jobs a second, gigabytes an hour.
  ManualClock clock;
  JobTable t({});
  const int64_t far = clock.UnixMs() + 366LL * 24 * 3600 * 1000;
  for (uint64_t id = 1; id <= 100000; ++id) {
    t.Queue(t.Add(NewJob(id, "a", 0, far)));
    if (id > 10) {  // ten stay queued; the others end and go
      t.End(*t.Find(id), id % 2 ? JobState::kDone : JobState::kCanceled);
      t.Remove(id);
    }
  }
  EXPECT_LE(t.deadlines_held(), 2048u) << "entries for 10 jobs with a deadline";
  // The ten still expire, in order, when their deadline comes.
  clock.Advance(std::chrono::hours(366 * 24 + 1));
  EXPECT_EQ(t.Expired(clock.UnixMs()), std::vector<uint64_t>({1, 2, 3, 4, 5, 6, 7, 8, 9, 10}));
}

schema::WorkerMessage Ready(uint32_t slots, const std::string& arch = "sm_90") {
  schema::WorkerMessage m;
  m.op = schema::WorkerOp::kReady;
  m.worker = "w";
  m.device.cc_major = static_cast<uint32_t>(std::stoi(arch.substr(3, arch.size() - 4)));
  m.device.cc_minor = static_cast<uint32_t>(arch.back() - '0');
  m.slots = slots;
  return m;
}

const auto kAnyArch = [](const std::string&) { return true; };

TEST(WorkerRegistryTest, AStaleResultChangesNothing) {
  ManualClock clock;
  WorkerRegistry r;
  Worker* w = *r.Ready("id", Ready(1), false, clock.Now(), kAnyArch);
  r.Dispatched(*w, /*job=*/7, /*attempt=*/3, false);
  EXPECT_EQ(w->credits, 0u);
  EXPECT_EQ(r.TakeResult(*w, 7, 2), WorkerRegistry::ResultFor::kStale);
  EXPECT_EQ(r.TakeResult(*w, 8, 3), WorkerRegistry::ResultFor::kStale);
  EXPECT_EQ(w->credits, 0u) << "a stale result freed a slot";
  EXPECT_EQ(w->inflight.count(7), 1u);
  r.Abandon(*w, 7);
  EXPECT_EQ(w->credits, 0u) << "an abandoned job keeps its slot until the worker answers";
  EXPECT_EQ(r.TakeResult(*w, 7, 3), WorkerRegistry::ResultFor::kAbandoned);
  EXPECT_EQ(w->credits, 1u);
  EXPECT_TRUE(w->inflight.empty());
}

TEST(WorkerRegistryTest, RefusesNoSlotsAndArchitecturesTheCompilerCannotTarget) {
  ManualClock clock;
  WorkerRegistry r;
  EXPECT_EQ(r.Ready("a", Ready(0), false, clock.Now(), kAnyArch).status().code(),
            Code::kInvalid);
  auto old = r.Ready("b", Ready(4, "sm_50"), false, clock.Now(),
                     [](const std::string& arch) { return arch != "sm_50"; });
  EXPECT_EQ(old.status().code(), Code::kInvalid);
  EXPECT_NE(old.status().message().find("sm_50"), std::string::npos);
  EXPECT_EQ(r.size(), 0u);
}

TEST(WorkerRegistryTest, SilenceIsJudgedByTheClock) {
  ManualClock clock;
  WorkerRegistry r;
  Worker* w = *r.Ready("id", Ready(2), false, clock.Now(), kAnyArch);
  clock.Advance(std::chrono::milliseconds(400));
  EXPECT_TRUE(r.SilentSince(clock.Now() - std::chrono::milliseconds(500)).empty());
  clock.Advance(std::chrono::milliseconds(200));
  EXPECT_EQ(r.SilentSince(clock.Now() - std::chrono::milliseconds(500)),
            std::vector<std::string>({"id"}));
  w->last_seen = clock.Now();
  EXPECT_TRUE(r.SilentSince(clock.Now() - std::chrono::milliseconds(500)).empty());
}

// The golden stats map and the broker's encoder agree: the same keys, in the
// same order, with values of the same types, at every level.
void SameShape(const nlohmann::ordered_json& a, const nlohmann::ordered_json& b,
               const std::string& where) {
  ASSERT_EQ(a.type_name(), std::string(b.type_name())) << where;
  if (a.is_object()) {
    std::vector<std::string> ka, kb;
    for (auto& [k, v] : a.items()) ka.push_back(k);
    for (auto& [k, v] : b.items()) kb.push_back(k);
    if (where == "stats" || where.find("cache") != std::string::npos ||
        where.find("store") != std::string::npos || where.find("loop") != std::string::npos ||
        where.find("latency_us/") != std::string::npos || where.find("workers") != std::string::npos ||
        where.find("regions") != std::string::npos) {
      ASSERT_EQ(ka, kb) << where;
    }
    for (auto& [k, v] : a.items()) {
      if (b.contains(k)) SameShape(v, b[k], where + "/" + k);
    }
  } else if (a.is_array() && !a.empty() && !b.empty()) {
    SameShape(a[0], b[0], where + "[0]");
  }
}

// On the ipc endpoint a tenant's name is the caller's word: the region
// table keeps nothing for a name that holds no region (a client trying a
// million names grew it without bound).
TEST(RegionTableTest, ATenantWithoutRegionsLeavesNothingBehind) {
  RegionTable t(RegionLimits{.regions_per_tenant = 1, .bytes_per_tenant = 1 << 20,
                             .regions = 2, .bytes = 1 << 20});
  auto memfd = [] { return UniqueFd(dup(0)); };  // the table keeps any descriptor it is given
  auto a = t.Add("a", 4096, memfd(), -1);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(t.Add("a", 4096, memfd(), -1).status().code(), Code::kResourceExhausted);
  for (int i = 0; i < 1000; ++i) {
    EXPECT_EQ(t.Add("t" + std::to_string(i), 2 << 20, memfd(), -1).status().code(),
              Code::kResourceExhausted);
  }
  EXPECT_EQ(t.tenants_counted(), 1u);
  // Used by a job, ended, released: then nothing is left.
  std::vector<schema::Arg> buffers = {
      schema::Arg::InRegion(schema::ArgKind::kOut, *a, 0, 100)};
  ASSERT_TRUE(t.Check("a", buffers).ok());
  t.Use(7, buffers);
  bool gone = true;
  EXPECT_EQ(t.End(*a, "unregistered", &gone), std::set<uint64_t>{7});
  EXPECT_FALSE(gone);
  EXPECT_EQ(t.tenants_counted(), 1u);
  EXPECT_EQ(t.Release(7), std::vector<uint64_t>{*a});
  EXPECT_EQ(t.tenants_counted(), 0u);
  EXPECT_TRUE(t.all().empty());
  EXPECT_TRUE(t.Add("a", 1 << 20, memfd(), -1).ok()) << "the tenant's bounds are whole again";
}

// Tenant names on the ipc endpoint are the caller's word: the series by
// tenant are the top 20 and "other", however many names there are.
TEST(StatsTest, TenantSeriesAreBounded) {
  StatsSnapshot s;
  uint64_t total = 0;
  for (int i = 0; i < 50; ++i) {
    s.queued_by_tenant["t" + std::to_string(i)] = 100 + i;
    total += 100 + i;
    s.regions.push_back({static_cast<uint64_t>(i + 1), "t" + std::to_string(i), 4096, 0, false});
  }
  const std::string text = PrometheusText(s);
  auto series = [&](const std::string& name) {
    size_t n = 0;
    uint64_t sum = 0;
    std::istringstream in(text);
    for (std::string line; std::getline(in, line);) {
      if (line.rfind(name + "{", 0) != 0) continue;
      ++n;
      sum += std::stoull(line.substr(line.rfind(' ') + 1));
    }
    return std::make_pair(n, sum);
  };
  EXPECT_EQ(series("gpuq_tenant_jobs_queued"), std::make_pair(size_t{21}, total));
  EXPECT_NE(text.find("gpuq_tenant_jobs_queued{tenant=\"t49\"} 149"), std::string::npos);
  EXPECT_NE(text.find("gpuq_tenant_jobs_queued{tenant=\"other\"}"), std::string::npos);
  EXPECT_EQ(series("gpuq_tenant_regions"), std::make_pair(size_t{21}, uint64_t{50}));
  EXPECT_EQ(series("gpuq_tenant_region_bytes"), std::make_pair(size_t{21}, uint64_t{50 * 4096}));
}

// A counter by tenant never goes down. The series were the top 20 by GPU
// time with the rest summed as "other": when the 21st passed the 20th, their
// totals swapped series, and "other" fell (a counter reset to a scraper,
// whose rate() then spiked). The first 20 tenants to finish keep their
// series.
TEST(StatsTest, TenantCountersNeverGoDown) {
  StatsSnapshot s;
  for (uint32_t i = 0; i < 21; ++i) {
    TenantCounters& c = s.by_tenant["t" + std::to_string(i)];
    c.gpu_us = 1000000 * (30 - i);
    c.done = 30 - i;
    c.first_seen = i;
  }
  auto value = [](const std::string& text, const std::string& series) {
    const size_t at = text.find(series + " ");
    EXPECT_NE(at, std::string::npos) << series;
    return at == std::string::npos ? -1.0 : std::stod(text.substr(at + series.size() + 1));
  };
  const std::string before = PrometheusText(s);
  const std::string other_gpu = "gpuq_tenant_gpu_seconds_total{tenant=\"other\"}";
  const std::string other_done = "gpuq_tenant_jobs_finished_total{tenant=\"other\",outcome=\"done\"}";
  const double gpu = value(before, other_gpu), done = value(before, other_done);
  // The 21st tenant passes the 20th; nothing else changes.
  s.by_tenant["t20"].gpu_us += 5000000;
  s.by_tenant["t20"].done += 5;
  const std::string after = PrometheusText(s);
  EXPECT_GE(value(after, other_gpu), gpu);
  EXPECT_GE(value(after, other_done), done);
  EXPECT_EQ(value(after, "gpuq_tenant_gpu_seconds_total{tenant=\"t19\"}"),
            value(before, "gpuq_tenant_gpu_seconds_total{tenant=\"t19\"}"));
}

// A tenant's name is any bytes; the text format's label values are UTF-8,
// and a scraper refuses the whole page for one byte that is not. Such bytes
// (and '%') are written %XX; UTF-8 names are kept; two names never meet.
TEST(StatsTest, ATenantNameThatIsNotUtf8LeavesThePageUtf8) {
  StatsSnapshot s;
  s.queued_by_tenant["\xff\xfe"] = 1;
  s.queued_by_tenant["\xfe\xff"] = 2;
  s.queued_by_tenant["100%"] = 3;
  s.queued_by_tenant["na\xc3\xafve \"q\"\\\n"] = 4;  // naïve "q"\\ and a newline
  s.queued_by_tenant["\xed\xa0\x80"] = 5;  // a surrogate: not UTF-8
  const std::string text = PrometheusText(s);
  // Valid UTF-8 throughout.
  for (size_t i = 0; i < text.size();) {
    const auto c = static_cast<unsigned char>(text[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    ASSERT_NE(n, 0u) << "byte " << i;
    for (size_t k = 1; k < n; ++k) {
      ASSERT_EQ(static_cast<unsigned char>(text[i + k]) & 0xC0, 0x80) << "byte " << i + k;
    }
    ASSERT_FALSE(c == 0xED && static_cast<unsigned char>(text[i + 1]) > 0x9F);
    i += n;
  }
  EXPECT_NE(text.find("gpuq_tenant_jobs_queued{tenant=\"%FF%FE\"} 1"), std::string::npos) << text;
  EXPECT_NE(text.find("gpuq_tenant_jobs_queued{tenant=\"%FE%FF\"} 2"), std::string::npos);
  EXPECT_NE(text.find("gpuq_tenant_jobs_queued{tenant=\"100%25\"} 3"), std::string::npos);
  EXPECT_NE(text.find("gpuq_tenant_jobs_queued{tenant=\"na\xc3\xafve \\\"q\\\"\\\\\\n\"} 4"),
            std::string::npos);
  EXPECT_NE(text.find("gpuq_tenant_jobs_queued{tenant=\"%ED%A0%80\"} 5"), std::string::npos);
}

TEST(StatsTest, TheEncoderWritesTheGoldenStatsShape) {
  StatsSnapshot s;
  s.queued = 3;
  s.queued_by_priority = {{5, 2}, {9, 1}};
  s.queued_by_tenant = {{"vm-7", 3}};
  s.inflight = 2;
  s.inflight_by_worker = {{"gpu-host-1:3112:0", 2}};
  s.finished = {{"done", 114}};
  for (const char* phase : {"total", "queue"}) s.latency[phase].Observe(40);
  schema::WorkerView w;
  w.worker = "gpu-host-1:3112:0";
  s.workers = {w};
  s.regions = {{0x5eed0000cafe0001ull, "vm-7", 64ull << 20, 2, false}};
  s.sessions = {{0x5e55000000000001ull, "vm-7", "GPU-5f1b", 1ull << 30, 8ull << 20, 91000, 4242}};
  s.uptime_s = 1.5;
  std::string golden;
  for (const auto& g : testing::GoldenMessages()) {
    if (g.name == "reply_stats") golden = std::get<schema::ClientReply>(g.message).stats;
  }
  ASSERT_FALSE(golden.empty());
  SameShape(nlohmann::ordered_json::from_msgpack(EncodeStats(s)),
            nlohmann::ordered_json::from_msgpack(golden), "stats");
  // Phases in the order of PROTOCOL.md.
  auto enc = nlohmann::ordered_json::from_msgpack(EncodeStats(s));
  std::vector<std::string> phases;
  for (auto& [k, v] : enc["latency_us"].items()) phases.push_back(k);
  EXPECT_EQ(phases, std::vector<std::string>({"queue", "total"}));
}

}  // namespace
}  // namespace gpuq::broker

namespace gpuq::schema {
namespace {

TEST(FileNameTest, EveryNameParsesBackToWhatMadeIt) {
  ParsedFileName p;
  ASSERT_TRUE(ParseFileName(WorkerOutputName(42, 7, 3), &p));
  EXPECT_EQ(p.type, FileType::kWorkerOutput);
  EXPECT_EQ(p.job, 42u);
  EXPECT_EQ(p.attempt, 7u);
  EXPECT_EQ(p.arg, 3u);
  ASSERT_TRUE(ParseFileName(StoredBufferName(9, 'o', 2), &p));
  EXPECT_EQ(p.type, FileType::kStoredOutput);
  EXPECT_EQ(p.job, 9u);
  EXPECT_EQ(p.idx, 2u);
  ASSERT_TRUE(ParseFileName(LogSegmentName('i', 12), &p));
  EXPECT_EQ(p.type, FileType::kInputLog);
  EXPECT_EQ(p.seg, 12u);
  const std::string c = ClientFileName();
  EXPECT_TRUE(IsClientFileName(c));
  EXPECT_NE(c, ClientFileName()) << "client names are random";
  ASSERT_TRUE(ParseFileName(c, &p));
  EXPECT_EQ(p.type, FileType::kClientInput);
  for (const char* bad : {"", "j", "j1.x2", "j.i1", "j1.i", "w-1-2", "w-a-1-2", "log-i-",
                          "log-i-x", "jobs.db", "j12345678901234567890.i1"}) {
    EXPECT_FALSE(ParseFileName(bad, &p)) << bad;
  }
  EXPECT_FALSE(IsClientFileName(StoredBufferName(1, 'i', 0))) << "a client may not name the store's";
  EXPECT_FALSE(IsWorkerFileName(StoredBufferName(1, 'o', 0)));
}

}  // namespace
}  // namespace gpuq::schema

// ---------------------------------------------------------------- relay bytes

namespace gpuq::broker {
namespace {

// Frames through a socket pair whose buffers are small, written and read a
// few bytes a turn (the length's 4 bytes split across turns too), arrive
// whole and in order.
TEST(RelayIoTest, FramesCrossInSmallTurnsWholeAndInOrder) {
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
  UniqueFd a(sv[0]), b(sv[1]);
  const int small = 4096;
  setsockopt(a.get(), SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
  setsockopt(b.get(), SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
  std::vector<std::string> sent;
  for (size_t size : {size_t{0}, size_t{1}, size_t{3}, size_t{4}, size_t{5000}, size_t{1} << 20,
                      size_t{7}}) {
    std::string f(size, '\0');
    for (size_t i = 0; i < size; ++i) f[i] = static_cast<char>(i * 31 + size);
    sent.push_back(f);
  }
  for (size_t turn : {size_t{3}, size_t{7}, size_t{1000}, size_t{4} << 20}) {
    RelayWriter w;
    RelayReader r(2 << 20);
    for (const std::string& f : sent) w.Push(zmq::message_t(f.data(), f.size()));
    EXPECT_EQ(w.queued(), 4 * sent.size() + 5000 + (1 << 20) + 15);
    std::vector<std::string> got;
    for (int spins = 0; got.size() < sent.size() && spins < 10000000; ++spins) {
      ASSERT_TRUE(w.Flush(a.get(), turn).ok());
      ASSERT_TRUE(r.Fill(b.get(), turn + 1).ok());
      zmq::message_t m;
      while (r.Next(&m)) got.emplace_back(static_cast<const char*>(m.data()), m.size());
    }
    EXPECT_FALSE(w.pending());
    ASSERT_EQ(got.size(), sent.size()) << "turn " << turn;
    for (size_t i = 0; i < sent.size(); ++i) EXPECT_TRUE(got[i] == sent[i]) << i;
  }
  // A frame over the reader's bound is an error, not an allocation.
  RelayWriter w;
  RelayReader r(100);
  w.Push(zmq::message_t(std::string(101, 'x')));
  ASSERT_TRUE(w.Flush(a.get(), 1 << 20).ok());
  EXPECT_EQ(r.Fill(b.get(), 1 << 20).code(), Code::kTooLarge);
  // The peer gone: the reader says so.
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
  UniqueFd c(sv[0]), d(sv[1]);
  c.Reset();
  RelayReader r2(1 << 20);
  EXPECT_EQ(r2.Fill(d.get(), 1 << 20).code(), Code::kUnavailable);
}

}  // namespace
}  // namespace gpuq::broker
