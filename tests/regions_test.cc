// Registered regions through gpuqd, with the worker test double (PROTOCOL.md,
// "Regions"): memory a client shares once as a sealed memfd over the region
// channel, named by jobs as ranges that are read and written in place. The
// test double maps the region as gpuq-worker does and gives its ranges the
// bytes a sent buffer would get (out: the argument's index + 1; inout: +1).
// The bytes on a GPU are the GPU tests' (tests/gpu/).
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>

#include "schema/filename.h"
#include "schema/region_channel.h"
#include "tests/broker_fixture.h"
#include "util/sealed_memfd.h"
#include "util/unix_socket.h"

namespace gpuq::testing {
namespace {

using schema::Arg;
using schema::JobState;
using schema::RegionMessage;
using schema::RegionOp;

class RegionsTest : public BrokerTest {
 protected:
  Process& AddLocalWorker(std::vector<std::string> extra = {}) {
    extra.insert(extra.end(), {"--local-dir", LocalDir()});
    return AddWorker(extra);
  }
  // A job whose buffers are `args` (the test double's kernel `entry`).
  JobRequest RegionJob(std::vector<Arg> args, const std::string& entry = "k",
                       const std::string& tenant = "") {
    JobRequest j;
    j.spec.kernel.source = kKernels;
    j.spec.kernel.entry = entry;
    j.spec.launch.grid = {1, 1, 1};
    j.spec.launch.block = {32, 1, 1};
    j.spec.args = std::move(args);
    j.spec.tenant = tenant;
    return j;
  }
  // The region channel as a raw peer: hello sent.
  UniqueFd RawChannel() {
    auto fd = schema::ConnectRegionChannel(LocalDir(), "");
    EXPECT_TRUE(fd.ok()) << fd.status().ToString();
    return fd.ok() ? std::move(*fd) : UniqueFd();
  }
  static RegionMessage Call(int fd, RegionMessage m, int pass = -1) {
    EXPECT_TRUE(schema::SendRegionMessage(fd, m, pass).ok());
    return Read(fd);
  }
  static RegionMessage Read(int fd) {
    RegionMessage r;
    UniqueFd got;
    auto ok = schema::ReadRegionMessage(fd, /*dontwait=*/false, &r, &got);
    EXPECT_TRUE(ok.ok() && *ok) << ok.status().ToString();
    return r;
  }
  // Whether a job that writes `range` is taken within `tries` turns of 10 ms
  // (no unfinished job, or lost attempt, holds those bytes).
  bool TakenWithin(Client& c, const Arg& range, int tries, const std::string& entry = "k") {
    for (int i = 0; i < tries; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      if (c.Submit(RegionJob({range}, entry)).ok()) return true;
    }
    return false;
  }
  nlohmann::json Stats(Client& c) {
    auto s = c.Stats();
    EXPECT_TRUE(s.ok());
    return s.ok() ? nlohmann::json::from_msgpack(*s) : nlohmann::json();
  }
};

TEST_F(RegionsTest, RangesAreReadAndWrittenInPlaceAndNothingComesBack) {
  // Long heartbeats, both ways: under ThreadSanitizer a stall of the test
  // double made it register again, and a job that writes a region is not
  // run again after its worker is lost (it fails, as it must).
  ASSERT_TRUE(StartBroker({"--heartbeat-ms", "1000"})) << Log();
  AddLocalWorker({"--heartbeat-ms", "1000"});
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  auto region = c->NewRegion(1 << 20);
  ASSERT_TRUE(region.ok()) << region.status().ToString();
  Region& r = **region;
  ASSERT_EQ(r.size(), 1u << 20);
  for (size_t i = 0; i < 4096; ++i) r.data()[i] = static_cast<char>(i);
  memset(r.data() + 4096, 0x55, 8192);  // the out range: overwritten
  auto id = c->Submit(RegionJob({r.InOut(0, 4096), Arg::U32(7), r.Out(4096, 4096), r.In(0, 64)}));
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  auto res = c->Wait(*id);
  ASSERT_TRUE(res.ok()) << res.status().ToString();
  ASSERT_TRUE(res->ok()) << res->error;
  EXPECT_TRUE(res->outputs.empty()) << "a region's bytes never travel";
  EXPECT_TRUE(res->output_args.empty());
  for (size_t i = 0; i < 4096; ++i) {
    ASSERT_EQ(static_cast<uint8_t>(r.data()[i]), static_cast<uint8_t>(i + 1)) << i;
  }
  for (size_t i = 4096; i < 8192; ++i) ASSERT_EQ(r.data()[i], 3) << i;
  for (size_t i = 8192; i < 12288; ++i) ASSERT_EQ(r.data()[i], 0x55) << "outside every range";
  // A sent buffer and a region range in one job.
  auto mixed = c->Wait(*c->Submit(Job("k", "ab")));
  ASSERT_TRUE(mixed.ok() && mixed->ok());
  JobRequest both = Job("k", "xy");
  both.spec.args.push_back(r.Out(100000, 10));
  auto b = c->Wait(*c->Submit(both));
  ASSERT_TRUE(b.ok() && b->ok()) << (b.ok() ? b->error : b.status().ToString());
  EXPECT_EQ(b->output_args, (std::vector<uint32_t>{0, 2}));
  ASSERT_NE(b->Output(0), nullptr);
  EXPECT_EQ(b->Output(0)->str(), "yz");
  EXPECT_EQ(r.data()[100000], 4);
}

TEST_F(RegionsTest, AJobOfSeveralLaunchesUsesRangesAsItsBuffers) {
  ASSERT_TRUE(StartBroker({"--heartbeat-ms", "1000"})) << Log();  // as above
  AddLocalWorker({"--heartbeat-ms", "1000"});
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  auto region = c->NewRegion(4096);
  ASSERT_TRUE(region.ok()) << region.status().ToString();
  Region& r = **region;
  JobRequest j;
  j.spec.kernel.source = kKernels;
  j.spec.buffers = {r.InOut(0, 16), Arg::Scratch(64), r.Out(16, 16)};
  schema::KernelLaunch l;
  l.launch.grid = {1, 1, 1};
  l.launch.block = {32, 1, 1};
  l.entry = "k";
  l.args = {Arg::Ref(0), Arg::Ref(2, 8)};
  j.spec.launches = {l, l};
  auto res = c->Wait(*c->Submit(j));
  ASSERT_TRUE(res.ok()) << res.status().ToString();
  ASSERT_TRUE(res->ok()) << res->error;
  EXPECT_TRUE(res->output_args.empty());
  EXPECT_EQ(r.data()[0], 1);
  EXPECT_EQ(r.data()[16], 3);
}

TEST_F(RegionsTest, BadRangesAreRefusedWithAClearError) {
  auto c = Connect();
  auto region = c->NewRegion(4096);
  ASSERT_TRUE(region.ok()) << region.status().ToString();
  Region& r = **region;
  auto past = c->Submit(RegionJob({r.In(4000, 200)}));
  ASSERT_FALSE(past.ok());
  EXPECT_EQ(past.status().code(), Code::kInvalid);
  EXPECT_NE(past.status().message().find("outside"), std::string::npos) << past.status().ToString();
  // An offset that wraps around 2^64.
  auto wrap = c->Submit(RegionJob({Arg::InRegion(schema::ArgKind::kIn, r.id(), ~0ull - 10, 100)}));
  ASSERT_FALSE(wrap.ok());
  EXPECT_EQ(wrap.status().code(), Code::kInvalid);
  auto unknown = c->Submit(RegionJob({Arg::InRegion(schema::ArgKind::kIn, r.id() ^ 1, 0, 8)}));
  ASSERT_FALSE(unknown.ok());
  EXPECT_EQ(unknown.status().code(), Code::kNotFound);
  auto self = c->Submit(RegionJob({r.Out(0, 100), r.InOut(50, 100)}));
  ASSERT_FALSE(self.ok());
  EXPECT_NE(self.status().message().find("overlap"), std::string::npos) << self.status().ToString();
  auto empty = c->Submit(RegionJob({r.Out(0, 0)}));  // size 0: to the end, fine
  EXPECT_TRUE(empty.ok()) << empty.status().ToString();
  auto s = Stats(*c);
  EXPECT_EQ(s["submitted"], 1) << s.dump();
}

TEST_F(RegionsTest, TwoUnfinishedJobsNeverWriteTheSameBytes) {
  ASSERT_TRUE(StartBroker({"--heartbeat-ms", "1000"})) << Log();  // as above
  AddLocalWorker({"--heartbeat-ms", "1000"});
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  auto region = c->NewRegion(4096);
  ASSERT_TRUE(region.ok()) << region.status().ToString();
  Region& r = **region;
  auto first = c->Submit(RegionJob({r.Out(0, 100)}, "slow"));
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  auto overlap = c->Submit(RegionJob({r.InOut(99, 10)}));
  ASSERT_FALSE(overlap.ok());
  EXPECT_EQ(overlap.status().code(), Code::kInvalid);
  EXPECT_NE(overlap.status().message().find("job " + std::to_string(*first)), std::string::npos)
      << overlap.status().ToString();
  // Reading those bytes, and writing the next ones, is fine.
  auto reader = c->Submit(RegionJob({r.In(0, 100), r.Out(100, 100)}));
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  ASSERT_TRUE(c->Wait(*first)->ok());
  auto again = c->Submit(RegionJob({r.InOut(99, 10)}));
  EXPECT_TRUE(again.ok()) << again.status().ToString();
  ASSERT_TRUE(c->Wait(*again)->ok());
  ASSERT_TRUE(c->Wait(*reader)->ok());
}

// A job that writes a region, submitted with a key and submitted again:
// while it ran, the retry was refused (its own ranges "overlapped"); after
// it ended, the retry ran a second time and wrote the client's memory again
// before the store found the key taken. Both times the retry is the first
// job, and the bytes are written once.
TEST_F(RegionsTest, AKeyedJobThatWritesARegionRunsOnceWhateverItsRetries) {
  ASSERT_TRUE(StartBroker({"--heartbeat-ms", "1000"})) << Log();  // as above
  AddLocalWorker({"--heartbeat-ms", "1000"});
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  auto region = c->NewRegion(4096);
  ASSERT_TRUE(region.ok()) << region.status().ToString();
  Region& r = **region;
  JobRequest j = RegionJob({r.InOut(0, 16)}, "slow");
  j.spec.key = "write-once";
  auto first = c->Submit(j);
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  auto during = c->Submit(j);
  ASSERT_TRUE(during.ok()) << during.status().ToString();
  EXPECT_EQ(*during, *first);
  auto done = c->Wait(*first);
  ASSERT_TRUE(done.ok() && done->ok());
  for (int round = 0; round < 3; ++round) {
    auto after = c->Submit(j);
    ASSERT_TRUE(after.ok()) << after.status().ToString();
    EXPECT_EQ(*after, *first);
  }
  // A second run would be over by now (the test double's "slow" takes
  // 100 ms), and would have added 1 to each byte again.
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  for (int i = 0; i < 16; ++i) ASSERT_EQ(r.data()[i], 1) << "byte " << i << " written twice";
}

TEST_F(RegionsTest, AnotherTenantsRegionIsNoRegionAtAll) {
  auto c = Connect();
  auto region = c->NewRegion(4096, "alice");
  ASSERT_TRUE(region.ok()) << region.status().ToString();
  auto theirs = c->Submit(RegionJob({(*region)->In(0, 8)}, "k", "bob"));
  ASSERT_FALSE(theirs.ok());
  EXPECT_EQ(theirs.status().code(), Code::kNotFound);
  auto own = c->Submit(RegionJob({(*region)->In(0, 8)}, "k", "alice"));
  EXPECT_TRUE(own.ok()) << own.status().ToString();
  // The default tenant is not alice either.
  auto plain = c->Submit(RegionJob({(*region)->In(0, 8)}));
  EXPECT_EQ(plain.status().code(), Code::kNotFound);
}

TEST_F(RegionsTest, AQueuedJobFailsWhenItsRegionEndsAndRunsOnNothingElse) {
  auto c = Connect();  // no worker yet: the jobs wait
  auto region = c->NewRegion(4096);
  ASSERT_TRUE(region.ok()) << region.status().ToString();
  auto id = c->Submit(RegionJob({(*region)->Out(0, 16)}));
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  const uint64_t rid = (*region)->id();
  EXPECT_EQ(Stats(*c)["regions"][0]["jobs"], 1);
  ASSERT_TRUE((*region)->Unregister().ok());
  auto res = c->Wait(*id);
  ASSERT_TRUE(res.ok()) << res.status().ToString();
  EXPECT_EQ(res->state, JobState::kFailed);
  EXPECT_EQ(res->code, Code::kUnavailable);
  EXPECT_NE(res->error.find("region " + std::to_string(rid) + " ended (unregistered)"),
            std::string::npos)
      << res->error;
  EXPECT_TRUE(Stats(*c)["regions"].empty());
  auto after = c->Submit(RegionJob({Arg::InRegion(schema::ArgKind::kIn, rid, 0, 8)}));
  EXPECT_EQ(after.status().code(), Code::kNotFound);
}

// A client process killed with a job queued on its region: the region ends
// with the process, and the job fails instead of running on other memory.
TEST_F(RegionsTest, AClientThatDiesTakesItsRegionsWithIt) {
  int ids[2];
  ASSERT_EQ(pipe(ids), 0);
  const std::string endpoint = broker_->client_endpoint();
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    close(ids[0]);
    auto c = Client::Connect(endpoint);
    if (!c.ok()) _exit(1);
    auto region = (*c)->NewRegion(4096);
    if (!region.ok()) _exit(2);
    JobRequest j = RegionJob({(*region)->Out(0, 16)});
    auto id = (*c)->Submit(j);
    if (!id.ok()) _exit(3);
    uint64_t v = *id;
    if (write(ids[1], &v, sizeof v) != sizeof v) _exit(4);
    pause();
    _exit(0);
  }
  close(ids[1]);
  uint64_t id = 0;
  ASSERT_EQ(read(ids[0], &id, sizeof id), static_cast<ssize_t>(sizeof id));
  close(ids[0]);
  kill(child, SIGKILL);
  int status = 0;
  waitpid(child, &status, 0);
  auto c = Connect();
  AddLocalWorker();
  std::optional<JobResult> st;
  for (int i = 0; i < 500; ++i) {
    auto s = c->GetStatus(id);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    if (s->state != JobState::kQueued) {
      st = *s;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_TRUE(st);
  EXPECT_EQ(st->state, JobState::kFailed);
  EXPECT_NE(st->error.find("its client went away"), std::string::npos) << st->error;
  EXPECT_TRUE(Stats(*c)["regions"].empty());
}

TEST_F(RegionsTest, ARestartedBrokerFailsJobsThatNamedRegions) {
  auto c = Connect();
  auto region = c->NewRegion(4096);
  ASSERT_TRUE(region.ok()) << region.status().ToString();
  auto id = c->Submit(RegionJob({(*region)->Out(0, 16)}));
  ASSERT_TRUE(id.ok());
  auto plain = c->Submit(Job("k", "ab"));
  ASSERT_TRUE(plain.ok());
  broker_->Kill();
  ASSERT_TRUE(broker_->Start()) << Log();
  AddLocalWorker();
  auto c2 = Connect();
  auto res = c2->Wait(*id);
  ASSERT_TRUE(res.ok()) << res.status().ToString();
  EXPECT_EQ(res->state, JobState::kFailed);
  EXPECT_EQ(res->code, Code::kUnavailable);
  EXPECT_NE(res->error.find("restarted"), std::string::npos) << res->error;
  auto other = c2->Wait(*plain);
  ASSERT_TRUE(other.ok());
  EXPECT_TRUE(other->ok()) << "jobs whose bytes travel keep their durability";
  // The old region is gone with the old broker; the old channel is closed.
  auto later = c->Submit(RegionJob({(*region)->Out(0, 16)}));
  EXPECT_FALSE(later.ok());
}

TEST_F(RegionsTest, OnlySealedMemfdsOfTheDeclaredSizeAreTaken) {
  UniqueFd ch = RawChannel();
  RegionMessage m;
  m.op = RegionOp::kRegister;
  m.rid = 1;
  m.size = 4096;
  // Unsealed: its owner could shrink it under a worker's mapping (SIGBUS).
  UniqueFd unsealed(memfd_create("t", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  ASSERT_EQ(ftruncate(unsealed.get(), 4096), 0);
  RegionMessage r = Call(ch.get(), m, unsealed.get());
  EXPECT_EQ(r.op, RegionOp::kError);
  EXPECT_EQ(r.code, Code::kInvalid);
  EXPECT_NE(r.error.find("sealed"), std::string::npos) << r.error;
  // A plain file.
  const std::string path = dir_.File("plain");
  UniqueFd plain(open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  ASSERT_EQ(ftruncate(plain.get(), 4096), 0);
  m.rid = 2;
  r = Call(ch.get(), m, plain.get());
  EXPECT_EQ(r.code, Code::kInvalid) << r.error;
  // Sealed, but not of the size declared.
  auto sealed = CreateSealedMemfd(8192, "t");
  ASSERT_TRUE(sealed.ok());
  m.rid = 3;
  r = Call(ch.get(), m, sealed->get());
  EXPECT_EQ(r.code, Code::kInvalid) << r.error;
  // No descriptor.
  m.rid = 4;
  r = Call(ch.get(), m);
  EXPECT_EQ(r.code, Code::kInvalid) << r.error;
  // Taken: and then its size can change no more.
  m.rid = 5;
  m.size = 8192;
  r = Call(ch.get(), m, sealed->get());
  ASSERT_EQ(r.op, RegionOp::kRegistered) << r.error;
  EXPECT_NE(r.region, 0u);
  EXPECT_NE(ftruncate(sealed->get(), 4096), 0) << "a sealed memfd cannot shrink";
  EXPECT_EQ(errno, EPERM);
  // Garbage, and a message of another op: errors, and the channel serves on.
  ASSERT_TRUE(SendPacket(ch.get(), "\xc1 not msgpack").ok());
  r = Read(ch.get());
  EXPECT_EQ(r.op, RegionOp::kError);
  RegionMessage wrong;
  wrong.op = RegionOp::kDrop;
  wrong.region = r.region;
  r = Call(ch.get(), wrong);
  EXPECT_EQ(r.op, RegionOp::kError);
  RegionMessage un;
  un.op = RegionOp::kUnregister;
  un.rid = 6;
  un.region = 12345;
  r = Call(ch.get(), un);
  EXPECT_EQ(r.code, Code::kNotFound) << "only the connection's own regions";
}

TEST_F(RegionsTest, AMemfdThatCouldStillChangeIsRefused) {
  UniqueFd ch = RawChannel();
  RegionMessage m;
  m.op = RegionOp::kRegister;
  m.size = 4096;
  auto make = [](int seals) {
    UniqueFd fd(memfd_create("t", MFD_CLOEXEC | MFD_ALLOW_SEALING));
    EXPECT_EQ(ftruncate(fd.get(), 4096), 0);
    EXPECT_EQ(fcntl(fd.get(), F_ADD_SEALS, seals), 0);
    return fd;
  };
  // Sealed in size, but a write seal could still come and make the
  // workers' mappings fail.
  UniqueFd open_seals = make(F_SEAL_SHRINK | F_SEAL_GROW);
  m.rid = 1;
  RegionMessage r = Call(ch.get(), m, open_seals.get());
  EXPECT_EQ(r.code, Code::kInvalid) << r.error;
  EXPECT_NE(r.error.find("F_SEAL_SEAL"), std::string::npos) << r.error;
  // Sealed against writes: no worker could map it writable.
  UniqueFd no_writes = make(F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL);
  m.rid = 2;
  r = Call(ch.get(), m, no_writes.get());
  EXPECT_EQ(r.code, Code::kInvalid) << r.error;
  // A memfd of huge pages, sealed as asked: a hole punched in it may find
  // no huge page when a worker touches it again (SIGBUS).
  UniqueFd huge(memfd_create("t", MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_HUGETLB));
  if (huge.valid() && ftruncate(huge.get(), 2 << 20) == 0 &&
      fcntl(huge.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) == 0) {
    RegionMessage h = m;
    h.rid = 5;
    h.size = 2 << 20;
    r = Call(ch.get(), h, huge.get());
    EXPECT_EQ(r.code, Code::kInvalid) << r.error;
    EXPECT_NE(r.error.find("huge pages"), std::string::npos) << r.error;
  } else {
    // Not every kernel has hugetlbfs: nothing to refuse there.
    std::cout << "no sealable memfd of huge pages here (" << strerror(errno)
              << "): that case is not checked\n";
  }
  // A read-only descriptor of a good memfd.
  auto good = CreateSealedMemfd(4096, "t");
  ASSERT_TRUE(good.ok());
  UniqueFd ro(open(("/proc/self/fd/" + std::to_string(good->get())).c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(ro.valid());
  m.rid = 3;
  r = Call(ch.get(), m, ro.get());
  EXPECT_EQ(r.code, Code::kInvalid) << r.error;
  m.rid = 4;
  r = Call(ch.get(), m, good->get());
  EXPECT_EQ(r.op, RegionOp::kRegistered) << r.error;
}

// A channel that says hello as a worker gets no region unless a worker of
// this host registered with that token on the worker endpoint.
TEST_F(RegionsTest, RegionsGoOnlyToWorkersTheBrokerKnows) {
  auto stranger = schema::ConnectRegionChannel(LocalDir(), "0123456789abcdef0123456789abcdef");
  ASSERT_TRUE(stranger.ok());
  auto c = Connect();
  auto region = c->NewRegion(4096);
  ASSERT_TRUE(region.ok()) << region.status().ToString();
  RegionMessage m;
  UniqueFd fd;
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  auto got = schema::ReadRegionMessage(stranger->get(), /*dontwait=*/true, &m, &fd);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_FALSE(*got) << "a stranger was handed region " << m.region;
  // A real local worker is handed it, and runs a job on it.
  AddLocalWorker();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  auto res = c->Wait(*c->Submit(RegionJob({(*region)->Out(0, 16)})));
  ASSERT_TRUE(res.ok() && res->ok()) << (res.ok() ? res->error : res.status().ToString());
  got = schema::ReadRegionMessage(stranger->get(), /*dontwait=*/true, &m, &fd);
  ASSERT_TRUE(got.ok());
  EXPECT_FALSE(*got);
}

// A job canceled while it runs may still write its ranges: they stay taken
// until its worker answers for it, or is gone.
TEST_F(RegionsTest, ACanceledJobsRangesStayTakenUntilItsWorkerAnswers) {
  Process& worker = AddLocalWorker();
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  auto region = c->NewRegion(4096);
  ASSERT_TRUE(region.ok()) << region.status().ToString();
  Region& r = **region;
  auto first = c->Submit(RegionJob({r.Out(0, 100)}, "slow"));
  ASSERT_TRUE(first.ok());
  ASSERT_TRUE(WaitDispatched(*c, *first));
  ASSERT_TRUE(c->Cancel(*first).ok());
  auto early = c->Submit(RegionJob({r.Out(0, 100)}));
  ASSERT_FALSE(early.ok()) << "the canceled attempt may still write these bytes";
  EXPECT_NE(early.status().message().find("overlaps"), std::string::npos);
  // The slow job ends on the worker (100 ms): then the bytes are free.
  ASSERT_TRUE(TakenWithin(*c, r.Out(0, 100), 200, "hang"));
  // A job that hangs, canceled: its worker never answers, so its bytes stay
  // taken until the broker knows the worker's process is gone.
  const nlohmann::json stats = Stats(*c);
  ASSERT_EQ(stats["regions"].size(), 1u) << stats.dump();
  EXPECT_EQ(stats["regions"][0]["jobs"], 1) << stats.dump();
  std::optional<uint64_t> hang_id;
  for (uint64_t id = *first + 1; id < *first + 400 && !hang_id; ++id) {
    auto s = c->GetStatus(id);
    if (s.ok() && s->state == JobState::kDispatched) hang_id = id;
  }
  ASSERT_TRUE(hang_id);
  ASSERT_TRUE(c->Cancel(*hang_id).ok());
  EXPECT_FALSE(c->Submit(RegionJob({r.Out(50, 10)})).ok());
  worker.Kill();
  EXPECT_TRUE(TakenWithin(*c, r.Out(50, 10), 300))
      << "a lost worker's held ranges are free again";
}

// A worker the broker gives up on while its process lives on (stopped, so
// silent) may still write the ranges its job held: they stay taken until the
// process is gone, which the close of its region channel tells.
TEST_F(RegionsTest, AWorkerLostWhileItLivesOnHoldsItsRangesUntilItsProcessEnds) {
  Process& worker = AddLocalWorker();
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  auto region = c->NewRegion(4096);
  ASSERT_TRUE(region.ok()) << region.status().ToString();
  Region& r = **region;
  auto id = c->Submit(RegionJob({r.Out(0, 100)}, "hang"));
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  ASSERT_TRUE(WaitDispatched(*c, *id));
  worker.Signal(SIGSTOP);
  // Silent: the broker gives the worker up and fails the job (one that
  // writes a region does not run again).
  auto res = c->Wait(*id, Millis(20000));
  ASSERT_TRUE(res.ok()) << res.status().ToString();
  EXPECT_EQ(res->state, JobState::kFailed);
  EXPECT_EQ(res->code, Code::kUnavailable) << res->error;
  ASSERT_TRUE(WaitForWorkers(*c, 0));
  auto early = c->Submit(RegionJob({r.Out(50, 10)}));
  ASSERT_FALSE(early.ok()) << "the stopped process may still write these bytes";
  EXPECT_NE(early.status().message().find("overlaps"), std::string::npos)
      << early.status().ToString();
  worker.Kill();
  EXPECT_TRUE(TakenWithin(*c, r.Out(50, 10), 500))
      << "the ranges of a worker whose process is gone are free again";
}

// A worker that reads nothing of its channel (stopped) while a client
// registers and unregisters regions over and over: the broker holds one
// descriptor per live region, not one per message waiting for that worker.
TEST_F(RegionsTest, AWorkerThatReadsNoRegionMessagesCostsTheBrokerNoDescriptors) {
  Process& worker = AddLocalWorker();
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  {
    // Attached: a job on a region runs there.
    auto region = c->NewRegion(4096);
    ASSERT_TRUE(region.ok()) << region.status().ToString();
    auto res = c->Wait(*c->Submit(RegionJob({(*region)->Out(0, 16)})));
    ASSERT_TRUE(res.ok() && res->ok()) << (res.ok() ? res->error : res.status().ToString());
  }
  worker.Signal(SIGSTOP);
  auto open_fds = [&] {
    size_t n = 0;
    const std::string dir = "/proc/" + std::to_string(broker_->process().pid()) + "/fd";
    for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir)) ++n;
    return n;
  };
  UniqueFd ch = RawChannel();
  auto memfd = CreateSealedMemfd(4096, "t");
  ASSERT_TRUE(memfd.ok());
  const size_t before = open_fds();
  size_t most = before;
  for (uint64_t i = 0; i < 2000; ++i) {
    RegionMessage m;
    m.op = RegionOp::kRegister;
    m.rid = 2 * i + 1;
    m.size = 4096;
    RegionMessage r = Call(ch.get(), m, memfd->get());
    ASSERT_EQ(r.op, RegionOp::kRegistered) << r.error;
    RegionMessage un;
    un.op = RegionOp::kUnregister;
    un.rid = 2 * i + 2;
    un.region = r.region;
    r = Call(ch.get(), un);
    ASSERT_EQ(r.op, RegionOp::kUnregistered) << r.error;
    if (i % 100 == 99) most = std::max(most, open_fds());
  }
  EXPECT_LE(most, before + 8) << "descriptors held for a worker that reads nothing";
  worker.Kill();
}

// A peer of the region channel that says no hello is closed: it holds no
// place under the channel's bound of connections.
TEST_F(RegionsTest, AConnectionThatSaysNoHelloIsClosed) {
  auto mute = ConnectSeqpacket(schema::RegionSocketPath(LocalDir()));
  ASSERT_TRUE(mute.ok()) << mute.status().ToString();
  UniqueFd talking = RawChannel();
  pollfd p{mute->get(), POLLIN, 0};
  ASSERT_EQ(poll(&p, 1, 20000), 1) << "still open after 20 s";
  auto got = RecvPacket(mute->get(), 4096);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_TRUE(got->eof);
  // One that said hello is served on.
  RegionMessage un;
  un.op = RegionOp::kUnregister;
  un.rid = 1;
  un.region = 7;
  EXPECT_EQ(Call(talking.get(), un).code, Code::kNotFound);
}

TEST_F(RegionsTest, RegionsPerTenantAreBounded) {
  ASSERT_TRUE(StartBroker({"--max-regions", "2", "--max-region-mb", "3"})) << Log();
  auto c = Connect();
  auto a = c->NewRegion(1 << 20), b = c->NewRegion(1 << 20);
  ASSERT_TRUE(a.ok() && b.ok());
  auto third = c->NewRegion(4096);
  ASSERT_FALSE(third.ok());
  EXPECT_EQ(third.status().code(), Code::kResourceExhausted);
  EXPECT_NE(third.status().message().find("--max-regions"), std::string::npos);
  auto other = c->NewRegion(4096, "someone-else");
  EXPECT_TRUE(other.ok()) << "the bound is per tenant";
  a->reset();
  auto big = c->NewRegion(3 << 20);
  ASSERT_FALSE(big.ok());
  EXPECT_NE(big.status().message().find("--max-region-mb"), std::string::npos)
      << big.status().ToString();
  auto fits = c->NewRegion(2 << 20);
  EXPECT_TRUE(fits.ok()) << fits.status().ToString();
  auto s = Stats(*c);
  EXPECT_EQ(s["regions"].size(), 3u) << s.dump();
}

// A register whose answer came after its client stopped waiting: the
// region had no owner in the client, and counted against its tenant's
// bounds until the client went away. Its late answer is read with the
// next call's, and the region unregistered.
TEST_F(RegionsTest, ARegionWhoseRegisterTimedOutDoesNotStayRegistered) {
  ASSERT_TRUE(StartBroker({"--max-regions", "2"})) << Log();
  auto c = Connect(Millis(300));
  auto kept = c->NewRegion(4096);  // the region channel is open
  ASSERT_TRUE(kept.ok()) << kept.status().ToString();
  broker_->process().Signal(SIGSTOP);
  auto late = c->NewRegion(4096);
  broker_->process().Signal(SIGCONT);
  ASSERT_FALSE(late.ok());
  EXPECT_EQ(late.status().code(), Code::kTimeout) << late.status().ToString();
  // The broker registers it once it runs again.
  bool registered = false;
  for (int i = 0; i < 200 && !registered; ++i) {
    registered = Stats(*c)["regions"].size() == 2;
    if (!registered) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_TRUE(registered) << Stats(*c).dump();
  auto next = c->NewRegion(4096);
  EXPECT_TRUE(next.ok()) << "the tenant holds two regions: " << next.status().ToString();
  EXPECT_EQ(Stats(*c)["regions"].size(), 2u) << Stats(*c).dump();
}

TEST_F(RegionsTest, RegionsOfAllTenantsAreBoundedToo) {
  ASSERT_TRUE(StartBroker({"--max-regions-total", "2", "--max-region-mb-total", "3"})) << Log();
  auto c = Connect();
  auto a = c->NewRegion(1 << 20, "a"), b = c->NewRegion(1 << 20, "b");
  ASSERT_TRUE(a.ok() && b.ok());
  auto third = c->NewRegion(4096, "c");
  ASSERT_FALSE(third.ok());
  EXPECT_EQ(third.status().code(), Code::kResourceExhausted);
  EXPECT_NE(third.status().message().find("--max-regions-total"), std::string::npos);
  a->reset();
  auto big = c->NewRegion(3 << 20, "d");
  ASSERT_FALSE(big.ok());
  EXPECT_NE(big.status().message().find("--max-region-mb-total"), std::string::npos);
  EXPECT_TRUE(c->NewRegion(2 << 20, "d").ok());
}

TEST_F(RegionsTest, OnlyWorkersOfTheBrokersHostTakeJobsOnRegions) {
  ASSERT_TRUE(StartBroker({"--unmatched-grace-ms", "300"})) << Log();
  AddWorker();  // no local directory: elsewhere, as far as the broker knows
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  auto region = c->NewRegion(4096);
  ASSERT_TRUE(region.ok());
  auto res = c->Wait(*c->Submit(RegionJob({(*region)->Out(0, 16)})));
  ASSERT_TRUE(res.ok());
  EXPECT_EQ(res->state, JobState::kFailed);
  EXPECT_EQ(res->code, Code::kUnavailable);
  EXPECT_TRUE(c->Wait(*c->Submit(Job("k", "a")))->ok());
}

}  // namespace
}  // namespace gpuq::testing
