// The broker's timers driven by a clock the test holds: gpuqd's Broker in
// this process with a ManualClock (util/clock.h), real sockets, a real store
// and raw workers the test drives. Time passes only when the test advances
// it; the test then waits for the broker's loop to act on it, never for time
// to pass.
#include <gtest/gtest.h>

#include <map>
#include <optional>
#include <nlohmann/json.hpp>

#include <thread>

#include "broker/broker.h"
#include "tests/broker_fixture.h"
#include "tests/manual_clock.h"

namespace gpuq {
namespace {

using schema::BrokerOp;
using schema::JobState;
using testing::kKernels;
using testing::ManualClock;
using testing::RawWorker;

class ClockBrokerTest : public ::testing::Test {
 protected:
  void Start(std::function<void(broker::BrokerOptions&)> configure = {}) {
    broker::BrokerOptions o;
    o.client_endpoint = "ipc://" + dir_.File("client.sock");
    o.worker_endpoint = "ipc://" + dir_.File("workers.sock");
    o.store_path = dir_.File("jobs.db");
    o.compile.cache_path = dir_.File("kernels.db");
    o.compile.helper_path = testing::BinPath("gpuq-nvrtc");
    o.compile.max_concurrent = 1;
    // Long intervals of the test's time: nothing happens unless advanced.
    o.heartbeat = std::chrono::seconds(10);
    o.clock = &clock_;
    if (configure) configure(o);
    auto b = broker::Broker::Create(o);
    ASSERT_TRUE(b.ok()) << b.status().ToString();
    broker_ = std::move(*b);
    thread_ = std::thread([this] { (void)broker_->Run(); });
    ClientOptions co;
    co.timeout = Millis(10000);
    auto c = Client::Connect(broker_->client_endpoint(), co);
    ASSERT_TRUE(c.ok());
    client_ = std::move(*c);
  }
  void TearDown() override {
    client_.reset();
    if (broker_) broker_->Stop();
    if (thread_.joinable()) thread_.join();
  }

  JobRequest Job(std::string placement_gpu = "", std::string placement_arch = "") {
    JobRequest j;
    j.spec.kernel.source = kKernels;
    j.spec.kernel.entry = "k";
    j.spec.args = {schema::Arg::Out(16)};
    j.spec.placement.gpu = std::move(placement_gpu);
    j.spec.placement.arch = std::move(placement_arch);
    return j;
  }

