// Registered regions (PROTOCOL.md, "Regions") from the C API and the gpuq
// command line, through gpuqd and the worker test double, which gives a
// range the bytes a sent buffer would get (out: the argument's index + 1;
// inout: every byte + 1).
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <thread>
#include <string>
#include <vector>

#include "gpuq/gpuq.h"
#include "tests/broker_fixture.h"

extern "C" int gpuq_c_api_region_scenario(const char* endpoint, char* why, size_t why_size);

namespace gpuq::testing {
namespace {

using nlohmann::json;
using schema::JobState;

class RegionsClientsTest : public BrokerTest {
 protected:
  // A worker of the broker's host: it maps the regions.
  Process& AddLocalWorker() { return AddWorker({"--local-dir", LocalDir()}); }

  // Runs gpuq with `args` against the test's broker; its stdout in `out`.
  int Gpuq(const std::string& command, std::vector<std::string> args, std::string* out,
           const std::string& broker = "") {
    std::vector<std::string> argv = {BinPath("gpuq"), command, "--broker",
                                     broker.empty() ? broker_->client_endpoint() : broker};
    argv.insert(argv.end(), args.begin(), args.end());
    return RunProgram(argv, out);
  }

  json Stats(Client& c) {
    auto s = c.Stats();
    EXPECT_TRUE(s.ok());
    return s.ok() ? json::from_msgpack(*s) : json();
  }
};

std::string Pattern(size_t n, unsigned seed) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<char>((i * 7 + seed) & 0xff);
  return s;
}

std::string PlusOne(std::string s) {
  for (char& c : s) c = static_cast<char>(static_cast<unsigned char>(c) + 1);
  return s;
}

// A region may outlive its client (gpuq.h): unregistering it then, with no
// client to name, failed by writing the failure's text through the NULL
// client (the process ended). It fails plainly.
TEST_F(RegionsClientsTest, TheCApiUnregistersARegionThatOutlivedItsClient) {
  gpuq_client* c = nullptr;
  ASSERT_EQ(gpuq_client_new(broker_->client_endpoint().c_str(), 2000, &c), GPUQ_OK);
  gpuq_region* region = nullptr;
  ASSERT_EQ(gpuq_region_new(c, 4096, nullptr, &region), GPUQ_OK) << gpuq_client_error(c);
  gpuq_client_free(c);
  broker_->Kill();  // the region's channel is gone with the broker
  EXPECT_NE(gpuq_region_unregister(nullptr, region), GPUQ_OK);
  EXPECT_EQ(gpuq_region_unregister(nullptr, region), GPUQ_OK) << "once is enough";
  gpuq_region_free(region);
  ASSERT_TRUE(broker_->Start()) << Log();
  // A client that cannot connect leaves *out NULL.
  gpuq_client* none = reinterpret_cast<gpuq_client*>(1);
  EXPECT_NE(gpuq_client_new("no-such-scheme://x", 100, &none), GPUQ_OK);
  EXPECT_EQ(none, nullptr);
}

TEST_F(RegionsClientsTest, TheCApiRegistersARegionAndJobsUseItsRangesInPlace) {
  AddLocalWorker();
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  char why[512] = "";
  EXPECT_EQ(gpuq_c_api_region_scenario(broker_->client_endpoint().c_str(), why, sizeof why), 0)
      << why;
  // Freed with their client: the broker has none left.
  for (int i = 0; i < 200 && !Stats(*c)["regions"].empty(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_TRUE(Stats(*c)["regions"].empty()) << Stats(*c).dump();
}

TEST_F(RegionsClientsTest, GpuqSubmitRegionReadsFilesIntoARegionAndWritesItsRanges) {
  AddLocalWorker();
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  TempDir dir;
  WriteFile(dir.File("k.cu"), kKernels);
  const std::string x = Pattern(5000, 1), y = Pattern(10000, 2);
  WriteFile(dir.File("x.bin"), x);
  WriteFile(dir.File("y.bin"), y);
  WriteFile(dir.File("empty.bin"), "");
  const std::vector<std::string> job = {dir.File("k.cu"), "--kernel", "k", "--block", "32",
                                        "--inout", dir.File("y.bin"), "--arg", "u32:7",
                                        "--out", "3000", "--in", dir.File("x.bin"),
                                        "--in", dir.File("empty.bin"), "--wait", "--json"};
  std::vector<std::string> with_region = job;
  with_region.insert(with_region.end(), {"--region", "--output", dir.File("r")});
  std::string out;
  ASSERT_EQ(Gpuq("submit", with_region, &out), 0) << out;
  const json r = json::parse(out, nullptr, false);
  ASSERT_FALSE(r.is_discarded()) << out;
  EXPECT_EQ(r["state"], "done") << out;
  // Each buffer of at least a byte on a page of its own: y at 0, the out
  // buffer at 12288, x at 16384; the empty file travels as before.
  ASSERT_TRUE(r.contains("region")) << out;
  const uint64_t id = r["region"]["region"].get<uint64_t>();
  EXPECT_NE(id, 0u);
  EXPECT_EQ(r["region"]["size"], 16384 + 5000) << out;
  EXPECT_EQ(r["outputs"], json::array({{{"arg", 0}, {"bytes", 10000}, {"region", id},
                                        {"offset", 0}},
                                       {{"arg", 2}, {"bytes", 3000}, {"region", id},
                                        {"offset", 12288}}}))
      << out;
  EXPECT_EQ(ReadFile(dir.File("r.arg0.bin")), PlusOne(y));
  EXPECT_EQ(ReadFile(dir.File("r.arg2.bin")), std::string(3000, '\x03'));
  EXPECT_FALSE(std::filesystem::exists(dir.File("r.arg3.bin"))) << "an in buffer";
  EXPECT_EQ(ReadFile(dir.File("y.bin")), y) << "the input file is left as it was";
  // The region ended with gpuq.
  for (int i = 0; i < 200 && !Stats(*c)["regions"].empty(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_TRUE(Stats(*c)["regions"].empty());

  // The same job without --region writes the same files.
  std::vector<std::string> sent = job;
  sent.insert(sent.end(), {"--output", dir.File("s")});
  ASSERT_EQ(Gpuq("submit", sent, &out), 0) << out;
  EXPECT_EQ(ReadFile(dir.File("s.arg0.bin")), ReadFile(dir.File("r.arg0.bin")));
  EXPECT_EQ(ReadFile(dir.File("s.arg2.bin")), ReadFile(dir.File("r.arg2.bin")));

  // As text: the result, and the region it used.
  with_region.erase(std::find(with_region.begin(), with_region.end(), "--json"));
  ASSERT_EQ(Gpuq("submit", with_region, &out), 0) << out;
  EXPECT_NE(out.find(": done"), std::string::npos) << out;
  EXPECT_NE(out.find("3 buffer(s) in 21384 bytes"), std::string::npos) << out;

  // A tenant's region, for the tenant's job.
  std::vector<std::string> tenant = with_region;
  tenant.insert(tenant.end(), {"--tenant", "alice"});
  EXPECT_EQ(Gpuq("submit", tenant, &out), 0) << out;
}

TEST_F(RegionsClientsTest, GpuqSubmitRegionHoldsTheBuffersOfAJobOfSeveralLaunches) {
  AddLocalWorker();
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  TempDir dir;
  WriteFile(dir.File("k.cu"), kKernels);
  WriteFile(dir.File("x.bin"), std::string(16, '\x09'));
  WriteFile(dir.File("y.bin"), "\x01\x02\x03");
  std::string out;
  ASSERT_EQ(Gpuq("submit",
                 {dir.File("k.cu"), "--region", "--in", dir.File("x.bin"), "--out", "8",
                  "--scratch", "64", "--inout", dir.File("y.bin"), "--launch", "k:1:32",
                  "--arg", "buf:0", "--arg", "buf:2", "--launch", "k:1:32", "--arg", "buf:1:4",
                  "--arg", "buf:3", "--wait", "--json", "--output", dir.File("r")},
                 &out),
            0)
      << out;
  const json r = json::parse(out, nullptr, false);
  ASSERT_FALSE(r.is_discarded()) << out;
  EXPECT_EQ(r["state"], "done") << out;
  ASSERT_EQ(r["outputs"].size(), 2u) << out;
  EXPECT_EQ(r["outputs"][0]["arg"], 1) << out;
  EXPECT_EQ(r["outputs"][1]["arg"], 3) << out;
  EXPECT_EQ(ReadFile(dir.File("r.arg1.bin")), std::string(8, '\x02'));
  EXPECT_EQ(ReadFile(dir.File("r.arg3.bin")), "\x02\x03\x04");
  EXPECT_FALSE(std::filesystem::exists(dir.File("r.arg0.bin")));
  EXPECT_FALSE(std::filesystem::exists(dir.File("r.arg2.bin")));
}

TEST_F(RegionsClientsTest, GpuqSubmitRegionRefusesWhatCannotWorkWithItsReason) {
  TempDir dir;
  WriteFile(dir.File("k.cu"), kKernels);
  WriteFile(dir.File("x.bin"), "abc");
  const std::vector<std::string> job = {dir.File("k.cu"), "--kernel", "k", "--in",
                                        dir.File("x.bin"), "--region", "--json"};
  auto refused = [&](std::vector<std::string> extra, const std::string& broker, int rc,
                     const std::string& text) {
    std::vector<std::string> args = job;
    args.insert(args.end(), extra.begin(), extra.end());
    std::string out;
    EXPECT_EQ(Gpuq("submit", args, &out, broker), rc) << out;
    const json j = json::parse(out, nullptr, false);
    EXPECT_NE(j.value("error", "").find(text), std::string::npos) << out;
  };
  refused({"--wait"}, "tcp://127.0.0.1:1", 2, "--region needs the broker's ipc endpoint");
  refused({}, "", 2, "--region needs --wait");
  refused({"--in", dir.path(), "--wait"}, "", 4, "not a regular file");
  refused({"--in", dir.File("missing.bin"), "--wait"}, "", 4, "missing.bin");
  // Nothing was submitted.
  auto c = Connect();
  EXPECT_EQ(Stats(*c)["submitted"], 0);

  // Past the tenant's bound: the broker's refusal, naming the bound.
  ASSERT_TRUE(StartBroker({"--max-region-mb", "1"})) << Log();
  WriteFile(dir.File("big.bin"), std::string(2 << 20, 'b'));
  refused({"--inout", dir.File("big.bin"), "--wait"}, "", 3, "--max-region-mb");
}

TEST_F(RegionsClientsTest, GpuqRegionsListsTheRegisteredRegionsFromTheStats) {
  std::string out;
  ASSERT_EQ(Gpuq("regions", {}, &out), 0) << out;
  EXPECT_EQ(out, "no regions registered\n");
  ASSERT_EQ(Gpuq("regions", {"--json"}, &out), 0) << out;
  EXPECT_EQ(json::parse(out, nullptr, false), json::array()) << out;

  AddLocalWorker();
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  auto mine = c->NewRegion(4096, "alice");
  ASSERT_TRUE(mine.ok()) << mine.status().ToString();
  auto other = c->NewRegion(8192);
  ASSERT_TRUE(other.ok()) << other.status().ToString();
  // A job that runs and never ends keeps alice's region, once ended, listed.
  JobRequest j;
  j.spec.kernel.source = kKernels;
  j.spec.kernel.entry = "hang";
  j.spec.tenant = "alice";
  j.spec.args = {(*mine)->Out(0, 16)};
  auto id = c->Submit(j);
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  ASSERT_TRUE(WaitDispatched(*c, *id));
  ASSERT_TRUE((*mine)->Unregister().ok());

  ASSERT_EQ(Gpuq("regions", {"--json"}, &out), 0) << out;
  json listed = json::parse(out, nullptr, false);
  ASSERT_TRUE(listed.is_array() && listed.size() == 2) << out;
  std::sort(listed.begin(), listed.end(),
            [](const json& a, const json& b) { return a["size"] < b["size"]; });
  EXPECT_EQ(listed[0]["region"], (*mine)->id()) << out;
  EXPECT_EQ(listed[0]["tenant"], "alice") << out;
  EXPECT_EQ(listed[0]["size"], 4096) << out;
  EXPECT_EQ(listed[0]["jobs"], 1) << out;
  EXPECT_EQ(listed[0]["ended"], true) << out;
  EXPECT_EQ(listed[1]["region"], (*other)->id()) << out;
  EXPECT_EQ(listed[1]["tenant"], "default") << out;
  EXPECT_EQ(listed[1]["jobs"], 0) << out;
  EXPECT_EQ(listed[1]["ended"], false) << out;

  ASSERT_EQ(Gpuq("regions", {}, &out), 0) << out;
  EXPECT_NE(out.find(std::to_string((*mine)->id())), std::string::npos) << out;
  EXPECT_NE(out.find("alice"), std::string::npos) << out;
  EXPECT_NE(out.find("ended (waits for its jobs)"), std::string::npos) << out;
  EXPECT_NE(out.find(std::to_string((*other)->id())), std::string::npos) << out;
  EXPECT_NE(out.find("live"), std::string::npos) << out;
  // gpuq stats sums them up.
  ASSERT_EQ(Gpuq("stats", {}, &out), 0) << out;
  EXPECT_NE(out.find("regions: 2 of 12288 bytes, 1 ended"), std::string::npos) << out;
}

}  // namespace
}  // namespace gpuq::testing
