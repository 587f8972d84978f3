#include "broker/scheduler.h"

#include <gtest/gtest.h>

namespace gpuq::broker {
namespace {

std::vector<uint64_t> Drain(Scheduler& s) {
  std::vector<uint64_t> out;
  while (auto id = s.Pop([](uint64_t) { return true; })) out.push_back(*id);
  return out;
}

TEST(SchedulerTest, HigherPriorityFirstThenFifo) {
  Scheduler s;
  s.Push(1, "a", 5);
  s.Push(2, "a", 9);
  s.Push(3, "a", 5);
  s.Push(4, "a", 0);
  EXPECT_EQ(Drain(s), (std::vector<uint64_t>{2, 1, 3, 4}));
  EXPECT_EQ(s.size(), 0u);
}

TEST(SchedulerTest, TenantsTakeTurnsWithinAPriority) {
  Scheduler s;
  for (uint64_t i = 1; i <= 6; ++i) s.Push(i, "flood", 5);
  s.Push(100, "small", 5);
  s.Push(101, "small", 5);
  auto order = Drain(s);
  ASSERT_EQ(order.size(), 8u);
  // The small tenant's two jobs are among the first four.
  auto pos = [&](uint64_t id) { return std::find(order.begin(), order.end(), id) - order.begin(); };
  EXPECT_LT(pos(100), 4);
  EXPECT_LT(pos(101), 4);
}

TEST(SchedulerTest, IneligibleJobsKeepTheirPlace) {
  Scheduler s;
  s.Push(1, "a", 5);
  s.Push(2, "a", 5);
  auto id = s.Pop([](uint64_t id) { return id == 2; });
  ASSERT_TRUE(id);
  EXPECT_EQ(*id, 2u);
  EXPECT_EQ(Drain(s), (std::vector<uint64_t>{1}));
  EXPECT_FALSE(s.Pop([](uint64_t) { return true; }));
}

TEST(SchedulerTest, RemoveAndCounts) {
  Scheduler s;
  s.Push(1, "a", 5);
  s.Push(2, "b", 7);
  s.Push(3, "a", 7);
  EXPECT_EQ(s.TenantSize("a"), 2u);
  EXPECT_TRUE(s.Remove(3));
  EXPECT_FALSE(s.Remove(3));
  EXPECT_EQ(s.TenantSize("a"), 1u);
  EXPECT_EQ(s.SizeByPriority(), (std::map<uint32_t, uint64_t>{{5, 1}, {7, 1}}));
  EXPECT_EQ(Drain(s), (std::vector<uint64_t>{2, 1}));
  EXPECT_EQ(s.TenantSize("a"), 0u);
}

// Tenant names on the ipc endpoint are the caller's word: the counts by
// tenant that stats and /metrics read were every tenant's, copied and sorted
// on the loop (100,000 tenants: a fifth of a second, four times a second with
// /metrics on). The `most` largest are named, the rest summed as "other".
TEST(SchedulerTest, SizesByTenantAreTheLargestAndTheRestSummed) {
  Scheduler s;
  uint64_t id = 0, total = 0;
  for (int t = 0; t < 5000; ++t) {
    const int n = t % 97 == 0 ? 3 : 1;  // 52 tenants with 3 jobs
    for (int k = 0; k < n; ++k) s.Push(++id, "t" + std::to_string(t), 5);
    total += n;
  }
  const auto top = s.SizeByTenant(52);
  ASSERT_EQ(top.size(), 53u);
  uint64_t sum = 0;
  for (const auto& [tenant, n] : top) {
    sum += n;
    if (tenant != "other") {
      EXPECT_EQ(n, 3u) << tenant;
    }
  }
  EXPECT_EQ(sum, total);
  EXPECT_EQ(top.at("other"), 5000u - 52u);
  EXPECT_EQ(s.SizeByTenant(10000).size(), 5000u);
}

}  // namespace
}  // namespace gpuq::broker
