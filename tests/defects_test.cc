// Defects found by using gpuq as its users, third-party client authors and
// attackers would: each test reproduces one with real processes and sockets
// (gpuqd, worker test doubles, raw peers) and holds the fix in place.
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <msgpack.hpp>
#include <nlohmann/json.hpp>
#include <set>
#include <sqlite3.h>
#include <thread>
#include <zmq_addon.hpp>

#include "broker/job_table.h"
#include "tests/broker_fixture.h"

namespace gpuq {
namespace {

using schema::Arg;
using schema::BrokerOp;
using schema::ClientOp;
using schema::JobState;
using schema::ReplyOp;
using testing::BrokerTest;
using testing::RawClient;
using testing::RawWorker;

schema::ClientRequest About(ClientOp op, uint64_t rid, uint64_t id) {
  schema::ClientRequest r;
  r.op = op;
  r.rid = rid;
  r.id = id;
  return r;
}

// Polls the job's status until it has ended (through a client of its own).
JobResult WaitEnded(Client& c, uint64_t id, Millis timeout = Millis(10000)) {
  const auto until = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    auto st = c.GetStatus(id);
    if (st.ok() && schema::IsTerminal(st->state)) return *st;
    if (std::chrono::steady_clock::now() > until) {
      JobResult none;
      none.error = st.ok() ? "still " + std::string(schema::JobStateName(st->state))
                           : st.status().ToString();
      return none;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

// Drains what `raw` receives for `window`; true if a result for `id` came.
bool HearsResultFor(RawClient& raw, uint64_t id, Millis window) {
  const auto until = std::chrono::steady_clock::now() + window;
  while (std::chrono::steady_clock::now() < until) {
    auto r = raw.Receive(Millis(50));
    if (r && r->header.op == ReplyOp::kResult && r->header.id == id) return true;
  }
  return false;
}

// ------------------------------------------------------------ wrong data or tenant

TEST_F(BrokerTest, AfterARestartAResultIsPushedToNoOne) {
  uint64_t id = 0;
  {
    RawClient submitter(broker_->client_endpoint());
    submitter.Send(SubmitRequest(1), {"submitter's bytes"});
    auto accepted = submitter.Receive();
    ASSERT_TRUE(accepted && accepted->header.op == ReplyOp::kAccepted);
    id = accepted->header.id;
  }
  broker_->Kill();
  ASSERT_TRUE(StartBroker()) << Log();
  // The first connection of the new broker: the one a stored routing id
  // would now name.
  RawClient stranger(broker_->client_endpoint());
  stranger.Send(About(ClientOp::kStats, 5, 0));
  ASSERT_TRUE(stranger.Receive());
  AddWorker();
  auto c = Connect();
  EXPECT_EQ(WaitEnded(*c, id).state, JobState::kDone);
  EXPECT_FALSE(HearsResultFor(stranger, id, Millis(300)))
      << "a job submitted before the restart was pushed to a new connection";
}

TEST_F(BrokerTest, AResultIsNotPushedToAConnectionThatTookTheSubmittersIdentity) {
  uint64_t id = 0;
  {
    RawClient submitter(broker_->client_endpoint(), "chosen-identity");
    submitter.Send(SubmitRequest(1), {"submitter's bytes"});
    auto accepted = submitter.Receive();
    ASSERT_TRUE(accepted && accepted->header.op == ReplyOp::kAccepted);
    id = accepted->header.id;
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // the broker sees it go
  RawClient impostor(broker_->client_endpoint(), "chosen-identity");
  impostor.Send(About(ClientOp::kStats, 5, 0));
  ASSERT_TRUE(impostor.Receive()) << "the identity is free again: the impostor holds it";
  AddWorker();
  auto c = Connect();
  EXPECT_EQ(WaitEnded(*c, id).state, JobState::kDone);
  EXPECT_FALSE(HearsResultFor(impostor, id, Millis(300)))
      << "the result went to another connection of the same identity";
}

TEST_F(BrokerTest, JobIdsAreNeverReusedAfterResultsArePurged) {
  ASSERT_TRUE(StartBroker({"--retention-s", "1"})) << Log();
  AddWorker();
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  auto purged = [&](uint64_t id) {
    for (int i = 0; i < 100; ++i) {
      if (c->Fetch(id).status().code() == Code::kNotFound) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return false;
  };
  auto first = c->Submit(Job("k", "a"));
  ASSERT_TRUE(first.ok());
  ASSERT_TRUE(c->Wait(*first).ok());
  ASSERT_TRUE(purged(*first));
  auto second = c->Submit(Job("k", "b"));
  ASSERT_TRUE(second.ok());
  EXPECT_GT(*second, *first) << "an id was handed out again after its job was purged";
  ASSERT_TRUE(c->Wait(*second).ok());
  ASSERT_TRUE(purged(*second));
  ASSERT_TRUE(StartBroker()) << Log();
  auto c2 = Connect();
  auto third = c2->Submit(Job("k", "c"));
  ASSERT_TRUE(third.ok());
  EXPECT_GT(*third, *second) << "an id was handed out again after a restart";
}

TEST_F(BrokerTest, AStaleResultChangesNothing) {
  ASSERT_TRUE(StartBroker({"--heartbeat-ms", "1000"})) << Log();
  RawWorker w(broker_->worker_endpoint());
  w.Ready("sm_90", /*slots=*/1);
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  auto first = c->Submit(Job("k", "1"));
  auto second = c->Submit(Job("k", "2"));
  ASSERT_TRUE(first.ok() && second.ok());
  auto job = w.Receive();
  ASSERT_TRUE(job && job->header.op == BrokerOp::kJob);
  ASSERT_EQ(job->header.id, *first);
  // A result for another attempt of the job it holds.
  RawWorker::Message stale = *job;
  stale.header.attempt += 7;
  w.Done(stale);
  auto next = w.Receive(Millis(500));
  EXPECT_FALSE(next && next->header.op == BrokerOp::kJob)
      << "the stale result freed the worker's only slot";
  // The worker leaves: the job it really holds is requeued and runs elsewhere.
  schema::WorkerMessage bye;
  bye.op = schema::WorkerOp::kDisconnect;
  bye.reason = "leaving";
  w.Send(bye);
  AddWorker();
  JobResult r = WaitEnded(*c, *first);
  EXPECT_EQ(r.state, JobState::kDone) << r.error;
  EXPECT_EQ(WaitEnded(*c, *second).state, JobState::kDone);
}

TEST_F(BrokerTest, AttemptNumbersIncreaseAcrossBrokerRestarts) {
  ASSERT_TRUE(StartBroker({"--heartbeat-ms", "1000"})) << Log();
  RawWorker w(broker_->worker_endpoint());
  w.Ready();
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  auto id = c->Submit(Job("k", "x"));
  ASSERT_TRUE(id.ok());
  auto before = w.Receive();
  ASSERT_TRUE(before && before->header.op == BrokerOp::kJob);
  broker_->Kill();
  ASSERT_TRUE(StartBroker()) << Log();
  // The worker registers with the new broker, which resumes the job.
  std::optional<RawWorker::Message> after;
  for (int i = 0; i < 20 && !(after && after->header.op == BrokerOp::kJob); ++i) {
    w.Ready();
    after = w.Receive(Millis(500));
  }
  ASSERT_TRUE(after && after->header.op == BrokerOp::kJob);
  ASSERT_EQ(after->header.id, *id);
  EXPECT_GT(after->header.attempt, before->header.attempt)
      << "a result of the attempt before the restart would pass for this one";
}

// The dispatch count the store holds, read as another process would.
int64_t StoredAttempts(const std::string& store, uint64_t id) {
  sqlite3* db = nullptr;
  int64_t n = -1;
  if (sqlite3_open_v2(store.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK) {
    sqlite3_stmt* st = nullptr;
    if (sqlite3_prepare_v2(db, "SELECT attempts FROM jobs WHERE id = ?", -1, &st, nullptr) ==
        SQLITE_OK) {
      sqlite3_bind_int64(st, 1, static_cast<int64_t>(id));
      if (sqlite3_step(st) == SQLITE_ROW) n = sqlite3_column_int64(st, 0);
    }
    sqlite3_finalize(st);
  }
  sqlite3_close(db);
  return n;
}

// A job requeued when its worker leaves is dispatched again only once the
// store counts the lost attempt: otherwise a crash right after could give
// the next broker's first dispatch the number the second one had.
TEST_F(BrokerTest, AJobRunsAgainOnlyOnceTheStoreCountsItsLostAttempt) {
  ASSERT_TRUE(StartBroker({"--heartbeat-ms", "1000"})) << Log();
  RawWorker first(broker_->worker_endpoint());
  first.Ready("sm_90", 1, "GPU-first");
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  auto id = c->Submit(Job("k", "x"));
  ASSERT_TRUE(id.ok());
  auto one = first.Receive();
  ASSERT_TRUE(one && one->header.op == BrokerOp::kJob);
  RawWorker second(broker_->worker_endpoint());
  second.Ready("sm_90", 1, "GPU-second");
  ASSERT_TRUE(WaitForWorkers(*c, 2));
  schema::WorkerMessage bye;
  bye.op = schema::WorkerOp::kDisconnect;
  bye.reason = "leaving";
  first.Send(bye);
  auto two = second.Receive();
  ASSERT_TRUE(two && two->header.op == BrokerOp::kJob);
  ASSERT_EQ(two->header.id, *id);
  EXPECT_GE(StoredAttempts(broker_->store(), *id), 1)
      << "dispatched again before the store counted the lost attempt";
  // And after a crash, the next dispatch's number is above both.
  broker_->Kill();
  ASSERT_TRUE(StartBroker()) << Log();
  std::optional<RawWorker::Message> three;
  for (int i = 0; i < 20 && !(three && three->header.op == BrokerOp::kJob); ++i) {
    second.Ready("sm_90", 1, "GPU-second");
    three = second.Receive(Millis(500));
  }
  ASSERT_TRUE(three && three->header.op == BrokerOp::kJob);
  EXPECT_GT(three->header.attempt, two->header.attempt);
}

// A worker that registers again on its connection lost touch with the
// broker; its process lives on: the suspect job it ran alone is not the
// culprit, and runs again.
TEST_F(BrokerTest, AWorkerThatRegistersAgainConvictsNoJob) {
  ASSERT_TRUE(StartBroker({"--heartbeat-ms", "1000"})) << Log();
  auto c = Connect();
  RawWorker shared(broker_->worker_endpoint());
  shared.Ready("sm_90", 2, "GPU-shared");
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  auto a = c->Submit(Job("k", "a"));
  auto b = c->Submit(Job("k", "b"));
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(shared.Receive());
  ASSERT_TRUE(shared.Receive());
  // It dies with both: both are suspects, each to run alone.
  schema::WorkerMessage bye;
  bye.op = schema::WorkerOp::kDisconnect;
  bye.reason = "gone";
  shared.Send(bye);
  RawWorker w(broker_->worker_endpoint());
  w.Ready("sm_90", 1, "GPU-alone");
  auto alone = w.Receive();
  ASSERT_TRUE(alone && alone->header.op == BrokerOp::kJob);
  // It registers again while running it: both run again, one at a time.
  w.Ready("sm_90", 1, "GPU-alone");
  for (int i = 0; i < 2; ++i) {
    auto m = w.Receive(Millis(3000));
    ASSERT_TRUE(m && m->header.op == BrokerOp::kJob) << "a job was not sent again";
    w.Done(*m);
  }
  for (uint64_t id : {*a, *b}) {
    JobResult r = WaitEnded(*c, id);
    EXPECT_EQ(r.state, JobState::kDone) << id << ": " << r.error;
  }
}

TEST_F(BrokerTest, AResultWithoutEveryOutputIsRefused) {
  Taken t = TakeOneJob("abc");
  ASSERT_TRUE(t.job);
  t.worker->Done(*t.job, 'r', /*drop=*/1);  // the out buffer is missing
  auto refused = t.worker->Receive(Millis(2000));
  ASSERT_TRUE(refused);
  EXPECT_EQ(refused->header.op, BrokerOp::kError);
  JobResult r = WaitEnded(*t.client, t.id);
  EXPECT_EQ(r.state, JobState::kFailed) << "done without its buffers";
  EXPECT_EQ(r.code, Code::kInternal);
  EXPECT_NE(r.error.find("output"), std::string::npos) << r.error;
}

TEST_F(BrokerTest, AFailedResultCarriesNoOutputs) {
  // A worker whose copy back failed half way sent the outputs it had: bytes
  // of a failed job, unchecked against the job's arguments, were served as
  // its result. A failed result is its code and error only.
  Taken t = TakeOneJob("abc");
  ASSERT_TRUE(t.job);
  schema::WorkerMessage r;
  r.op = schema::WorkerOp::kResult;
  r.id = t.job->header.id;
  r.attempt = t.job->header.attempt;
  r.state = JobState::kFailed;
  r.code = Code::kLaunchError;
  r.error = "copying outputs from the device: failed";
  r.outputs = {0, 1};  // argument 1 is a scalar: not an output at all
  t.worker->Send(r, {"half", "junk"});
  // Pushed as it ends, and fetched from the store after.
  for (bool fetch : {false, true}) {
    auto got = fetch ? t.client->Fetch(t.id) : t.client->Wait(t.id, Millis(10000));
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    EXPECT_EQ(got->state, JobState::kFailed);
    EXPECT_EQ(got->code, Code::kLaunchError);
    EXPECT_EQ(got->error, r.error);
    EXPECT_TRUE(got->outputs.empty()) << got->outputs.size() << " outputs of a failed job";
    EXPECT_TRUE(got->output_args.empty());
    EXPECT_EQ(got->Output(0), nullptr);
  }
}

TEST_F(BrokerTest, JobsWaitingInTheirWorkerBehindOthersAreNotPastTheirLimits) {
  // A worker holding 12 jobs of 300 ms and running one at a time: the last
  // begins 3.3 s after its dispatch, past its 500 ms limit and the 1.5 s
  // grace if counted from there (the worker was given up, and its jobs ran
  // again). Counted from each job's beginning, none is past its limit.
  // Heartbeats of 500 ms: under ThreadSanitizer, 200 ms ones were missed.
  ASSERT_TRUE(StartBroker({"--heartbeat-ms", "500"})) << Log();
  AddWorker({"--streams", "1", "--slots", "12", "--heartbeat-ms", "500"});
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  std::vector<uint64_t> ids;
  for (int i = 0; i < 12; ++i) {
    JobRequest j = Job("ms300", "abc", 16);
    j.spec.kernel.source =
        "extern \"C\" __global__ void ms300(unsigned char* a, unsigned char* b) {}\n";
    j.spec.time_limit_ms = 500;
    auto id = c->Submit(j);
    ASSERT_TRUE(id.ok()) << id.status().ToString();
    ids.push_back(*id);
  }
  for (uint64_t id : ids) {
    auto r = c->Wait(id, Millis(30000));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->state, JobState::kDone) << CodeName(r->code) << ": " << r->error;
    EXPECT_EQ(r->attempts, 1u) << "job " << id << " ran again: its worker was given up";
  }
}

// Each region holds a descriptor, and the bounds on regions and
// connections allow more than 1024 of them, a shell's or a service
// manager's usual soft limit: gpuqd raises its soft limit to the hard one.
TEST_F(BrokerTest, GpuqdRaisesItsDescriptorLimitToTheHardOne) {
  rlimit old{};
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &old), 0);
  if (old.rlim_max <= 256) GTEST_SKIP() << "hard descriptor limit " << old.rlim_max;
  rlimit low = old;
  low.rlim_cur = 256;  // inherited by the broker forked below
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &low), 0);
  const bool started = StartBroker({"--heartbeat-ms", "1000"});
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &old), 0);
  ASSERT_TRUE(started) << Log();
  std::ifstream limits("/proc/" + std::to_string(broker_->process().pid()) + "/limits");
  std::string line;
  uint64_t soft = 0;
  while (std::getline(limits, line)) {
    if (line.rfind("Max open files", 0) == 0) soft = std::stoull(line.substr(26));
  }
  EXPECT_EQ(soft, old.rlim_max);
}