  // Polls the job's status (the broker acts within one turn of its loop).
  JobResult WaitFor(uint64_t id, std::function<bool(const JobResult&)> done) {
    JobResult last;
    for (int i = 0; i < 1000; ++i) {
      auto st = client_->GetStatus(id);
      if (st.ok()) {
        last = *st;
        if (done(last)) return last;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return last;
  }
  // Returns once the broker's loop has run its timers after this call: a
  // request is answered within the turn that takes it, before its timers,
  // so the second of two answers comes after a turn's timers.
  void Settle() {
    ASSERT_TRUE(client_->Stats().ok());
    ASSERT_TRUE(client_->Stats().ok());
  }
  // Returns once the broker has taken the worker's latest heartbeat: the
  // clock stands still, so its age reads 0 from then until the next advance.
  // (Heartbeats travel on their own connection: only this orders them with
  // the test's next advance.)
  void WaitHeard(const std::string& uuid) {
    for (int i = 0; i < 1000; ++i) {
      auto d = client_->Devices();
      if (d.ok()) {
        for (const auto& v : *d) {
          if (v.device.uuid == uuid && v.heartbeat_age_ms == 0) return;
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    ADD_FAILURE() << "the broker did not take " << uuid << "'s heartbeat";
  }
  // Job `id` of raw worker `w` ends with `timeout`, and `w` is given up.
  void ExpectTimedOutAndGivenUp(uint64_t id, RawWorker& w) {
    JobResult r = WaitEnded(id);
    EXPECT_EQ(r.state, JobState::kFailed);
    EXPECT_EQ(r.code, Code::kTimeout) << r.error;
    auto bye = w.Receive();
    ASSERT_TRUE(bye);
    EXPECT_EQ(bye->header.op, BrokerOp::kDisconnect);
  }
  // Starts the broker (no job fails for want of a worker), and a job with
  // `deadline_ms` that `silent`, a raw worker, takes and then says nothing
  // of. The job's id, or none where that went wrong.
  std::optional<uint64_t> DispatchedWithDeadline(uint64_t deadline_ms,
                                                 std::unique_ptr<RawWorker>* silent) {
    Start([](broker::BrokerOptions& o) { o.unmatched_grace = std::chrono::hours(1); });
    *silent = Worker("sm_90", "GPU-silent");
    JobRequest j = Job();
    j.spec.deadline_ms = deadline_ms;
    auto id = client_->Submit(j);
    auto job = (*silent)->Receive();
    if (!id.ok() || !job || job->header.op != BrokerOp::kJob || job->header.id != *id) {
      ADD_FAILURE() << "the job did not reach the worker";
      return std::nullopt;
    }
    return *id;
  }
  // Worker `w`, which holds job `id`, leaves (as a lost one, its jobs are
  // requeued), and the broker has taken that. Not by silence: a turn of the
  // broker's loop takes up to 64 client requests before its timers, so
  // requests that follow each other closely may all pass before the loop
  // has judged the silence.
  void Leave(RawWorker& w, uint64_t id) {
    schema::WorkerMessage bye;
    bye.op = schema::WorkerOp::kDisconnect;
    bye.reason = "leaving";
    w.Send(bye);
    const JobResult r =
        WaitFor(id, [](const JobResult& r) { return r.state != JobState::kDispatched; });
    if (r.state == JobState::kDispatched) ADD_FAILURE() << "job " << id << " was not requeued";
  }
  using Running = std::vector<schema::WorkerMessage::Running>;
  JobResult WaitEnded(uint64_t id) {
    return WaitFor(id, [](const JobResult& r) { return schema::IsTerminal(r.state); });
  }
  std::unique_ptr<RawWorker> Worker(const std::string& arch = "sm_90",
                                    const std::string& uuid = "GPU-raw", uint32_t slots = 1) {
    auto w = std::make_unique<RawWorker>(broker_->worker_endpoint());
    w->Ready(arch, slots, uuid);
    // Registered once the broker lists it.
    for (int i = 0; i < 1000; ++i) {
      auto d = client_->Devices();
      if (d.ok()) {
        for (const auto& v : *d) {
          if (v.device.uuid == uuid) return w;
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    ADD_FAILURE() << "worker " << uuid << " did not register";
    return w;
  }

  testing::TempDir dir_;
  ManualClock clock_;
  std::unique_ptr<broker::Broker> broker_;
  std::thread thread_;
  std::unique_ptr<Client> client_;
};

TEST_F(ClockBrokerTest, AJobNotStartedByItsDeadlineExpires) {
  Start();
  JobRequest j = Job();
  j.spec.deadline_ms = 200;
  auto id = client_->Submit(j);
  ASSERT_TRUE(id.ok());
  clock_.Advance(std::chrono::milliseconds(150));
  Settle();
  EXPECT_EQ(client_->GetStatus(*id)->state, JobState::kQueued) << "expired before its deadline";
  clock_.Advance(std::chrono::milliseconds(100));
  JobResult r = WaitEnded(*id);
  EXPECT_EQ(r.state, JobState::kExpired);
  EXPECT_EQ(r.code, Code::kExpired);
  auto fetched = client_->Fetch(*id);
  ASSERT_TRUE(fetched.ok());
  EXPECT_EQ(fetched->code, Code::kExpired) << "the stored result says so too";
}

TEST_F(ClockBrokerTest, AJobNoWorkerMatchesFailsAfterTheGracePeriodOnly) {
  Start([](broker::BrokerOptions& o) { o.unmatched_grace = std::chrono::seconds(60); });
  auto here = Worker("sm_90", "GPU-here");
  auto nowhere = client_->Submit(Job("GPU-nowhere"));
  auto later = client_->Submit(Job("", "sm_80"));
  ASSERT_TRUE(nowhere.ok() && later.ok());
  clock_.Advance(std::chrono::seconds(59));
  auto sm80 = Worker("sm_80", "GPU-later");  // comes within the grace period
  auto job = sm80->Receive();
  ASSERT_TRUE(job && job->header.op == BrokerOp::kJob);
  EXPECT_EQ(job->header.id, *later);
  Settle();
  EXPECT_EQ(client_->GetStatus(*nowhere)->state, JobState::kQueued);
  // Past the grace period, and the check's own period (a twelfth of it).
  clock_.Advance(std::chrono::seconds(7));
  JobResult r = WaitEnded(*nowhere);
  EXPECT_EQ(r.state, JobState::kFailed);
  EXPECT_EQ(r.code, Code::kUnavailable);
  EXPECT_NE(r.error.find("GPU-nowhere"), std::string::npos) << r.error;
}

TEST_F(ClockBrokerTest, ASilentWorkerIsLostAndItsJobRunsElsewhere) {
  Start();
  auto silent = Worker("sm_90", "GPU-silent");
  auto id = client_->Submit(Job());
  ASSERT_TRUE(id.ok());
  auto job = silent->Receive();
  ASSERT_TRUE(job && job->header.op == BrokerOp::kJob);
  // Its Receive sent a heartbeat just before the job came: taken after the
  // advance below, it would count as heard then (it failed so once in CI).
  // It is on the broker's side well within this, and the loop takes it
  // before the stats requests that follow.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  Settle();
  // Three heartbeat intervals (30 s here) and a little: the worker said
  // nothing since its last heartbeat.
  clock_.Advance(std::chrono::seconds(31));
  auto other = Worker("sm_90", "GPU-other");
  auto again = other->Receive();
  ASSERT_TRUE(again && again->header.op == BrokerOp::kJob) << "the job was not requeued";
  EXPECT_EQ(again->header.id, *id);
  EXPECT_GT(again->header.attempt, job->header.attempt);
  other->Done(*again);
  JobResult r = WaitEnded(*id);
  EXPECT_EQ(r.state, JobState::kDone);
  EXPECT_EQ(r.attempts, 2u);
}

// A job whose deadline passed while it was away on a worker that was then
// lost (here it leaves) is queued again, not started: its deadline holds. It ran later,
// whenever a worker came, once the deadline had let it go.
TEST_F(ClockBrokerTest, AJobRequeuedPastItsDeadlineExpires) {
  std::unique_ptr<RawWorker> silent;
  auto id = DispatchedWithDeadline(5000, &silent);
  ASSERT_TRUE(id.has_value());
  clock_.Advance(std::chrono::seconds(6));  // past the deadline, dispatched
  // The loop turns every 20 ms when nothing comes: its timers have seen the
  // deadline pass (and let the job's entry go) before the worker leaves.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(client_->GetStatus(*id)->state, JobState::kDispatched);
  Leave(*silent, *id);
  clock_.Advance(std::chrono::milliseconds(10));
  JobResult r = WaitEnded(*id);
  EXPECT_EQ(r.state, JobState::kExpired) << r.error;
  auto other = Worker("sm_90", "GPU-other");
  Settle();
  EXPECT_FALSE(other->Receive(std::chrono::milliseconds(200))) << "it ran past its deadline";
}

// A job requeued before its deadline has two entries for it in the
// deadline heap (Requeue's and its first): it expires once, and is counted
// once.
TEST_F(ClockBrokerTest, AJobRequeuedBeforeItsDeadlineExpiresOnce) {
  std::unique_ptr<RawWorker> silent;
  auto id = DispatchedWithDeadline(300000, &silent);
  ASSERT_TRUE(id.has_value());
  Leave(*silent, *id);
  EXPECT_EQ(client_->GetStatus(*id)->state, JobState::kQueued);
  clock_.Advance(std::chrono::seconds(300));  // past the deadline, queued
  JobResult r = WaitEnded(*id);
  EXPECT_EQ(r.state, JobState::kExpired) << r.error;
  Settle();
  auto stats = client_->Stats();
  ASSERT_TRUE(stats.ok());
  const auto s = nlohmann::json::from_msgpack(*stats);
  EXPECT_EQ(s["finished"], nlohmann::json({{"expired", 1}})) << s.dump();
}

// A job whose worker is lost leaves its tenant charged with what its
// dispatch estimated, not with the time it was stuck: that tenant's jobs
// keep their turns among another tenant's.
TEST_F(ClockBrokerTest, ALostWorkersTimeIsNotChargedToTheTenant) {
  Start();
  std::map<uint64_t, std::string> tenant_of;
  for (int i = 0; i < 8; ++i) {
    JobRequest j = Job();
    j.spec.tenant = i < 4 ? "a" : "b";
    auto id = client_->Submit(j);
    ASSERT_TRUE(id.ok());
    tenant_of[*id] = j.spec.tenant;
  }
  auto silent = Worker("sm_90", "GPU-silent");
  auto first = silent->Receive();
  ASSERT_TRUE(first && first->header.op == BrokerOp::kJob);
  EXPECT_EQ(tenant_of[first->header.id], "a") << "ties go in name order";
  clock_.Advance(std::chrono::seconds(31));  // the worker is lost, the job requeued
  auto other = Worker("sm_90", "GPU-other");
  std::string order;
  for (int i = 0; i < 4; ++i) {
    auto job = other->Receive();
    ASSERT_TRUE(job && job->header.op == BrokerOp::kJob) << "after " << order;
    order += tenant_of[job->header.id];
    clock_.Advance(std::chrono::milliseconds(10));  // each held its GPU 10 ms
    other->Done(*job);
  }
  // Charged the 31 s, tenant a would wait until b's queue is empty: "bbbb".
  EXPECT_NE(order.find('a'), std::string::npos) << order;
  EXPECT_NE(order.find('b'), std::string::npos) << order;
}

TEST_F(ClockBrokerTest, TheBrokerEndsAJobPastItsLimitAndLosesItsWorker) {
  Start();
  auto w = Worker();
  JobRequest j = Job();
  j.spec.time_limit_ms = 1000;
  auto id = client_->Submit(j);
  ASSERT_TRUE(id.ok());
  auto job = w->Receive();
  ASSERT_TRUE(job && job->header.op == BrokerOp::kJob);
  // Past the limit, and past the grace (3 heartbeats) the worker has to
  // end it itself; its heartbeats go on meanwhile.
  clock_.Advance(std::chrono::seconds(20));
  w->Heartbeat();
  WaitHeard("GPU-raw");
  clock_.Advance(std::chrono::seconds(12));
  w->Heartbeat();
  ExpectTimedOutAndGivenUp(*id, *w);
}

// A worker that holds more jobs than it runs at once (slots over streams)
// begins a job when another ends. Measured from the dispatch, a job that
// waited there longer than its limit was "past" it: its healthy worker was
// given up, and every job it held ran again. A worker that names the jobs it
// has begun has each limit counted from there.
TEST_F(ClockBrokerTest, AJobThatWaitedInItsWorkerHasItsLimitCountedFromItsBeginning) {
  Start();  // heartbeats 10 s: the grace past a limit is 30 s
  auto w = Worker("sm_90", "GPU-raw", /*slots=*/2);
  JobRequest j = Job();
  j.spec.time_limit_ms = 20000;
  auto a = client_->Submit(j);
  auto b = client_->Submit(j);
  ASSERT_TRUE(a.ok() && b.ok());
  auto ja = w->Receive(), jb = w->Receive();
  ASSERT_TRUE(ja && jb);
  ASSERT_EQ(ja->header.id, *a);
  // a runs for 40 s of its 20 s + 30 s; b waits behind it.
  auto beat = [&](Running running, int seconds) {
    for (int t = 0; t < seconds; t += 20) {
      clock_.Advance(std::chrono::seconds(20));
      w->Heartbeat(running);
      WaitHeard("GPU-raw");
    }
  };
  // A heartbeat that names a job begun, taken before the clock moves on
  // (the clock moves first, so that WaitHeard waits for this very one).
  auto begin = [&](Running running) {
    clock_.Advance(std::chrono::milliseconds(1));
    w->Heartbeat(running);
    WaitHeard("GPU-raw");
  };
  begin(Running{{*a, ja->header.attempt}});
  beat(Running{{*a, ja->header.attempt}}, 40);
  w->Done(*ja);
  ASSERT_EQ(WaitEnded(*a).state, JobState::kDone);
  // b begins at 40 s and runs 40 s: 80 s after its dispatch.
  begin(Running{{*b, jb->header.attempt}});
  beat(Running{{*b, jb->header.attempt}}, 40);
  Settle();
  auto st = client_->GetStatus(*b);
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->state, JobState::kDispatched) << CodeName(st->code) << ": " << st->error;
  w->Done(*jb);
  JobResult rb = WaitEnded(*b);
  EXPECT_EQ(rb.state, JobState::kDone) << rb.error;
  EXPECT_EQ(rb.attempts, 1u);
  // A begun job past its limit and the grace still ends, and its worker
  // is given up.
  auto c = client_->Submit(j);
  ASSERT_TRUE(c.ok());
  auto jc = w->Receive();
  ASSERT_TRUE(jc && jc->header.id == *c);
  begin(Running{{*c, jc->header.attempt}});
  beat(Running{{*c, jc->header.attempt}}, 40);
  EXPECT_EQ(client_->GetStatus(*c)->state, JobState::kDispatched);
  clock_.Advance(std::chrono::seconds(20));  // 60 s since it began
  w->Heartbeat(Running{{*c, jc->header.attempt}});
  ExpectTimedOutAndGivenUp(*c, *w);
}

// A worker that names the jobs it has begun, holds jobs, and begins and ends
// none for longer than the longest limit among them (and the grace) is
// given up; its jobs did not run, and are queued again, not failed.
TEST_F(ClockBrokerTest, AWorkerThatBeginsNoJobItHoldsIsGivenUp) {
  Start();
  auto w = Worker("sm_90", "GPU-raw", /*slots=*/2);
  JobRequest j = Job();
  j.spec.time_limit_ms = 20000;
  auto a = client_->Submit(j);
  ASSERT_TRUE(a.ok());
  auto ja = w->Receive();
  ASSERT_TRUE(ja);
  for (int t = 0; t < 40; t += 20) {
    clock_.Advance(std::chrono::seconds(20));
    w->Heartbeat(Running{});
    WaitHeard("GPU-raw");
  }
  Settle();
  EXPECT_EQ(client_->GetStatus(*a)->state, JobState::kDispatched);
  clock_.Advance(std::chrono::seconds(20));  // 60 s: past 20 s + 30 s
  w->Heartbeat(Running{});
  auto bye = w->Receive();
  ASSERT_TRUE(bye);
  EXPECT_EQ(bye->header.op, BrokerOp::kDisconnect);
  JobResult r = WaitFor(*a, [](const JobResult& r) { return r.state != JobState::kDispatched; });
  EXPECT_EQ(r.state, JobState::kQueued) << CodeName(r.code) << ": " << r.error;
}

TEST_F(ClockBrokerTest, ResultsLiveForTheirRetentionAndIdsAreNeverReused) {
  Start([](broker::BrokerOptions& o) { o.retention = std::chrono::seconds(3600); });
  auto w = Worker();
  auto first = client_->Submit(Job());
  ASSERT_TRUE(first.ok());
  auto job = w->Receive();
  ASSERT_TRUE(job);
  w->Done(*job);
  ASSERT_EQ(WaitEnded(*first).state, JobState::kDone);
  clock_.Advance(std::chrono::seconds(3500));
  EXPECT_TRUE(client_->Fetch(*first).ok()) << "gone before its retention";
  clock_.Advance(std::chrono::seconds(200));
  bool purged = false;
  for (int i = 0; i < 1000 && !purged; ++i) {
    purged = client_->Fetch(*first).status().code() == Code::kNotFound;
    if (!purged) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_TRUE(purged) << "kept past its retention";
  auto second = client_->Submit(Job());
  ASSERT_TRUE(second.ok());
  EXPECT_GT(*second, *first) << "an id was handed out again";
}

}  // namespace
}  // namespace gpuq
