// GPU health on a real GPU: the figures the worker reads from NVML beside
// nvidia-smi's, and a GPU drained by a critical Xid (injected through the
// worker's test hook, GPUQ_TEST_INJECT_XID) taking no jobs.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <thread>

#include "gpuq/client.h"
#include "tests/gpu/gpu_fixture.h"

namespace gpuq {
namespace {

using schema::JobState;

// nvidia-smi's reading of GPU `uuid`: utilization %, memory used MiB,
// temperature C, power W; empty where nvidia-smi is missing.
std::vector<double> NvidiaSmi(const std::string& uuid) {
  const std::string cmd = "nvidia-smi --id=" + uuid +
                          " --query-gpu=utilization.gpu,memory.used,temperature.gpu,power.draw"
                          " --format=csv,noheader,nounits 2>/dev/null";
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return {};
  char line[256] = {};
  const bool got = fgets(line, sizeof line, p) != nullptr;
  pclose(p);
  if (!got) return {};
  std::vector<double> v;
  std::stringstream s(line);
  for (std::string field; std::getline(s, field, ',');) v.push_back(std::atof(field.c_str()));
  return v;
}

class GpuHealthTest : public testing::GpuFixture {
 protected:
  static void SetUpTestSuite() { StartBroker("1"); }
  static void TearDownTestSuite() { StopBroker(); }
};

TEST_F(GpuHealthTest, NvmlFiguresArePlausibleBesideNvidiaSmi) {
  auto d = client_->Devices();
  ASSERT_TRUE(d.ok());
  ASSERT_FALSE(d->empty());
  const schema::WorkerView& w = (*d)[0];
  ASSERT_TRUE(w.health.known) << "the worker read no NVML";
  const schema::GpuHealth& h = w.health;
  EXPECT_LE(h.util_pct, 100u);
  EXPECT_GT(h.temp_c, 5u);
  EXPECT_LT(h.temp_c, 110u);
  EXPECT_GT(h.power_mw, 1000u) << "a working GPU draws more than a watt";
  EXPECT_GT(h.mem_used_bytes, 0u);
  EXPECT_LE(h.mem_used_bytes, w.device.total_bytes);
  EXPECT_TRUE(h.drain.empty()) << h.drain;
  const std::vector<double> smi = NvidiaSmi(w.device.uuid);
  std::printf("gpuq (NVML): %u%% busy, %.0f MiB used, %u C, %.1f W, ECC %llu/%llu, %llu Xids\n",
              h.util_pct, h.mem_used_bytes / 1048576.0, h.temp_c, h.power_mw / 1e3,
              static_cast<unsigned long long>(h.ecc_corrected),
              static_cast<unsigned long long>(h.ecc_uncorrected),
              static_cast<unsigned long long>(h.xid_events));
  if (smi.size() == 4) {
    std::printf("nvidia-smi:  %.0f%% busy, %.0f MiB used, %.0f C, %.1f W\n", smi[0], smi[1],
                smi[2], smi[3]);
    EXPECT_NEAR(h.temp_c, smi[2], 10);
    EXPECT_NEAR(h.mem_used_bytes / 1048576.0, smi[1], 1024);
    EXPECT_NEAR(h.power_mw / 1e3, smi[3], 100);
  } else {
    std::printf("nvidia-smi: not on this machine\n");
  }
}

// The worker's test hook reports Xid 79 (fallen off the bus) once, as NVML
// would: the broker drains the GPU.
class DrainTest : public testing::GpuFixture {
 protected:
  static void SetUpTestSuite() {
    setenv("GPUQ_TEST_INJECT_XID", "79", 1);
    StartBroker("1");
    unsetenv("GPUQ_TEST_INJECT_XID");
  }
  static void TearDownTestSuite() { StopBroker(); }
};

TEST_F(DrainTest, AGpuWithACriticalXidTakesNoJobs) {
  std::string drain;
  for (int i = 0; i < 200 && drain.empty(); ++i) {
    auto d = client_->Devices();
    if (d.ok() && !d->empty()) drain = (*d)[0].health.drain;
    if (drain.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_NE(drain.find("Xid 79"), std::string::npos) << drain;
  JobRequest j = Kernel(R"(extern "C" __global__ void k(int* out) { *out = 7; })", "k",
                        {1, 1, 1}, {1, 1, 1});
  j.spec.args = {schema::Arg::Out(4)};
  auto id = client_->Submit(j);
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  std::this_thread::sleep_for(std::chrono::seconds(1));
  auto st = client_->GetStatus(*id);
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->state, JobState::kQueued) << "a job ran on a drained GPU";
  std::printf("drained: %s; a job submitted after it is still %s\n", drain.c_str(),
              std::string(schema::JobStateName(st->state)).c_str());
  ASSERT_TRUE(client_->Cancel(*id).ok());
}

}  // namespace
}  // namespace gpuq