TEST_F(BrokerTest, AFetchInTheSameIterationAsTheResultSeesIt) {
  ASSERT_TRUE(StartBroker({"--heartbeat-ms", "1000"})) << Log();
  RawWorker w(broker_->worker_endpoint());
  w.Ready();
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  constexpr uint64_t kOut = 26 * 1024;  // kept in the store's output log
  auto id = c->Submit(Job("k", "x", kOut));
  ASSERT_TRUE(id.ok());
  auto job = w.Receive();
  ASSERT_TRUE(job && job->header.op == BrokerOp::kJob);
  RawClient fetcher(broker_->client_endpoint());
  fetcher.Send(About(ClientOp::kStats, 1, 0));
  ASSERT_TRUE(fetcher.Receive());
  // The result and the requests wait together while the broker is stopped,
  // and are taken in one iteration of its loop.
  broker_->process().Signal(SIGSTOP);
  w.Done(*job, 'r');
  for (uint64_t rid = 10; rid < 20; rid += 2) {
    fetcher.Send(About(ClientOp::kResult, rid, *id));
    fetcher.Send(About(ClientOp::kStatus, rid + 1, *id));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  broker_->process().Signal(SIGCONT);
  for (int i = 0; i < 10; ++i) {
    auto r = fetcher.Receive();
    ASSERT_TRUE(r);
    const auto& h = r->header;
    if (h.rid % 2 == 0) {
      ASSERT_NE(h.op, ReplyOp::kError) << h.error;
      if (h.op != ReplyOp::kResult) continue;  // answered before the result came
      EXPECT_EQ(h.state, JobState::kDone);
      ASSERT_EQ(r->payload.size(), 2u);
      EXPECT_EQ(r->payload[1], std::string(kOut, 'r'));
    } else {
      ASSERT_EQ(h.op, ReplyOp::kStatus) << h.error;
      if (h.state == JobState::kDone) {
        EXPECT_FALSE(h.device.empty());
      }
    }
  }
}

// ------------------------------------------------------------ stops and hangs

// Sets the largest file gpuqd may write (RLIMIT_FSIZE): past it, writes fail
// as they would on a full disk.
void LimitFileSize(pid_t pid, rlim_t bytes) {
  struct rlimit lim {bytes, RLIM_INFINITY};
  ASSERT_EQ(prlimit(pid, RLIMIT_FSIZE, &lim, nullptr), 0) << strerror(errno);
}

uint64_t LargestFile(const std::string& dir) {
  uint64_t most = 0;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir)) {
    if (e.is_regular_file()) most = std::max<uint64_t>(most, e.file_size());
  }
  return most;
}

