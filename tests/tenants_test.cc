// Tenant policies (broker/tenants.h) and the scheduler's weighted fair
// share (broker/scheduler.h), in isolation.
#include "broker/tenants.h"

#include <gtest/gtest.h>

#include "broker/scheduler.h"

namespace gpuq::broker {
namespace {

TEST(TenantPoliciesTest, ATenantHasItsOwnFieldsOverTheDefaults) {
  auto p = TenantPolicies::Parse(R"({
    "default": {"weight": 2, "max_concurrent": 8, "jobs_per_s": 100},
    "tenants": {"guest-17": {"weight": 0.5, "bytes_per_s": 1e9, "max_queued": 50,
                             "max_queued_bytes": 1048576}}
  })");
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->size(), 1u);
  const TenantPolicy& g = p->For("guest-17");
  EXPECT_EQ(g.weight, 0.5);
  EXPECT_EQ(g.max_concurrent, 8u) << "from the default";
  EXPECT_EQ(g.jobs_per_s, 100);
  EXPECT_EQ(g.bytes_per_s, 1e9);
  EXPECT_EQ(g.max_queued, 50u);
  EXPECT_EQ(g.max_queued_bytes, 1048576u);
  const TenantPolicy& other = p->For("someone-else");
  EXPECT_EQ(other.weight, 2);
  EXPECT_EQ(other.max_queued, 0u);
  EXPECT_TRUE(TenantPolicies::Parse("{}").ok()) << "an empty file: every tenant the same";
}

TEST(TenantPoliciesTest, EveryMistakeIsRefusedAndNamed) {
  const std::pair<const char*, const char*> bad[] = {
      {"not json", "not valid JSON"},
      {"[1]", "must be a JSON object"},
      {R"({"tenant": {}})", "tenant: unknown field"},
      {R"({"tenants": []})", "tenants: must be an object"},
      {R"({"tenants": {"a": {"weigth": 1}}})", "tenants.a.weigth: unknown field"},
      {R"({"tenants": {"a": {"weight": 0}}})", "tenants.a.weight: must be above 0"},
      {R"({"tenants": {"a": {"weight": "3"}}})", "tenants.a.weight: must be a number"},
      {R"({"default": {"max_concurrent": -1}})", "default.max_concurrent: must be a whole"},
      {R"({"default": {"max_queued": 1.5}})", "default.max_queued: must be a whole"},
      {R"({"default": {"jobs_per_s": -2}})", "default.jobs_per_s: must be 0"},
      {R"({"tenants": {"": {}}})", "a tenant name is 1 to 64 bytes"},
  };
  for (const auto& [text, why] : bad) {
    auto p = TenantPolicies::Parse(text);
    ASSERT_FALSE(p.ok()) << text;
    EXPECT_EQ(p.status().code(), Code::kInvalid) << text;
    EXPECT_NE(p.status().message().find(why), std::string::npos)
        << text << " -> " << p.status().message();
  }
  EXPECT_EQ(TenantPolicies::Load("/nonexistent/tenants.json").status().code(), Code::kIoError);
}

TEST(TokenBucketTest, ASecondsWorthThenTheRate) {
  TokenBucket b;
  const MonoTime t0{};
  uint64_t wait = 0;
  for (int i = 0; i < 10; ++i) EXPECT_TRUE(b.Take(10, 1, t0, &wait)) << i;
  EXPECT_FALSE(b.Take(10, 1, t0, &wait));
  EXPECT_EQ(wait, 100u) << "one token at 10/s";
  EXPECT_FALSE(b.Take(10, 1, t0 + std::chrono::milliseconds(50), &wait));
  EXPECT_EQ(wait, 50u);
  EXPECT_TRUE(b.Take(10, 1, t0 + std::chrono::milliseconds(100), &wait));
  // A request larger than the bucket passes once it is full, leaving debt.
  TokenBucket big;
  EXPECT_TRUE(big.Take(100, 250, t0, &wait));
  EXPECT_FALSE(big.Take(100, 1, t0 + std::chrono::seconds(1), &wait));
  EXPECT_TRUE(big.Take(100, 1, t0 + std::chrono::seconds(2), &wait));
}

// A rate the file allows (any above 0) waited 1e23 ms at 1e-20/s: past
// what a u64 holds (undefined; 2^63 on x86). The wait is at most a day, and
// the refusal names the rate as given, not as 0.
TEST(TenantLimitsTest, ATinyRateWaitsAtMostADayAndIsNamed) {
  auto p = TenantPolicies::Parse(R"({"tenants": {"slow": {"jobs_per_s": 1e-20}}})");
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  TenantLimits limits(std::move(*p));
  const MonoTime t0{};
  uint64_t wait = 0;
  EXPECT_TRUE(limits.Admit("slow", 0, t0, &wait).ok()) << "a full bucket takes one";
  Status s = limits.Admit("slow", 0, t0 + std::chrono::seconds(1), &wait);
  EXPECT_EQ(s.code(), Code::kQuotaExceeded);
  EXPECT_EQ(wait, TokenBucket::kMaxRetryAfterMs);
  EXPECT_NE(s.message().find("rate of 1e-20 jobs/s"), std::string::npos) << s.message();
}

