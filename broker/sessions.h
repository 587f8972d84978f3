// Sessions (PROTOCOL.md, "Sessions"; docs/DESIGN.md, "Sessions"): device
// memory that stays between launches, in a process of the tenant's own.
//
// The broker places a session on a GPU of its host, starts the session
// process of (tenant, GPU) when there is none (worker/session_host.h;
// gpuq-session), and hands the client the process's socket and the
// session's token. From then on the client talks to that process directly;
// the broker keeps what it must know of every session: its placement, its
// limits, whether its process lives, and what it holds. It also compiles the
// kernels a session process asks for, through the same compile service and
// cache as jobs.
//
// Everything here runs on the broker loop thread, except the compile
// service's callbacks (which only queue their answer and wake the loop).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>
#include <zmq.hpp>

#include "broker/compile/compile_service.h"
#include "broker/relay_io.h"
#include "broker/request_context.h"
#include "schema/messages.h"
#include "util/clock.h"
#include "util/fd.h"
#include "util/mutex.h"
#include "util/unix_socket.h"

namespace gpuq::broker {

class BrokerCore;

struct SessionLimits {
  uint32_t per_tenant = 16;                // sessions open at once
  size_t processes = 64;                   // session processes at once, whatever the tenants
  uint64_t bytes_per_tenant = 64ull << 30; // device memory across a tenant's sessions
  uint64_t default_memory = 1ull << 30;    // a session that does not say
  uint64_t default_idle_ms = 5 * 60 * 1000;
  uint64_t default_limit_ms = 10000;       // a launch's run-time limit, where the open names none
  std::string bin;                         // the session process; empty: none (no sessions)
  std::chrono::microseconds spin{0};       // passed to session processes
  uint64_t max_data_mb = 256;              // a write's or read's bytes
  uint64_t max_attach_mb = 4096;           // host memory a session may attach (page-locked)
  uint64_t max_kernels = 256;              // kernels a session process keeps loaded unheld
  uint64_t max_buffers = 65536;            // buffers a session holds at once
  uint64_t module_memory_mib = 64;         // a module's device memory when loaded (0: no bound)
  uint64_t kernels_memory_mib = 1024;      // all of a session process's modules (0: no bound)
  uint64_t local_memory_mib = 4096;        // a kernel's local memory, all threads (0: no bound)
};

struct SessionView {
  uint64_t id = 0;
  std::string tenant, gpu;
  uint64_t memory = 0, held = 0;
  uint64_t age_ms = 0;
  uint32_t pid = 0;
  bool relayed = false;  // its client reaches it through the broker
};

class SessionServer {
 public:
  explicit SessionServer(BrokerCore& core) : core_(core) {}
  // Ends every session process (their sessions end).
  ~SessionServer();
  void SetLimits(SessionLimits l) { limits_ = std::move(l); }

  // session_open: answered once the session process has opened it.
  // `tenant`: the request's own, which counts off CURVE only.
  void Open(const RequestContext& ctx, const schema::SessionSpec& spec,
            const std::string& tenant);
  // session_close: answered once it has ended.
  void Close(const RequestContext& ctx, uint64_t id);
  // session_call: `frame`, one session request, relayed to session `id`'s
  // process; answered by its answer, or refused in the order of the calls.
  void Call(const RequestContext& ctx, uint64_t id, const std::string& token,
            zmq::message_t& frame);
  // A session_call to session `id` that could not be decoded: refused with
  // `st`, in its place among that connection's calls to it.
  // (Without an id: the connection's relay, if it has one.)
  void Refused(const RequestContext& ctx, std::optional<uint64_t> id, const Status& st);

  void PollItems(std::vector<zmq::pollitem_t>* items) const;
  void OnPoll(const zmq::pollitem_t* items, size_t n);
  // Compiles done, processes gone: called every turn of the loop.
  void Tick();
  // What `ctx` may see (every session off CURVE or for an operator).
  std::vector<SessionView> Views(const RequestContext* ctx) const;
  // Session requests relayed, and their bytes and their answers', since start.
  uint64_t relayed_calls() const { return relayed_calls_; }
  uint64_t relayed_bytes() const { return relayed_bytes_; }