TEST_F(BrokerTest, AFullDiskRefusesSubmitsKeepsEveryJobAndRecovers) {
  auto c = Connect();
  std::vector<uint64_t> acked;
  for (int i = 0; i < 3; ++i) acked.push_back(*c->Submit(Job("k", std::string(4096, 'a' + i))));
  const uint64_t limit = LargestFile(dir_.path()) + 64 * 1024;
  LimitFileSize(broker_->process().pid(), limit);
  // Pipelined submits, each too large for what the disk has left.
  ClientOptions o;
  o.local_buffers = false;
  auto p = Client::Connect(broker_->client_endpoint(), o);
  ASSERT_TRUE(p.ok());
  const std::string big(limit + 4096, 'b');
  std::set<uint64_t> rids;
  for (int i = 0; i < 4; ++i) rids.insert(*(*p)->SubmitAsync(Job("k", big)));
  for (size_t i = 0; i < rids.size(); ++i) {
    auto e = (*p)->Poll(Millis(5000));
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    ASSERT_EQ(e->kind, Client::Event::kRejected) << "accepted with no room to store it";
    EXPECT_TRUE(rids.count(e->rid)) << "the error does not name its request";
    EXPECT_TRUE(e->error.code() == Code::kResourceExhausted ||
                e->error.code() == Code::kIoError)
        << e->error.ToString();
    EXPECT_GT(e->retry_after_ms, 0u);
  }
  // A result that cannot be stored is not lost: the job finishes once the
  // disk has room again.
  AddWorker();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  auto large_out = (*p)->Submit(Job("k", "x", 16));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  ASSERT_TRUE(broker_->process().running()) << Log();
  LimitFileSize(broker_->process().pid(), RLIM_INFINITY);
  // Refused (resource_exhausted, "try again later") until the store's retry
  // of the writes it could not make has committed: as a client does, ask
  // again (on a loaded machine the first submit can come before that).
  StatusOr<uint64_t> fine = c->Submit(Job("k", big));
  for (int i = 0; i < 100 && !fine.ok() && fine.status().code() == Code::kResourceExhausted; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    fine = c->Submit(Job("k", big));
  }
  ASSERT_TRUE(fine.ok()) << fine.status().ToString();
  acked.push_back(*fine);
  if (large_out.ok()) acked.push_back(*large_out);
  for (uint64_t id : acked) {
    JobResult r = WaitEnded(*c, id);
    EXPECT_EQ(r.state, JobState::kDone) << id << ": " << r.error;
  }
}

TEST_F(BrokerTest, ADamagedJobIsQuarantinedAndTheBrokerStarts) {
  ClientOptions o;
  o.local_buffers = false;
  auto c = Client::Connect(broker_->client_endpoint(), o);
  ASSERT_TRUE(c.ok());
  auto damaged = (*c)->Submit(Job("k", std::string(256 * 1024, 'd')));  // a file of its own
  auto intact = (*c)->Submit(Job("k", "intact"));
  ASSERT_TRUE(damaged.ok() && intact.ok());
  ASSERT_EQ(broker_->Stop(), 0);
  const std::string blob = LocalDir() + "/j" + std::to_string(*damaged) + ".i0";
  ASSERT_TRUE(std::filesystem::remove(blob)) << blob;
  testing::WriteFile(dir_.File("kernels.db"), "not a SQLite file at all, only a cache");
  ASSERT_TRUE(StartBroker()) << Log();
  EXPECT_NE(Log().find("quarantine"), std::string::npos);
  AddWorker();
  auto c2 = Connect();
  JobResult d = WaitEnded(*c2, *damaged);
  EXPECT_EQ(d.state, JobState::kFailed);
  EXPECT_EQ(d.code, Code::kIoError);
  EXPECT_NE(d.error.find("j" + std::to_string(*damaged) + ".i0"), std::string::npos) << d.error;
  JobResult ok = WaitEnded(*c2, *intact);
  EXPECT_EQ(ok.state, JobState::kDone) << ok.error;
  auto stats = nlohmann::json::from_msgpack(*c2->Stats());
  EXPECT_EQ(stats.value("quarantined", 0), 1) << stats.dump();
}

TEST_F(BrokerTest, AFifoNamedAsALocalFileIsRefusedWithoutBlocking) {
  const std::string fifo = LocalDir() + "/c-fifo";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  RawClient raw(broker_->client_endpoint());
  schema::ClientRequest req = SubmitRequest(3);
  req.job.files = {{"c-fifo", 0}};
  raw.Send(req);
  auto r = raw.Receive(Millis(3000));
  ASSERT_TRUE(r) << "the broker blocked opening a FIFO";
  EXPECT_EQ(r->header.code, Code::kInvalid) << r->header.error;
  EXPECT_EQ(r->header.rid, 3u);
}

