// The fixture of the broker process tests: gpuqd as a real process on ipc
// endpoints in a temporary folder, worker test doubles (gpuq-fake-worker) as
// real processes, and raw peers (a client or a worker socket the test drives
// message by message) for what the libraries would never send.
#pragma once

#include <algorithm>
#include <gtest/gtest.h>

#include <chrono>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>
#include <zmq.hpp>

#include "gpuq/client.h"
#include "schema/codec.h"
#include "tests/process_util.h"
#include "tests/test_util.h"

namespace gpuq::testing {

// One source with every kernel the test double knows, so that one compile
// serves the whole suite. The names pick the double's behaviour.
inline constexpr char kKernels[] =
    "#define K(name) extern \"C\" __global__ void name(unsigned char* a, unsigned char* b) {}\n"
    "K(k) K(slow) K(crash) K(fault) K(hang) K(wcrash)\n";

// A client socket that sends what the test encodes, frame by frame.
class RawClient {
 public:
  // `routing_id`: the identity the socket announces (empty: the broker's
  // choice, as every gpuq client does).
  // `rcvhwm` > 0: the socket takes in at most that many messages (and a
  // small kernel buffer) before its peer must hold the rest, as a client
  // that reads nothing.
  explicit RawClient(const std::string& endpoint, const std::string& routing_id = "",
                     int rcvhwm = 0);
  // On CURVE: the broker's public key, and this client's key pair (Z85).
  RawClient(const std::string& endpoint, const std::string& server_key,
            const std::string& public_key, const std::string& secret_key);
  struct Reply {
    schema::ClientReply header;
    std::vector<std::string> payload;
  };
  void Send(const schema::ClientRequest& request, const std::vector<std::string>& payload = {});
  // Frames as they are: [protocol, header, payload...].
  void SendFrames(const std::vector<std::string>& frames);
  // The next message, or nullopt after `timeout`.
  std::optional<Reply> Receive(std::chrono::milliseconds timeout = std::chrono::seconds(5));
  zmq::socket_t& socket() { return socket_; }

 private:
  zmq::context_t ctx_;
  zmq::socket_t socket_;
};

// A worker socket the test drives: it registers, takes jobs and answers them
// as the test says. Every Receive() first sends a heartbeat, so a test that
// calls it at least once per broker heartbeat interval keeps it alive.
class RawWorker {
 public:
  explicit RawWorker(const std::string& endpoint);
  struct Message {
    schema::BrokerMessage header;
    std::vector<std::string> payload;
  };
  void Ready(const std::string& arch = "sm_90", uint32_t slots = 1,
             const std::string& uuid = "GPU-raw");
  void Send(const schema::WorkerMessage& m, const std::vector<std::string>& payload = {});
  // `running`: the jobs it says it has begun (unset: it does not say).
  void Heartbeat(std::optional<std::vector<schema::WorkerMessage::Running>> running = {});
  // The next message other than a heartbeat, or nullopt after `timeout`.
  std::optional<Message> Receive(std::chrono::milliseconds timeout = std::chrono::seconds(5));
  // Answers `job` as done: every out and inout buffer comes back, filled
  // with `fill`; `drop` outputs are left out from the end.
  void Done(const Message& job, char fill = 'r', size_t drop = 0);

