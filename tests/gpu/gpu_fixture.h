// What the GPU tests share: a real gpuqd, with the real gpuq-worker
// processes it supervises, started once per test suite, and the verbs the
// tests use. Where there is no GPU (CI), every test reports itself skipped.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "gpuq/client.h"
#include "tests/process_util.h"
#include "tests/test_util.h"

namespace gpuq::testing {

// GPUs that gpuq-worker can use on this machine.
inline int GpuCount() {
  static const int count = [] {
    std::string out;
    int rc = RunProgram({BinPath("gpuq-worker"), "--count"}, &out);
    return rc == 0 ? std::atoi(out.c_str()) : 0;
  }();
  return count;
}
inline bool HaveGpu() { return GpuCount() > 0; }

// A test suite's fixture derives from this and starts the broker in its
// SetUpTestSuite() with StartBroker() and stops it in TearDownTestSuite()
// with StopBroker(). Suites run one after another, so they share the
// statics.
class GpuFixture : public ::testing::Test {
 public:
  template <typename T>
  static std::vector<T> As(const Bytes& bytes) {
    std::vector<T> v(bytes.size() / sizeof(T));
    std::memcpy(v.data(), bytes.data(), v.size() * sizeof(T));
    return v;
  }

 protected:
  // gpuqd with `workers` (its --workers: "-1" one per visible GPU, "1" one),
  // and `extra` options.
  static void StartBroker(const std::string& workers, std::vector<std::string> extra = {}) {
    if (!HaveGpu()) return;
    workers_ = workers == "-1" ? static_cast<size_t>(GpuCount()) : std::stoul(workers);
    dir_ = new TempDir();
    broker_ = new BrokerProcess(dir_->path(), std::move(extra), workers);
    ASSERT_TRUE(broker_->Start()) << ReadFile(dir_->File("gpuqd.log"));
  }
  static void StopBroker() {
    if (broker_) broker_->Stop();
    if (dir_ && ::testing::UnitTest::GetInstance()->failed_test_count() > 0) {
      // The broker's log holds its workers' output too.
      std::string log = ReadFile(dir_->File("gpuqd.log"));
      std::printf("---- gpuqd.log (last 6000 bytes)\n%s\n",
                  log.substr(log.size() > 6000 ? log.size() - 6000 : 0).c_str());
    }
    delete broker_;
    delete dir_;
    broker_ = nullptr;
    dir_ = nullptr;
  }
  void SetUp() override {
    if (!HaveGpu()) GTEST_SKIP() << "no GPU on this machine";
    client_ = Connect();
    ASSERT_TRUE(WaitForWorker(*client_)) << Log();
  }

  static std::unique_ptr<Client> Connect() {
    ClientOptions o;
    o.timeout = Millis(60000);
    auto c = Client::Connect(broker_->client_endpoint(), o);
    EXPECT_TRUE(c.ok());
    return std::move(*c);
  }
  // Waits until every worker is attached (one may be restarting after a
  // fault or timeout of an earlier test).
  static bool WaitForWorker(Client& c) {
    for (int i = 0; i < 300; ++i) {
      auto d = c.Devices();
      if (d.ok() && d->size() == workers_) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }
  static std::string Log() { return ReadFile(dir_->File("gpuqd.log")); }

  // Keeps input bytes alive for the requests that point at them.
  std::string_view Keep(std::string bytes) {
    keep_.push_back(std::move(bytes));
    return keep_.back();
  }
  template <typename T>
  std::string_view Keep(const std::vector<T>& v) {
    return Keep(std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T)));
  }
  JobResult Run(const JobRequest& j) {
    auto id = client_->Submit(j);
    EXPECT_TRUE(id.ok()) << id.status().ToString();
    if (!id.ok()) return {};
    auto r = client_->Wait(*id, Millis(60000));
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? *r : JobResult{};
  }

  static JobRequest Kernel(std::string src, std::string entry, schema::Dim3 grid,
                           schema::Dim3 block) {
    JobRequest j;
    j.spec.kernel.source = std::move(src);
    j.spec.kernel.entry = std::move(entry);
    j.spec.launch.grid = grid;
    j.spec.launch.block = block;
    return j;
  }

  inline static TempDir* dir_ = nullptr;
  inline static BrokerProcess* broker_ = nullptr;
  inline static size_t workers_ = 0;
  std::unique_ptr<Client> client_;
  std::deque<std::string> keep_;
  std::mt19937 rng_{std::random_device{}()};
};

}  // namespace gpuq::testing