TEST_F(BrokerTest, AnInputTruncatedAfterSubmitFailsItsJobAlone) {
  const std::string name = "c-truncated";
  const std::string path = LocalDir() + "/" + name;
  constexpr size_t kSize = 4 << 20;
  const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, kSize), 0);
  RawClient raw(broker_->client_endpoint());
  schema::ClientRequest req = SubmitRequest(4);
  req.job.files = {{name, kSize}};
  raw.Send(req);
  auto accepted = raw.Receive();
  ASSERT_TRUE(accepted && accepted->header.op == ReplyOp::kAccepted) << accepted->header.error;
  // The client still holds the file it handed over, and shrinks it.
  ASSERT_EQ(ftruncate(fd, 100), 0);
  close(fd);
  AddWorker();  // not on the broker's host: the broker reads the file for it
  auto c = Connect();
  JobResult r = WaitEnded(*c, accepted->header.id);
  ASSERT_TRUE(broker_->process().running()) << "gpuqd died reading a file a client changed";
  EXPECT_EQ(r.state, JobState::kFailed);
  EXPECT_EQ(r.code, Code::kIoError) << r.error;
  auto next = c->Submit(Job("k", "y"));
  ASSERT_TRUE(next.ok());
  EXPECT_EQ(WaitEnded(*c, *next).state, JobState::kDone);
}

TEST_F(BrokerTest, AJobRunsOnTheArchitectureThatCompilesIt) {
  AddWorker({"--arch", "sm_80", "--uuid", "GPU-a80"});
  AddWorker({"--arch", "sm_90", "--uuid", "GPU-b90"});
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 2));
  std::vector<uint64_t> ids;
  for (int i = 0; i < 4; ++i) {
    JobRequest j = Job("k", "x");
    j.spec.kernel.source = std::string(testing::kKernels) +
                           "#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900\n"
                           "#error this kernel needs sm_90\n#endif\n";
    ids.push_back(*c->Submit(j));
  }
  for (uint64_t id : ids) {
    JobResult r = WaitEnded(*c, id);
    EXPECT_EQ(r.state, JobState::kDone) << r.error;
    EXPECT_EQ(r.device, "GPU-b90");
  }
  // Where no eligible worker's architecture compiles it, it fails.
  JobRequest never = Job("k", "x");
  never.spec.kernel.source = std::string(testing::kKernels) + "#error never\n";
  JobResult r = WaitEnded(*c, *c->Submit(never));
  EXPECT_EQ(r.code, Code::kCompileError);
}

TEST_F(BrokerTest, AWorkerWhoseArchitectureTheToolkitCannotTargetIsRefused) {
  AddWorker({"--arch", "sm_50", "--uuid", "GPU-old"});
  auto c = Connect();
  for (int i = 0; i < 100 && Log().find("GPU-old") == std::string::npos; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_NE(Log().find("sm_50"), std::string::npos) << Log();
  auto d = c->Devices();
  ASSERT_TRUE(d.ok());
  EXPECT_TRUE(d->empty()) << "a worker nothing can be compiled for was registered";
  AddWorker({"--arch", "sm_90"});
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  EXPECT_EQ(WaitEnded(*c, *c->Submit(Job("k", "x"))).state, JobState::kDone);
}

// ------------------------------------------------------------ limits

TEST_F(BrokerTest, TheQueueBoundAdmitsExactlyItsLimit) {
  ASSERT_TRUE(StartBroker({"--max-queued", "100"})) << Log();
  auto c = Connect();
  int accepted = 0;
  for (int i = 0; i < 120; ++i) accepted += c->Submit(Job("k", "x")).ok();
  EXPECT_EQ(accepted, 100);
}

TEST_F(BrokerTest, BoundsCountJobsAcceptedInTheSameIteration) {
  ASSERT_TRUE(StartBroker({"--max-queued-per-tenant", "30", "--max-queued-bytes", "1048576"}))
      << Log();
  RawClient raw(broker_->client_endpoint());
  for (uint64_t rid = 1; rid <= 100; ++rid) raw.Send(SubmitRequest(rid), {"x"});
  int accepted = 0;
  for (int i = 0; i < 100; ++i) {
    auto r = raw.Receive();
    ASSERT_TRUE(r);
    accepted += r->header.op == ReplyOp::kAccepted;
  }
  EXPECT_EQ(accepted, 30) << "the per-tenant bound let pipelined submits through";
  // Bytes: 60 KiB inputs and their spec's texts against a 1 MiB bound, as
  // another tenant.
  const schema::ClientRequest shape = SubmitRequest(1);
  const uint64_t each = 60 * 1024 + broker::SpecTextBytes(shape.job);
  for (uint64_t rid = 101; rid <= 140; ++rid) {
    schema::ClientRequest req = SubmitRequest(rid);
    req.job.tenant = "bytes";
    raw.Send(req, {std::string(60 * 1024, 'b')});
  }
  accepted = 0;
  for (int i = 0; i < 40; ++i) {
    auto r = raw.Receive();
    ASSERT_TRUE(r);
    accepted += r->header.op == ReplyOp::kAccepted;
  }
  // The bound is the broker's too, where the first 30 jobs hold their input
  // byte and their texts.
  const uint64_t first = 30 * (1 + broker::SpecTextBytes(shape.job));
  EXPECT_EQ(accepted, static_cast<int>(((1u << 20) - first) / each)) << "each job holds " << each;
}

// A queued job holds its spec in the broker's memory: its sources and
// headers, up to megabytes each. The byte bounds counted inputs only, so a
// tenant could queue its whole job count of large sources, gigabytes of
// them, past --max-queued-bytes. A spec's texts count now.
TEST_F(BrokerTest, TheByteBoundsCountAJobsSourcesNotOnlyItsInputs) {
  ASSERT_TRUE(StartBroker({"--max-queued-bytes", "1048576"})) << Log();
  RawClient raw(broker_->client_endpoint());
  for (uint64_t rid = 1; rid <= 10; ++rid) {
    schema::ClientRequest req = SubmitRequest(rid);
    req.job.kernel.source += "// " + std::string(200 * 1024, 's') + "\n";
    raw.Send(req, {"x"});
  }
  int accepted = 0;
  std::string refusal;
  for (int i = 0; i < 10; ++i) {
    auto r = raw.Receive();
    ASSERT_TRUE(r);
    if (r->header.op == ReplyOp::kAccepted) {
      ++accepted;
    } else {
      refusal = r->header.error;
      EXPECT_EQ(r->header.code, Code::kQueueFull) << r->header.error;
    }
  }
  EXPECT_EQ(accepted, 5) << "1 MiB holds 5 sources of 200 KiB";
  EXPECT_NE(refusal.find("sources"), std::string::npos) << refusal;
}

uint64_t RssKib(pid_t pid) {
  const std::string status = testing::ReadFile("/proc/" + std::to_string(pid) + "/status");
  const auto at = status.find("VmRSS:");
  return at == std::string::npos ? 0 : std::stoull(status.substr(at + 6));
}

TEST_F(BrokerTest, LocalFileInputsCountAgainstTheByteBoundAndARestartReadsNone) {
  ASSERT_TRUE(StartBroker({"--max-queued-bytes", std::to_string(64u << 20)})) << Log();
  const uint64_t empty_kib = RssKib(broker_->process().pid());
  RawClient raw(broker_->client_endpoint());
  auto submit_file = [&](uint64_t rid, uint64_t size) {
    const std::string name = "c-sparse-" + std::to_string(rid);
    const int fd = open((LocalDir() + "/" + name).c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    EXPECT_GE(fd, 0);
    EXPECT_EQ(ftruncate(fd, static_cast<off_t>(size)), 0);
    close(fd);
    schema::ClientRequest req = SubmitRequest(rid);
    req.job.files = {{name, size}};
    raw.Send(req);
    auto r = raw.Receive();
    EXPECT_TRUE(r);
    return r ? r->header : schema::ClientReply{};
  };
  auto huge = submit_file(1, 3ull << 30);
  EXPECT_EQ(huge.code, Code::kQueueFull) << "a 3 GiB file under a 64 MiB bound";
  EXPECT_FALSE(std::filesystem::exists(LocalDir() + "/c-sparse-1"));
  int accepted = 0;
  for (uint64_t rid = 2; rid < 12; ++rid) accepted += submit_file(rid, 12 << 20).op == ReplyOp::kAccepted;
  EXPECT_EQ(accepted, 5) << "64 MiB holds 5 inputs of 12 MiB";
  // A restart reads no queued input into memory.
  ASSERT_EQ(broker_->Stop(), 0);
  ASSERT_TRUE(StartBroker()) << Log();
  const uint64_t rss_kib = RssKib(broker_->process().pid());
  ASSERT_GT(empty_kib, 0u);
  EXPECT_LT(rss_kib, empty_kib + (30u << 10)) << "60 MiB of queued inputs were read at start";
}

// Options out of their ranges stop gpuqd's start with the option named:
// a heartbeat of 0 ms spun the loop and lost every worker each turn, a
// negative one made the loop's poll wait forever, a negative retention
// purged every result at once, an idle time of 0 ended every session at
// its first look, and a metrics port that was not a number aborted.
TEST_F(BrokerTest, OptionsOutOfTheirRangesStopTheStart) {
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"--heartbeat-ms", "0"},      {"--heartbeat-ms", "-100"},
      {"--retention-s", "-1"},      {"--session-idle-ms", "0"},
      {"--metrics", "127.0.0.1:abc"}, {"--metrics", "127.0.0.1:99999999999"}};
  for (const auto& [option, value] : bad) {
    const size_t before = Log().size();
    EXPECT_FALSE(StartBroker({option, value})) << option << " " << value;
    EXPECT_NE(Log().find(option, before), std::string::npos) << option << " " << value << "\n"
                                                            << Log().substr(before);
  }
  EXPECT_NE(Log().find("with a port of 0 to 65535"), std::string::npos) << Log();
  EXPECT_TRUE(StartBroker({"--heartbeat-ms", "10"})) << Log();
}