 private:
  zmq::context_t ctx_;
  zmq::socket_t socket_;
  std::deque<Message> received_;  // taken from a batch, not yet returned
};

class BrokerTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(StartBroker()) << Log(); }

  bool StartBroker(std::vector<std::string> extra = {}) {
    if (!broker_ || !extra.empty()) broker_ = std::make_unique<BrokerProcess>(dir_.path(), extra);
    return broker_->Start();
  }

  // A worker test double; its heartbeat is TestHeartbeatMs() unless `extra`
  // names one.
  Process& AddWorker(std::vector<std::string> extra = {}) {
    std::vector<std::string> argv = {BinPath("gpuq-fake-worker"), "--broker",
                                     broker_->worker_endpoint()};
    if (std::find(extra.begin(), extra.end(), "--heartbeat-ms") == extra.end()) {
      argv.insert(argv.end(), {"--heartbeat-ms", TestHeartbeatMs()});
    }
    argv.insert(argv.end(), extra.begin(), extra.end());
    workers_.push_back(Process::Start(argv, dir_.File("workers.log")));
    return workers_.back();
  }

  std::unique_ptr<Client> Connect(Millis timeout = Millis(10000)) {
    ClientOptions o;
    o.timeout = timeout;
    auto c = Client::Connect(broker_->client_endpoint(), o);
    EXPECT_TRUE(c.ok()) << c.status().ToString();
    return std::move(*c);
  }

  // A job for the test double: `b` is inout (comes back +1 per byte), and
  // an out buffer of `out` bytes (comes back filled with 3).
  // The request's input views point into `inputs_`, which outlives it.
  JobRequest Job(const std::string& entry, const std::string& b, uint64_t out = 16) {
    inputs_.push_back(b);
    JobRequest j;
    j.spec.kernel.source = kKernels;
    j.spec.kernel.entry = entry;
    j.spec.launch.grid = {1, 1, 1};
    j.spec.launch.block = {32, 1, 1};
    j.spec.args = {schema::Arg::InOut(0), schema::Arg::U32(7), schema::Arg::Out(out)};
    j.inputs = {inputs_.back()};
    return j;
  }

  // The same job as a raw submit request (its input is payload frame 0).
  schema::ClientRequest SubmitRequest(uint64_t rid, const std::string& entry = "k",
                                      uint64_t out = 16) {
    schema::ClientRequest r;
    r.op = schema::ClientOp::kSubmit;
    r.rid = rid;
    r.job = Job(entry, "", out).spec;
    return r;
  }

  // Waits until `n` workers are registered.
  bool WaitForWorkers(Client& c, size_t n) {
    for (int i = 0; i < 500; ++i) {
      auto d = c.Devices();
      if (d.ok() && d->size() == n) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  }

  // Waits until job `id` is on a worker.
  bool WaitDispatched(Client& c, uint64_t id) {
    for (int i = 0; i < 1000; ++i) {
      auto st = c.GetStatus(id);
      if (st.ok() && st->state == schema::JobState::kDispatched) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return false;
  }

  // The broker restarted with 1 s heartbeats and one raw worker; a new
  // client's Job("k", input, out) taken by that worker, for the test to
  // answer. `job` is empty (check it) when something on the way failed.
  struct Taken {
    std::unique_ptr<RawWorker> worker;
    std::unique_ptr<Client> client;
    uint64_t id = 0;
    std::optional<RawWorker::Message> job;
  };
  Taken TakeOneJob(const std::string& input, uint64_t out = 16) {
    Taken t;
    if (!StartBroker({"--heartbeat-ms", "1000"})) {
      ADD_FAILURE() << Log();
      return t;
    }
    t.worker = std::make_unique<RawWorker>(broker_->worker_endpoint());
    t.worker->Ready();
    t.client = Connect();
    if (!t.client || !WaitForWorkers(*t.client, 1)) return t;
    auto id = t.client->Submit(Job("k", input, out));
    if (!id.ok()) return t;
    t.id = *id;
    t.job = t.worker->Receive();
    if (t.job && t.job->header.op != schema::BrokerOp::kJob) t.job.reset();
    return t;
  }

  std::string Log() { return ReadFile(dir_.File("gpuqd.log")); }
  std::string LocalDir() { return broker_->store() + ".blobs"; }

  TempDir dir_;
  std::unique_ptr<BrokerProcess> broker_;
  std::deque<Process> workers_;  // deque: AddWorker() references stay valid
  std::deque<std::string> inputs_;
};

}  // namespace gpuq::testing