TEST(TenantLimitsTest, RatesAndConcurrency) {
  auto p = TenantPolicies::Parse(
      R"({"tenants": {"r": {"jobs_per_s": 2, "bytes_per_s": 1000, "max_concurrent": 1}}})");
  ASSERT_TRUE(p.ok());
  TenantLimits limits(std::move(*p));
  const MonoTime t0{};
  uint64_t wait = 0;
  EXPECT_TRUE(limits.Admit("r", 700, t0, &wait).ok());
  Status s = limits.Admit("r", 400, t0, &wait);
  EXPECT_EQ(s.code(), Code::kQuotaExceeded) << "300 of 1000 bytes left";
  EXPECT_NE(s.message().find("1000 input bytes/s"), std::string::npos) << s.message();
  EXPECT_EQ(wait, 100u) << "100 bytes more at 1000/s";
  EXPECT_TRUE(limits.Admit("r", 300, t0, &wait).ok())
      << "the refusal for bytes took no job token";
  s = limits.Admit("r", 1, t0, &wait);
  EXPECT_EQ(s.code(), Code::kQuotaExceeded);
  EXPECT_NE(s.message().find("2 jobs/s"), std::string::npos) << s.message();
  EXPECT_EQ(wait, 500u);
  EXPECT_TRUE(limits.Admit("r", 1, t0 + std::chrono::milliseconds(500), &wait).ok());
  for (int i = 0; i < 100; ++i) EXPECT_TRUE(limits.Admit("free", 1 << 20, t0, &wait).ok());

  EXPECT_TRUE(limits.MayStart("r"));
  limits.Started("r");
  EXPECT_FALSE(limits.MayStart("r"));
  EXPECT_TRUE(limits.MayStart("free"));
  limits.Stopped("r");
  EXPECT_TRUE(limits.MayStart("r"));
  EXPECT_EQ(limits.Running("r"), 0u);
}

// Pops jobs as GPUs would take them, each job of `tenant` taking cost(tenant)
// µs, until either tenant runs out; returns each tenant's GPU time.
std::map<std::string, double> Share(Scheduler& s, const std::map<std::string, double>& cost,
                                    int pops) {
  std::map<std::string, double> gpu;
  std::map<uint64_t, std::string> owner;
  uint64_t next = 1;
  for (const auto& [tenant, c] : cost) {
    for (int i = 0; i < pops; ++i) {
      owner[next] = tenant;
      s.Push(next++, tenant, 5);
    }
  }
  for (int i = 0; i < pops; ++i) {
    auto id = s.Pop([](uint64_t) { return true; });
    if (!id) break;
    const std::string& t = owner[*id];
    s.Settle(t, s.Charged(), cost.at(t));
    gpu[t] += cost.at(t);
  }
  return gpu;
}

TEST(SchedulerTest, GpuTimeDividesByWeightWhateverTheJobLengths) {
  Scheduler s;
  s.SetWeights([](const std::string& t) { return t == "heavy" ? 3.0 : 1.0; });
  // The light tenant's jobs are twice as long: round robin would give it
  // two thirds of the GPU; its weight gives it a quarter.
  auto gpu = Share(s, {{"heavy", 1000}, {"light", 2000}}, 2000);
  const double total = gpu["heavy"] + gpu["light"];
  EXPECT_NEAR(gpu["heavy"] / total, 0.75, 0.02);
  EXPECT_NEAR(s.ChargedTo("heavy") / (s.ChargedTo("heavy") + s.ChargedTo("light")), 0.75, 0.02);
}

TEST(SchedulerTest, AnIdleTenantBanksNoCredit) {
  Scheduler s;
  for (uint64_t i = 1; i <= 200; ++i) s.Push(i, "early", 5);
  for (int i = 0; i < 100; ++i) {
    auto id = s.Pop([](uint64_t) { return true; });
    ASSERT_TRUE(id);
    s.Settle("early", s.Charged(), 1000);
  }
  // "late" had nothing queued while "early" ran 100 jobs: it does not get
  // the next 100 in a row.
  for (uint64_t i = 1000; i < 1100; ++i) s.Push(i, "late", 5);
  int late_in_a_row = 0;
  for (int i = 0; i < 10; ++i) {
    auto id = s.Pop([](uint64_t) { return true; });
    ASSERT_TRUE(id);
    late_in_a_row += *id >= 1000;
    s.Settle(*id >= 1000 ? "late" : "early", s.Charged(), 1000);
  }
  EXPECT_LE(late_in_a_row, 6);
  EXPECT_GE(late_in_a_row, 4);
}

TEST(SchedulerTest, ATenantThatMayNotStartIsSkipped) {
  Scheduler s;
  s.Push(1, "capped", 5);
  s.Push(2, "free", 5);
  s.Push(3, "capped", 5);
  auto not_capped = [](const std::string& t) { return t != "capped"; };
  auto id = s.Pop([](uint64_t) { return true; }, 64, not_capped);
  ASSERT_TRUE(id);
  EXPECT_EQ(*id, 2u);
  EXPECT_FALSE(s.Pop([](uint64_t) { return true; }, 64, not_capped));
  EXPECT_EQ(s.size(), 2u) << "the capped tenant's jobs keep their place";
}

}  // namespace
}  // namespace gpuq::broker