// A reload asked (SIGHUP) while gpuqd opens its store, which may wait for
// minutes, ended the process: the handler was set only after the opening.
// Here the store is locked by another connection while the signal comes.
TEST_F(BrokerTest, ASighupDuringTheStartIsAReloadNotAnEnd) {
  testing::TempDir other;
  sqlite3* lock = nullptr;
  ASSERT_EQ(sqlite3_open(other.File("jobs.db").c_str(), &lock), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(lock, "BEGIN EXCLUSIVE", nullptr, nullptr, nullptr), SQLITE_OK);
  const std::string ready = other.File("ready.json");
  testing::Process p = testing::Process::Start(
      {testing::BinPath("gpuqd"), "--listen", "ipc://" + other.File("c.sock"), "--worker-listen",
       "ipc://" + other.File("w.sock"), "--store", other.File("jobs.db"), "--cache",
       other.File("kernels.db"), "--workers", "0", "--ready-file", ready},
      other.File("gpuqd.log"));
  // Signalled once it catches SIGHUP (SigCgt), which the fix makes it do
  // before it opens the store: before it had reached main(), the signal's
  // default would end any program. Without the fix it never does while the
  // store is locked, and the signal comes after 10 s.
  auto catches_hup = [&] {
    std::ifstream status("/proc/" + std::to_string(p.pid()) + "/status");
    for (std::string line; std::getline(status, line);) {
      if (line.rfind("SigCgt:", 0) == 0) return (std::stoull(line.substr(7), nullptr, 16) & 1) != 0;
    }
    return false;
  };
  for (int i = 0; i < 1000 && !catches_hup(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // waiting for the lock
  EXPECT_FALSE(std::filesystem::exists(ready));
  p.Signal(SIGHUP);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  sqlite3_exec(lock, "COMMIT", nullptr, nullptr, nullptr);
  sqlite3_close(lock);
  bool served = false;
  for (int i = 0; i < 1000 && !served && p.running(); ++i) {
    served = std::filesystem::exists(ready);
    if (!served) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_TRUE(served) << testing::ReadFile(other.File("gpuqd.log"));
  EXPECT_TRUE(p.running());
}

// gpuq submit took "f32:2.5x" as 2.5 and "u32:7 " as 7 (sto* stop where
// they can), wrapped a --launch source index of 2^32 to 0, and cast a
// negative, NaN or huge --deadline or --limit to milliseconds (undefined).
// Each is refused, naming what is wrong; what is right still goes.
TEST_F(BrokerTest, GpuqSubmitRefusesNumbersItCannotTakeWhole) {
  testing::TempDir dir;
  testing::WriteFile(dir.File("k.cu"), testing::kKernels);
  const std::vector<std::string> base = {testing::BinPath("gpuq"), "submit", dir.File("k.cu"),
                                         "--broker", broker_->client_endpoint(), "--kernel", "k",
                                         "--out", "16"};
  const std::vector<std::pair<std::vector<std::string>, std::string>> bad = {
      {{"--arg", "f32:2.5x"}, "bad value for f32: 2.5x"},
      {{"--arg", "f64:1e3 "}, "bad value for f64"},
      {{"--arg", "i32:12abc"}, "bad value for i32: 12abc"},
      {{"--arg", "u32: 7"}, "bad value for u32"},
      {{"--arg", "u64:0x10"}, "bad value for u64: 0x10"},
      {{"--deadline", "-1"}, "--deadline"},
      {{"--deadline", "nan"}, "--deadline"},
      {{"--deadline", "1e30"}, "--deadline"},
      {{"--limit", "-0.5"}, "--limit"},
      {{"--limit", "5s"}, "--limit"},
  };
  for (const auto& [extra, says] : bad) {
    std::vector<std::string> argv = base;
    argv.insert(argv.end(), extra.begin(), extra.end());
    std::string out;
    EXPECT_NE(testing::RunProgram(argv, &out, /*with_stderr=*/true), 0) << extra[1];
    EXPECT_NE(out.find(says), std::string::npos) << extra[1] << ": " << out;
  }
  std::string out;
  EXPECT_NE(testing::RunProgram({testing::BinPath("gpuq"), "submit", dir.File("k.cu"), "--broker",
                                 broker_->client_endpoint(), "--out", "16", "--launch",
                                 "4294967296/k:1:1", "--arg", "buf:0"},
                                &out, /*with_stderr=*/true),
            0);
  EXPECT_NE(out.find("--launch is"), std::string::npos) << out;
  std::vector<std::string> good = base;
  good.insert(good.end(), {"--arg", "f32:2.5", "--arg", "i32:-12", "--deadline", "2.5",
                           "--limit", "1e1", "--json"});
  EXPECT_EQ(testing::RunProgram(good, &out), 0) << out;
  EXPECT_NE(out.find("\"id\""), std::string::npos) << out;
}

TEST_F(BrokerTest, DeadlinesAndLimitsAreRangeChecked) {
  auto c = Connect();
  JobRequest j = Job("k", "x");
  j.spec.deadline_ms = ~uint64_t{0} - 5;
  EXPECT_EQ(c->Submit(j).status().code(), Code::kInvalid);
  j = Job("k", "x");
  j.spec.time_limit_ms = ~uint64_t{0};
  EXPECT_EQ(c->Submit(j).status().code(), Code::kInvalid);
}

// ------------------------------------------------------------ protocol

std::string Packed(const std::function<void(msgpack::packer<msgpack::sbuffer>&)>& f) {
  msgpack::sbuffer buf;
  msgpack::packer<msgpack::sbuffer> p(buf);
  f(p);
  return std::string(buf.data(), buf.size());
}

TEST_F(BrokerTest, ErrorsCarryTheRidWheneverItCanBeRead) {
  RawClient raw(broker_->client_endpoint());
  const std::string status = schema::EncodeClientRequest(About(ClientOp::kStatus, 77, 1));
  const std::vector<std::string> bad = {
      status + "\x01",  // trailing bytes
      Packed([](auto& p) {  // an array over the limit
        p.pack_map(3);
        p.pack(std::string("op")), p.pack(std::string("status"));
        p.pack(std::string("rid")), p.pack(uint64_t{77});
        p.pack(std::string("id")), p.pack_array(5000);
        for (int i = 0; i < 5000; ++i) p.pack(0);
      }),
      Packed([](auto& p) {  // bin in a header
        p.pack_map(3);
        p.pack(std::string("rid")), p.pack(uint64_t{77});
        p.pack(std::string("op")), p.pack(std::string("status"));
        p.pack(std::string("id")), p.pack_bin(3), p.pack_bin_body("abc", 3);
      }),
  };
  for (const auto& h : bad) {
    raw.SendFrames({std::string(schema::kClientProtocol), h});
    auto r = raw.Receive();
    ASSERT_TRUE(r);
    EXPECT_EQ(r->header.op, ReplyOp::kError);
    EXPECT_EQ(r->header.rid, 77u) << r->header.error;
  }
  // rid 0 is reserved for pushes.
  raw.Send(About(ClientOp::kStatus, 0, 1));
  auto r = raw.Receive();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->header.op, ReplyOp::kError);
  EXPECT_EQ(r->header.code, Code::kMalformed) << r->header.error;
}

TEST_F(BrokerTest, ErrorCodesAreTheOnesTheSpecificationGives) {
  RawClient raw(broker_->client_endpoint());
  auto code_of = [&](const std::string& header, const std::vector<std::string>& payload = {}) {
    std::vector<std::string> frames = {std::string(schema::kClientProtocol), header};
    frames.insert(frames.end(), payload.begin(), payload.end());
    raw.SendFrames(frames);
    auto r = raw.Receive();
    return r ? r->header.code : Code::kOk;
  };
  // An argument of three elements is malformed, not too large; so is a bin.
  schema::ClientRequest req = SubmitRequest(8);
  nlohmann::json j = nlohmann::json::from_msgpack(schema::EncodeClientRequest(req));
  j["job"]["args"][1].push_back(1);
  std::vector<uint8_t> three = nlohmann::json::to_msgpack(j);
  EXPECT_EQ(code_of(std::string(three.begin(), three.end()), {"x"}), Code::kMalformed);
  EXPECT_EQ(code_of(Packed([](auto& p) {
              p.pack_map(3);
              p.pack(std::string("op")), p.pack(std::string("status"));
              p.pack(std::string("rid")), p.pack(uint64_t{8});
              p.pack(std::string("id")), p.pack_bin(1), p.pack_bin_body("x", 1);
            })),
            Code::kMalformed);
  // An out buffer over the size limit is too large, not invalid.
  req.job.args = {Arg::Out(uint64_t{5} << 30)};
  EXPECT_EQ(code_of(schema::EncodeClientRequest(req)), Code::kTooLarge);
  // A worker announcing no slots is refused.
  RawWorker w(broker_->worker_endpoint());
  w.Ready("sm_90", /*slots=*/0);
  auto answer = w.Receive(Millis(2000));
  ASSERT_TRUE(answer);
  EXPECT_EQ(answer->header.op, BrokerOp::kError);
  EXPECT_EQ(answer->header.code, Code::kInvalid);
}

// A submit that failed after an InputBuffer had let its file go to the
// broker left that file in the local directory for ever: here the file of
// another input cannot be written (a file size limit), and the submit is
// undone. A submit the broker refuses leaves none either.
TEST_F(BrokerTest, AnInputBufferOfASubmitThatFailsLeavesNoFile) {
  const std::string local = broker_->store() + ".blobs";
  auto c = Connect();
  {
    auto buf = c->NewInput(2 << 20);
    ASSERT_TRUE(buf.ok()) << buf.status().ToString();
    const std::string plain(2 << 20, 'p');  // its own file, made for the submit
    JobRequest j = Job("k", "x");
    j.spec.args = {Arg::In(0), Arg::In(1), Arg::Out(16)};
    j.inputs = {(*buf)->view(), plain};
    rlimit before{};
    ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &before), 0);
    rlimit small = before;
    small.rlim_cur = 1 << 20;
    auto xfsz = signal(SIGXFSZ, SIG_IGN);
    ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
    auto id = c->Submit(j);
    setrlimit(RLIMIT_FSIZE, &before);
    signal(SIGXFSZ, xfsz);
    EXPECT_FALSE(id.ok());
    auto another = c->NewInput(2 << 20);
    ASSERT_TRUE(another.ok()) << another.status().ToString();
    j.inputs = {(*another)->view(), "x"};
    j.spec.deadline_ms = ~uint64_t{0} - 5;  // the broker refuses it
    EXPECT_EQ(c->Submit(j).status().code(), Code::kInvalid);
  }
  for (const auto& e : std::filesystem::directory_iterator(local)) {
    EXPECT_NE(e.path().filename().string().rfind("c-", 0), 0u) << e.path();
  }
}