 private:
  struct Host {
    std::string tenant, gpu, arch, path;
    pid_t pid = -1;
    UniqueFd control;
    FrameReader reader{64u << 20};
    FrameWriter writer;
    std::set<uint64_t> sessions;
    MonoTime started;
    // Which process of its key this is: a compile asked by an earlier one
    // (whose rids a later one numbers again from 1) is not answered to it.
    uint64_t generation = 0;
  };
  static constexpr size_t kMaxClosesWaiting = 64;  // closes of one session awaiting its end
  struct Session {
    uint64_t id = 0;
    std::string tenant, token;
    std::string host;  // key of hosts_
    uint64_t memory = 0, held = 0;
    MonoTime opened;
    bool open = false;
    std::optional<RequestContext> opening;
    std::vector<RequestContext> closing;
  };
  // A connection of the broker's to a session's process, for the client
  // connection whose session_calls it carries. Every request it forwards is
  // answered once, in order; a call refused here is answered in its place
  // among them.
  struct Relay {
    uint64_t session = 0;
    ConnectionRef conn;
    UniqueFd fd;
    RelayReader reader;
    RelayWriter writer;
    bool greeted = false;  // the hello's answer came
    struct Pending {
      RequestContext ctx;
      Status refused;  // ok: forwarded, its answer to come
    };
    std::deque<Pending> calls;
    size_t forwarded = 0;  // of `calls`, those the process will answer
    std::deque<zmq::message_t> held;  // requests waiting for the hello's answer
    size_t held_bytes = 0;
    // The process's end of the connection (or a bad frame), to act on once
    // the answers read before it are sent.
    Status closing;
    // Writing to the process failed (it has gone): later calls are refused,
    // and what it said before it went is still read, up to its end.
    Status unwritable;
    // Once the session has ended: why, for the connection's later calls,
    // until it goes (or a minute has passed).
    Status ended;
    MonoTime ended_at;
    explicit Relay(size_t max_frame) : reader(max_frame) {}
  };
  struct Compiled {
    std::string host;
    uint64_t generation = 0;  // of the host that asked
    uint64_t rid = 0;
    std::string entry;
    StatusOr<compile::EntryPtr> result = Status(Code::kInternal, "not run");
  };

  static std::string HostKey(const std::string& tenant, const std::string& gpu) {
    return tenant + '\n' + gpu;
  }
  StatusOr<Host*> Start(const std::string& tenant, const std::string& gpu,
                        const std::string& arch);
  void Send(Host& h, const schema::SessionMessage& m);
  void OnMessage(const std::string& key, Host& h, schema::SessionMessage& m);
  // Session `id` ended (`why`); its client hears of it if it waits.
  void Ended(uint64_t id, Code code, const std::string& why);
  // The process of `key` is gone, or is to go: its sessions end.
  void Drop(const std::string& key, const std::string& why);
  // Calls a relay forwards at once: more wait for answers, refused. Twice
  // as many entries in all (refusals held in their place included), and the
  // relay ends.
  static constexpr size_t kMaxRelayedCalls = 65536;
  // Bytes of relayed requests the broker holds for session processes, in all.
  static constexpr size_t kRelayBytes = size_t{1} << 30;
  // Replies queued in ZeroMQ for a connection past which a relay takes no
  // more answers (well under the client socket's sndhwm of 10,000).
  static constexpr uint64_t kRelayFrames = 4096;
  // Bytes a relay reads, and writes, in one turn of the loop.
  static constexpr size_t kRelayTurn = 4u << 20;
  // A session request's frame bound: the session process's own.
  size_t MaxFrame() const { return (limits_.max_data_mb + 1) << 20; }
  StatusOr<Relay*> OpenRelay(const RequestContext& ctx, const Session& s, const Host& h);
  static size_t Queued(const Relay& r);
  // Whether `r` may hold one more call; if not, it ends, and `ctx` is told.
  bool Admit(Relay& r, const RequestContext& ctx);
  // Answers `ctx`'s call with `st` now, or after the calls before it.
  void Refuse(Relay* r, const RequestContext& ctx, const Status& st);
  // Takes the process's answers; false when the relay has ended.
  bool OnRelay(Relay& r, short revents);
  // Answers the refusals at the head of the calls while the client has room
  // (Room); false when one could not be sent.
  bool AnswerRefused(Relay& r);
  // Whether `r`'s client may be sent more answers now.
  bool Room(const Relay& r) const;
  // Sends the answers read, while the client has room; false when the
  // relay has ended.
  bool Answers(Relay& r);
  // Every call left fails with `why`; the relay's connection closes.
  void EndRelay(uint64_t session, const Status& why);
  // A write to the process failed (`st`): nothing more is written; the
  // relay ends at the process's end, after what it said before it.
  static void Unwritable(Relay& r, const Status& st);
  // Whether a refusal waits at the head of the relay's calls (for room in
  // its client's queue).
  static bool Refusing(const Relay& r) {
    return !r.calls.empty() && !r.calls.front().refused.ok();
  }

  BrokerCore& core_;
  SessionLimits limits_;
  std::map<std::string, Host> hosts_;
  uint64_t next_generation_ = 1;
  std::map<uint64_t, Session> sessions_;
  std::map<uint64_t, Relay> relays_;  // by session
  uint64_t relayed_calls_ = 0, relayed_bytes_ = 0;
  // Bytes of requests all relays held at the latest Tick, plus those taken
  // since: at least what they hold now (kRelayBytes), without a walk over
  // every relay for each call.
  size_t relay_bytes_ = 0;
  std::vector<pid_t> exiting_;  // processes told to go, not yet reaped
  Mutex mu_;
  std::vector<Compiled> compiled_ GUARDED_BY(mu_);
};

}  // namespace gpuq::broker