TEST_F(BrokerTest, EveryRefusedSubmitRemovesTheClientsFiles) {
  RawClient raw(broker_->client_endpoint());
  uint64_t rid = 20;
  auto refused_keeps_file = [&](schema::ClientRequest req) {
    const std::string name = "c-refused-" + std::to_string(rid);
    testing::WriteFile(LocalDir() + "/" + name, "1234");
    req.rid = rid++;
    req.job.files = {{name, 4}};
    raw.Send(req);
    auto r = raw.Receive();
    EXPECT_TRUE(r && r->header.op == ReplyOp::kError);
    return std::filesystem::exists(LocalDir() + "/" + name);
  };
  schema::ClientRequest bad_launch = SubmitRequest(0);
  bad_launch.job.launch.block = {2048, 1, 1};
  EXPECT_FALSE(refused_keeps_file(bad_launch)) << "invalid launch";
  schema::ClientRequest bad_option = SubmitRequest(0);
  bad_option.job.kernel.options = {"-I/etc"};
  EXPECT_FALSE(refused_keeps_file(bad_option)) << "disallowed option";
  schema::ClientRequest empty_source = SubmitRequest(0);
  empty_source.job.kernel.source.clear();
  EXPECT_FALSE(refused_keeps_file(empty_source)) << "empty source";
  // Refused while its job decodes (a field out of its range), and for a rid
  // of 0: the files it names are read on their own.
  schema::ClientRequest far_deadline = SubmitRequest(0);
  far_deadline.job.deadline_ms = schema::kMaxDeadlineMs + 1;
  EXPECT_FALSE(refused_keeps_file(far_deadline)) << "a deadline past its bound";
  schema::ClientRequest bad_priority = SubmitRequest(0);
  bad_priority.job.priority = 10;
  EXPECT_FALSE(refused_keeps_file(bad_priority)) << "a priority past its bound";
  const std::string name = "c-refused-rid0";
  testing::WriteFile(LocalDir() + "/" + name, "1234");
  schema::ClientRequest no_rid = SubmitRequest(0);
  no_rid.rid = 0;
  no_rid.job.files = {{name, 4}, {"../not-plain", 4}};
  raw.Send(no_rid);
  auto r = raw.Receive();
  EXPECT_TRUE(r && r->header.op == ReplyOp::kError);
  EXPECT_FALSE(std::filesystem::exists(LocalDir() + "/" + name)) << "rid 0";
}

// A job that ended before its client waited: Wait's fetch read the push
// that had come meanwhile, kept it for Poll, and returned the fetched
// copy, so the result came back twice and the push stayed held (outputs
// and all) until someone polled, which a C program cannot.
TEST_F(BrokerTest, AResultTakenByWaitIsNotAlsoKeptForPoll) {
  AddWorker();
  auto c = Connect(), watcher = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  auto id = c->Submit(Job("k", "ab"));
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  // Ended, its push waiting unread on c's connection.
  bool ended = false;
  for (int i = 0; i < 500 && !ended; ++i) {
    auto st = watcher->GetStatus(*id);
    ended = st.ok() && schema::IsTerminal(st->state);
    if (!ended) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_TRUE(ended);
  auto r = c->Wait(*id);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->state, JobState::kDone) << r->error;
  auto again = c->Poll(Millis(200));
  EXPECT_EQ(again.status().code(), Code::kTimeout)
      << "job " << (again.ok() ? again->id : 0) << " came back again";
}

// Pushed results that no one takes are bounded: a client that submits and
// never polls (the C API cannot) held every result it was pushed.
TEST_F(BrokerTest, PushedResultsNoOneTakesAreBounded) {
  AddWorker({"--slots", "64"});
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  std::vector<uint64_t> ids;
  for (int i = 0; i < 1030; ++i) {
    auto id = c->Submit(Job("k", "ab"));
    ASSERT_TRUE(id.ok()) << id.status().ToString();
    ids.push_back(*id);
  }
  for (uint64_t id : ids) {
    bool ended = false;
    for (int i = 0; i < 1000 && !ended; ++i) {
      auto st = c->GetStatus(id);
      ended = st.ok() && schema::IsTerminal(st->state);
      if (!ended) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    ASSERT_TRUE(ended) << "job " << id;
  }
  ASSERT_TRUE(c->Stats().ok());  // every push before its answer is read
  std::set<uint64_t> kept;
  for (auto e = c->Poll(Millis(0)); e.ok(); e = c->Poll(Millis(0))) {
    if (e->kind == Client::Event::kResult) {
      EXPECT_TRUE(kept.insert(e->id).second) << e->id;
    }
  }
  EXPECT_EQ(kept.size(), 1024u) << "the oldest go past 1,024";
  for (uint64_t id : ids) {
    if (kept.count(id)) continue;
    auto dropped = c->Fetch(id);
    ASSERT_TRUE(dropped.ok()) << dropped.status().ToString();
    EXPECT_EQ(dropped->state, JobState::kDone) << "a dropped push is fetched";
  }
}

TEST_F(BrokerTest, AFetchedResultIsTheResultThatWasPushed) {
  AddWorker({"--local-dir", LocalDir()});
  RawClient raw(broker_->client_endpoint());
  schema::ClientRequest req = SubmitRequest(1);
  req.job.args = {Arg::Out(128 * 1024), Arg::InOut(0), Arg::Out(16)};
  req.job.local_out = true;
  raw.Send(req, {std::string(100, 'i')});
  auto accepted = raw.Receive();
  ASSERT_TRUE(accepted && accepted->header.op == ReplyOp::kAccepted);
  std::optional<RawClient::Reply> pushed;
  for (int i = 0; i < 20 && !pushed; ++i) {
    auto r = raw.Receive();
    if (r && r->header.op == ReplyOp::kResult && r->header.rid == 0) pushed = r;
  }
  ASSERT_TRUE(pushed);
  ASSERT_EQ(pushed->header.files.size(), 1u);
  raw.Send(About(ClientOp::kResult, 2, accepted->header.id));
  auto fetched = raw.Receive();
  ASSERT_TRUE(fetched && fetched->header.op == ReplyOp::kResult);
  EXPECT_EQ(fetched->header.outputs, pushed->header.outputs);
  EXPECT_EQ(fetched->header.files, pushed->header.files);
  EXPECT_EQ(fetched->payload, pushed->payload);
}

// ------------------------------------------------------------ CURVE stats


// A client that closes its connection and another that connects at once get
// the same descriptor from the kernel. The first one's disconnect, taken
// from the socket monitor after the second's first message, must not end
// the second's connection: its `accepted` (sent after the commit, in a later
// turn of the loop) and its result would go nowhere.
TEST_F(BrokerTest, ANewConnectionOnAReusedDescriptorGetsItsReplies) {
  // Another client keeps the loop turning, so that a disconnect and a new
  // connection's first message can land in one turn.
  std::atomic<bool> stop{false};
  std::vector<std::thread> busy;
  for (int t = 0; t < 2; ++t) {
    busy.emplace_back([&] {
      RawClient b(broker_->client_endpoint());
      for (uint64_t rid = 1; !stop;) {
        for (int k = 0; k < 64; ++k, ++rid) {
          schema::ClientRequest r;
          r.op = schema::ClientOp::kStats;
          r.rid = rid;
          b.Send(r);
        }
        for (int k = 0; k < 64; ++k) (void)b.Receive(std::chrono::milliseconds(1000));
      }
    });
  }
  int lost = 0;
  for (int i = 0; i < 300; ++i) {
    {
      RawClient before(broker_->client_endpoint());
      schema::ClientRequest r;
      r.op = schema::ClientOp::kStats;
      r.rid = 1;
      before.Send(r);
      ASSERT_TRUE(before.Receive());
    }
    RawClient after(broker_->client_endpoint());
    after.Send(SubmitRequest(1), {"ab"});
    auto reply = after.Receive(std::chrono::milliseconds(3000));
    if (!reply) {
      ++lost;
    } else {
      EXPECT_EQ(reply->header.op, schema::ReplyOp::kAccepted);
    }
  }
  stop = true;
  for (auto& t : busy) t.join();
  EXPECT_EQ(lost, 0) << "submits whose acceptance never came";
}

// A job's input files become the store's when its row commits (renamed
// then): a job dispatched while its row was still committing sent a local
// worker a path that did not exist yet ("jN.i0: No such file or directory",
// seen on a GPU machine about once in ten runs of bench e). The job waits
// for the rename (the test's store takes 20 ms per batch, as a slow disk).
TEST_F(BrokerTest, AJobOnLocalFilesWaitsForTheStoreToTakeThem) {
  setenv("GPUQ_TEST_STORE_DELAY_MS", "20", 1);
  const bool started = StartBroker({"--durability", "power", "--heartbeat-ms", "3000"});
  unsetenv("GPUQ_TEST_STORE_DELAY_MS");
  ASSERT_TRUE(started) << Log();
  const std::string local = LocalDir();
  // Long heartbeats, both ways: under a sanitizer, a slow machine's
  // silences (40 synced 2 MiB files on a disk the other tests share) must
  // not make the broker take the test double for lost (which fails the
  // jobs it runs alone). 1 s was too short once under ThreadSanitizer.
  AddWorker({"--local-dir", local, "--slots", "64", "--heartbeat-ms", "3000"});
  auto c = Connect();
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  std::vector<uint64_t> ids;
  for (int i = 0; i < 40; ++i) {
    auto buf = c->NewInput(2 << 20);
    ASSERT_TRUE(buf.ok()) << buf.status().ToString();
    memset((*buf)->data(), 'a' + i % 20, (*buf)->size());
    JobRequest j = Job("k", "", 16);
    j.inputs = {(*buf)->view()};
    auto id = c->SubmitAsync(j);
    ASSERT_TRUE(id.ok()) << id.status().ToString();
  }
  for (int got = 0; got < 40;) {
    auto e = c->Poll(Millis(20000));
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    if (e->kind == Client::Event::kRejected) FAIL() << e->error.ToString();
    if (e->kind == Client::Event::kAccepted) ids.push_back(e->id);
    if (e->kind == Client::Event::kResult) {
      ++got;
      EXPECT_EQ(e->result.state, JobState::kDone) << e->result.error;
    }
  }
  EXPECT_EQ(ids.size(), 40u);
}

// A burst of `result` fetches of one large result, from a client that reads
// nothing: each fetch is measured against what the connection may still
// leave unread once the replies before it are queued, not all against the
// same free budget (which let ten 6 MiB results queue against 8 MiB).
TEST_F(BrokerTest, ABurstOfFetchesPassesNoConnectionsUnreadBound) {
  ASSERT_TRUE(StartBroker({"--max-unread-mb", "8"})) << Log();
  AddWorker();
  ClientOptions o;
  o.local_buffers = false;  // the output is read by the broker, not by the client
  auto c = Client::Connect(broker_->client_endpoint(), o);
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE(WaitForWorkers(**c, 1));
  auto id = (*c)->Submit(Job("k", "", 6 << 20));
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  auto r = (*c)->Wait(*id, Millis(20000));
  ASSERT_TRUE(r.ok() && r->ok()) << (r.ok() ? r->error : r.status().ToString());
  RawClient raw(broker_->client_endpoint(), "", /*rcvhwm=*/1);
  constexpr int kFetches = 10;
  for (int i = 1; i <= kFetches; ++i) {
    schema::ClientRequest fetch;
    fetch.op = ClientOp::kResult;
    fetch.rid = static_cast<uint64_t>(i);
    fetch.id = *id;
    raw.Send(fetch);
  }
  std::this_thread::sleep_for(std::chrono::seconds(1));  // read late
  int results = 0, refused = 0;
  for (int i = 0; i < kFetches; ++i) {
    auto reply = raw.Receive(std::chrono::seconds(20));
    ASSERT_TRUE(reply) << "fetch " << i + 1 << " unanswered";
    if (reply->header.op == ReplyOp::kResult) {
      ++results;
    } else {
      EXPECT_EQ(reply->header.code, Code::kResourceExhausted) << reply->header.error;
      ++refused;
    }
  }
  EXPECT_LE(results, 3) << "6 MiB results queued against a bound of 8 MiB";
  EXPECT_GE(refused, kFetches - 3);
}

// A job whose input file the store is still reading for a worker elsewhere
// (one that cannot reach the local directory), canceled meanwhile: it never
// reached the worker, so nothing will answer for it, and its slot is free at
// once (it stayed taken for good).
TEST_F(BrokerTest, ACancelWhileAJobsInputsAreReadFreesItsWorkersSlot) {
  setenv("GPUQ_TEST_STORE_DELAY_MS", "500", 1);
  const bool started = StartBroker({"--heartbeat-ms", "1000"});
  unsetenv("GPUQ_TEST_STORE_DELAY_MS");
  ASSERT_TRUE(started) << Log();
  AddWorker({"--slots", "1", "--heartbeat-ms", "1000"});  // no local directory
  auto c = Connect(Millis(20000));
  ASSERT_TRUE(WaitForWorkers(*c, 1));
  auto buf = c->NewInput(2 << 20);
  ASSERT_TRUE(buf.ok()) << buf.status().ToString();
  memset((*buf)->data(), 'q', (*buf)->size());
  JobRequest j = Job("k", "", 16);
  j.inputs = {(*buf)->view()};
  auto id = c->Submit(j);  // answered after its row commits; then sent, its file read first
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  auto st = c->GetStatus(*id);
  ASSERT_TRUE(st.ok());
  ASSERT_EQ(st->state, JobState::kDispatched) << "the store reads its input for the worker";
  ASSERT_TRUE(c->Cancel(*id).ok());
  auto next = c->Submit(Job("k", "after"));
  ASSERT_TRUE(next.ok()) << next.status().ToString();
  auto r = c->Wait(*next, Millis(20000));
  ASSERT_TRUE(r.ok()) << r.status().ToString() << " (the worker's one slot is still taken)";
  EXPECT_EQ(r->state, JobState::kDone) << r->error;
}

// A broker played by a test: a ROUTER on loopback that takes the async
// client's requests and answers them as the test says.
class RawBroker {
 public:
  RawBroker() : router_(ctx_, zmq::socket_type::router) {
    router_.set(zmq::sockopt::rcvtimeo, 10000);
    router_.bind("tcp://127.0.0.1:*");
    endpoint_ = router_.get(zmq::sockopt::last_endpoint);
  }
  const std::string& endpoint() const { return endpoint_; }

  // The next request (its sender's routing id in `from`), or nullopt after 10 s.
  std::optional<schema::ClientRequest> Next(std::string* from) {
    std::vector<zmq::message_t> frames;
    if (!zmq::recv_multipart(router_, std::back_inserter(frames)) || frames.size() < 3) {
      return std::nullopt;
    }
    *from = frames[0].to_string();
    std::vector<uint64_t> sizes;
    for (size_t i = 3; i < frames.size(); ++i) sizes.push_back(frames[i].size());
    schema::ClientRequest r;
    if (!schema::DecodeClientRequest(frames[2].to_string_view(), sizes, {}, &r).ok()) {
      return std::nullopt;
    }
    return r;
  }
  void Answer(const std::string& to, const schema::ClientReply& r) {
    const std::string header = schema::EncodeClientReply(r);
    router_.send(zmq::buffer(to), zmq::send_flags::sndmore);
    router_.send(zmq::buffer(schema::kClientProtocol), zmq::send_flags::sndmore);
    router_.send(zmq::buffer(header), zmq::send_flags::none);
  }

 private:
  zmq::context_t ctx_;
  zmq::socket_t router_;
  std::string endpoint_;
};

JobRequest SmallJob() {
  JobRequest j;
  j.spec.kernel.source = "extern \"C\" __global__ void k() {}";
  j.spec.kernel.entry = "k";
  j.spec.launch.grid = {1, 1, 1};
  j.spec.launch.block = {32, 1, 1};
  return j;
}

TEST(AsyncClientDefectsTest, ASignalOnItsThreadEndsNothing) {
  // The async client's thread polls its socket; a signal delivered to it
  // (a profiler's, a SIGCHLD handler's) made the poll fail with EINTR, which
  // was thrown out of the thread: the process ended in std::terminate.
  RawBroker broker;
  struct sigaction quiet = {}, before = {};
  quiet.sa_handler = [](int) {};
  ASSERT_EQ(sigaction(SIGUSR1, &quiet, &before), 0);
  ClientOptions o;
  o.timeout = Millis(10000);
  auto c = AsyncClient::Connect(broker.endpoint(), o);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  // From here only the client's thread takes SIGUSR1 (this thread blocks
  // it, and ZeroMQ's own threads block every signal).
  sigset_t usr1, mask;
  sigemptyset(&usr1);
  sigaddset(&usr1, SIGUSR1);
  ASSERT_EQ(pthread_sigmask(SIG_BLOCK, &usr1, &mask), 0);
  for (int i = 0; i < 20; ++i) {
    kill(getpid(), SIGUSR1);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  auto submitted = (*c)->Submit(SmallJob());
  std::string from;
  auto req = broker.Next(&from);
  ASSERT_TRUE(req.has_value());
  EXPECT_EQ(req->op, ClientOp::kSubmit);
  kill(getpid(), SIGUSR1);
  schema::ClientReply accepted;
  accepted.op = ReplyOp::kAccepted;
  accepted.rid = req->rid;
  accepted.id = 41;
  broker.Answer(from, accepted);
  auto id = submitted.get();
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  EXPECT_EQ(*id, 41u);
  c->reset();
  pthread_sigmask(SIG_SETMASK, &mask, nullptr);
  sigaction(SIGUSR1, &before, nullptr);
}

TEST(AsyncClientDefectsTest, ASubmitAnsweredWithNeitherAcceptedNorErrorFails) {
  // A submit answered with a reply of another kind (a broker's defect, or
  // a hostile one) resolved to a StatusOr that was ok and held no id.
  RawBroker broker;
  auto c = AsyncClient::Connect(broker.endpoint());
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  for (ReplyOp op : {ReplyOp::kCanceled, ReplyOp::kStatus}) {
    auto submitted = (*c)->Submit(SmallJob());
    std::string from;
    auto req = broker.Next(&from);
    ASSERT_TRUE(req.has_value());
    schema::ClientReply odd;
    odd.op = op;
    odd.rid = req->rid;
    odd.id = 5;
    odd.state = op == ReplyOp::kCanceled ? JobState::kCanceled : JobState::kQueued;
    broker.Answer(from, odd);
    auto id = submitted.get();
    EXPECT_FALSE(id.ok()) << schema::ReplyOpName(op) << " gave job " << *id;
    EXPECT_EQ(id.status().code(), Code::kInternal) << id.status().ToString();
  }
}

}  // namespace
}  // namespace gpuq
