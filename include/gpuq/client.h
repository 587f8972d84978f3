// gpuq's C++ client: submit kernel jobs to a gpuq broker and collect results.
//
// Ownership: a Client owns its ZeroMQ context and socket; destroying it
// closes them (unsent requests are dropped, jobs already accepted keep
// running and stay fetchable). Results own their output bytes.
//
// Threads: a Client is NOT thread-safe; use one per thread, or guard it.
// Many requests may be in flight on one Client: SubmitAsync() returns at once
// and results are collected with Poll() or Wait().
//
// Failure: every call returns a Status (gpuq/status.h) whose code is the
// protocol's error code (PROTOCOL.md): the broker's refusals
// (kQueueFull with a retry hint, kInvalid, kNotFound, ...) as they came, and
// kTimeout when no answer came in time. Nothing here throws.
#pragma once

#include <chrono>
#include <functional>
#include <future>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "gpuq/status.h"
#include "gpuq/types.h"

namespace gpuq {

using Millis = std::chrono::milliseconds;

// A job to submit: the kernel and its launch (schema::JobSpec), and the
// bytes of each input buffer in payload-frame order (Arg::In(i) and
// Arg::InOut(i) name inputs[i]). The Client copies nothing it does not send.
struct JobRequest {
  schema::JobSpec spec;
  std::vector<std::string_view> inputs;
};

// An output's bytes, read-only, owned and shared by copies: the received
// ZeroMQ frame, or a mapping of the local file the broker named (see
// ClientOptions::local_buffers), never copied on the way. Thread-safe to
// read.
class Bytes {
 public:
  Bytes() = default;
  explicit Bytes(std::string s);
  // Keeps `owner` alive while any copy of these bytes is.
  Bytes(std::shared_ptr<const void> owner, const char* data, size_t size)
      : owner_(std::move(owner)), data_(data), size_(size) {}

  const char* data() const { return data_; }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  char operator[](size_t i) const { return data_[i]; }
  std::string_view view() const { return {data_, size_}; }
  operator std::string_view() const { return view(); }
  std::string str() const { return std::string(view()); }

  friend bool operator==(const Bytes& a, const Bytes& b) { return a.view() == b.view(); }
  friend bool operator==(const Bytes& a, std::string_view b) { return a.view() == b; }
  friend bool operator==(const Bytes& a, const std::string& b) { return a.view() == b; }

 private:
  std::shared_ptr<const void> owner_;
  const char* data_ = nullptr;
  size_t size_ = 0;
};

// The end of a job, as pushed by the broker or fetched.
struct JobResult {
  uint64_t id = 0;
  schema::JobState state = schema::JobState::kQueued;
  Code code = Code::kOk;  // the failure reason when state is failed/expired
  std::string error;      // for compile_error: NVRTC's log
  std::string device;     // UUID of the GPU that ran it
  uint32_t attempts = 0;
  schema::Timing timing;
  // Bytes of each out and inout buffer, with the index of its argument.
  std::vector<uint32_t> output_args;
  std::vector<Bytes> outputs;
  bool ok() const { return state == schema::JobState::kDone; }
  // The output of argument `arg`, or nullptr.
  const Bytes* Output(uint32_t arg) const;
};

struct ClientOptions {
  Millis timeout{10000};  // default wait for a reply
  // Local buffers (schema/PROTOCOL.md): on an ipc endpoint, both clients
  // pass inputs of at least `local_min_bytes` as files of the broker's local
  // directory, and ask for outputs that large as files, so that their bytes
  // do not cross the socket. The broker names the directory (`devices`
  // reply, asked once, on the first such submit, which waits for it); the
  // client must be able to create files there.
  bool local_buffers = true;
  size_t local_min_bytes = 1u << 20;
  // Client (not AsyncClient): wait for an answer polling awake for this long
  // before sleeping, which saves a thread wake-up per answer (lower latency,
  // a busy core while waiting). 0: sleep at once.
  std::chrono::microseconds spin{0};
  // On tcp, the broker's CURVE public key and this client's key pair
  // (Z85, 40 characters each); empty on ipc.
  std::string server_key, public_key, secret_key;
};

// The embedded default broker endpoint: $GPUQ_BROKER if set, else
// ipc://$XDG_RUNTIME_DIR/gpuq/broker.sock (or /tmp/gpuq-UID/broker.sock).
std::string DefaultEndpoint();
// The folder of the default ipc endpoints.
std::string DefaultRuntimeFolder();

// A writable buffer for one job's input (Client::NewInput). On an ipc
// endpoint of a broker with a local directory it is a new file there,
// mapped: fill it, pass view() among JobRequest::inputs, and the submit
// names the file instead of writing the bytes again. Otherwise it is memory
// and the bytes are sent as usual. A submit that names the file consumes it:
// the broker takes the file, and the buffer's bytes must not change after
// (a later submit of the same bytes writes a new file). Not thread-safe; may
// outlive its Client.
class InputBuffer {
 public:
  ~InputBuffer();
  InputBuffer(const InputBuffer&) = delete;
  InputBuffer& operator=(const InputBuffer&) = delete;
  char* data() { return data_; }
  size_t size() const { return size_; }
  std::string_view view() const { return {data_, size_}; }

 private:
  friend class Client;
  InputBuffer() = default;
  char* data_ = nullptr;
  size_t size_ = 0;
  std::string path_;        // the file, when local
  std::string memory_;      // otherwise
  std::shared_ptr<void> registry_;  // the client's list of local buffers
};

// A region (PROTOCOL.md, "Regions"): memory of this process shared with
// the broker's workers on this host, registered once (Client::NewRegion) and
// named by jobs as ranges. A job's in and inout ranges are copied from it
// to the GPU, its out and inout ranges copied back into it, and nothing
// else moves: the workers keep it mapped and page-locked, so the copies run
// at the GPU's full speed. Write inputs before submitting and read outputs
// after the result; two unfinished jobs may not write overlapping bytes.
//
// Ownership: the Region owns its mapping and its registration; destroying
// it (or Unregister()) ends the region: jobs that name it and have not
// started fail, those running finish first. A region also ends when the
// process that registered it exits. Not thread-safe, like its Client; may
// outlive it.
class Region {
 public:
  ~Region();
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;
  char* data() { return data_; }
  const char* data() const { return data_; }
  uint64_t size() const { return size_; }
  uint64_t id() const { return id_; }
  // Arguments (or buffers of a job of several launches) naming bytes
  // [offset, offset + size) of the region; size 0: up to its end.
  schema::Arg In(uint64_t offset = 0, uint64_t size = 0) const;
  schema::Arg Out(uint64_t offset = 0, uint64_t size = 0) const;
  schema::Arg InOut(uint64_t offset = 0, uint64_t size = 0) const;
  // Ends the region now; the memory stays this process's until the Region
  // is destroyed.
  Status Unregister();

 private:
  friend class Client;
  Region() = default;
  schema::Arg Range(schema::ArgKind kind, uint64_t offset, uint64_t size) const;
  char* data_ = nullptr;
  uint64_t size_ = 0;
  uint64_t id_ = 0;
  int fd_ = -1;                    // its sealed memfd (a session attaches it)
  std::shared_ptr<void> channel_;  // the Client's region channel
  friend class Session;
};

// A session (PROTOCOL.md, "Sessions"): device memory that stays on the GPU
// between launches, in a process that serves this tenant only, reached
// directly over a socket of the GPU's host by a client there, and through
// the broker by a client elsewhere (Client::OpenSession). Buffers are
// handles of this session; kernels come from the broker's compile cache and
// run in the order asked on the session's stream.
//
// Every request is answered in the order made. LaunchAsync sends a launch
// and returns at once; Wait(ticket) takes its answer. A call's error is its
// own (a bad handle, a range outside a buffer, a compile error), and the
// session goes on; kSessionLost means it ended (a kernel fault or a kill in
// this tenant's process on that GPU, its idle timeout, a close through the
// broker), and every later call fails the same way.
//
// Not thread-safe; may outlive its Client. Destroying it closes it.
struct SessionOptions {
  std::string tenant;                // off CURVE, whose it is; on CURVE the key's tenant
  schema::Placement placement;       // architecture, GPU, free memory
  uint64_t memory = 0;               // device bytes it may hold; 0: the broker's default
  std::chrono::milliseconds idle{0};  // ends after this long unused; 0: the broker's default
  // A launch's run-time limit on the GPU; 0: the broker's default (a job's).
  // A launch past it ends the tenant's sessions on that GPU (session_lost).
  std::chrono::milliseconds time_limit{0};
  // Every request through the broker (PROTOCOL.md, "Sessions through the
  // broker"), also from the GPU's host: what a client whose endpoint is not
  // ipc:// does anyway. It costs a hop each way and has no attached regions
  // and no end word (an untimed launch ends by its answer).
  bool through_broker = false;
};

struct SessionLaunch {
  schema::KernelSpec kernel;  // source, entry (extern "C" name or name expression), options
  schema::LaunchSpec launch;  // grid, block, dynamic shared memory
  // Scalars (Arg::U32, Arg::F32...), the session's buffers
  // (Arg::Ref(handle, byte offset)), and buffers of the launch's own: device
  // memory for it alone, zero-filled, freed after it: Arg::In(i) and
  // Arg::InOut(i) hold `inputs[i]` (each input named once), Arg::Out(size)
  // and Arg::InOut come back (Launch and Wait with `outputs`),
  // Arg::Scratch(size) never leaves the GPU.
  std::vector<schema::Arg> args;
  std::vector<std::string_view> inputs;  // read while the call that sends it runs
  // Timed: the answer carries the launch's time on the GPU from two CUDA
  // events. Untimed costs no events, and a client on the GPU's host that
  // polls learns of its end from the GPU itself (PROTOCOL.md, "Sessions").
  bool timed = true;
};

class Session {
 public:
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
  uint64_t id() const;
  const std::string& device() const;  // the GPU's UUID

  // A buffer of `size` bytes on the GPU, zero-filled: its handle.
  StatusOr<uint32_t> Alloc(uint64_t size);
  Status Free(uint32_t buffer);
  Status Write(uint32_t buffer, uint64_t offset, const void* data, size_t size);
  StatusOr<std::string> Read(uint32_t buffer, uint64_t offset, uint64_t size);
  Status Copy(uint32_t dst, uint64_t dst_offset, uint32_t src, uint64_t src_offset,
              uint64_t size);
  Status Fill(uint32_t buffer, uint64_t offset, uint64_t size, uint8_t value);
  // Runs a kernel and waits for it: its time on the GPU, in nanoseconds.
  StatusOr<uint64_t> Launch(const SessionLaunch& launch);
  // The same, with the bytes of its own out and inout buffers, in argument
  // order, into *outputs.
  StatusOr<uint64_t> Launch(const SessionLaunch& launch, std::vector<std::string>* outputs);
  // Send without waiting: a ticket for Wait() (WaitRead() for a read).
  // Requests run, and are answered, in the order sent.
  StatusOr<uint64_t> LaunchAsync(const SessionLaunch& launch);
  StatusOr<uint64_t> WriteAsync(uint32_t buffer, uint64_t offset, const void* data, size_t size);
  StatusOr<uint64_t> ReadAsync(uint32_t buffer, uint64_t offset, uint64_t size);
  // The end of the request of `ticket`: for a timed launch, its time on
  // the GPU in nanoseconds (0 for others).
  StatusOr<uint64_t> Wait(uint64_t ticket);
  // For a launch: the same, with its own out and inout buffers' bytes.
  StatusOr<uint64_t> Wait(uint64_t ticket, std::vector<std::string>* outputs);
  // The bytes of the read of `ticket`.
  StatusOr<std::string> WaitRead(uint64_t ticket);
  // Registered memory (PROTOCOL.md, "Sessions", attach): `region`'s memory,
  // page-locked by the session's process, so that copies between it and
  // the session's buffers run at the bus's speed and no bytes travel in
  // messages. The handle names it in WriteFrom and ReadInto; it stays
  // attached until Detach or the session's end. The region must outlive
  // its attachment.
  StatusOr<uint32_t> Attach(const Region& region);
  // Ends attached region `region`'s attachment once the copies sent before
  // this that use it have run; its handle is refused from then on, and it
  // no longer counts against the session's limits.
  Status Detach(uint32_t region);
  // Bytes [region_offset, region_offset + size) of attached region
  // `region` into the buffer at `offset`; they must not change until the
  // ticket's Wait returns.
  StatusOr<uint64_t> WriteFromAsync(uint32_t buffer, uint64_t offset, uint32_t region,
                                    uint64_t region_offset, uint64_t size);
  Status WriteFrom(uint32_t buffer, uint64_t offset, uint32_t region, uint64_t region_offset,
                   uint64_t size);
  // The buffer's bytes [offset, offset + size) into attached region
  // `region` at `region_offset`: there once the ticket's Wait returns.
  StatusOr<uint64_t> ReadIntoAsync(uint32_t buffer, uint64_t offset, uint64_t size,
                                   uint32_t region, uint64_t region_offset);
  Status ReadInto(uint32_t buffer, uint64_t offset, uint64_t size, uint32_t region,
                  uint64_t region_offset);
  // Ends the session: its buffers are freed.
  Status Close();

 private:
  friend class Client;
  class Impl;
  explicit Session(std::unique_ptr<Impl> impl);
  // Connects to the session's process and says hello.
  static StatusOr<std::unique_ptr<Session>> Connect(uint64_t id, const std::string& device,
                                                    const std::string& path,
                                                    const std::string& token,
                                                    std::chrono::milliseconds timeout,
                                                    std::chrono::microseconds spin);
  // Connects to the broker at `endpoint`, on a connection of the session's
  // own, whose session_calls carry its requests.
  static StatusOr<std::unique_ptr<Session>> ConnectThroughBroker(
      uint64_t id, const std::string& device, const std::string& token,
      const std::string& endpoint, const ClientOptions& options);
  std::unique_ptr<Impl> impl_;
};

class Client {
 public:
  // Connects to `endpoint` (ipc://PATH or tcp://HOST:PORT). ZeroMQ connects
  // in the background: a broker that is not up yet is reached when it comes.
  static StatusOr<std::unique_ptr<Client>> Connect(const std::string& endpoint,
                                                   ClientOptions options = {});
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // Submits and waits for the broker's acknowledgement: the job id. The job
  // is stored durably once this returns. With spec.key set, a resubmit (say
  // after a timeout) returns the same job, never a second one.
  StatusOr<uint64_t> Submit(const JobRequest& job);
  // Submits without waiting; returns the request id. The acknowledgement
  // arrives as an Event from Poll().
  StatusOr<uint64_t> SubmitAsync(const JobRequest& job);

  struct Event {
    enum Kind { kAccepted, kRejected, kResult } kind = kResult;
    uint64_t rid = 0;     // kAccepted, kRejected: the request id
    uint64_t id = 0;      // kAccepted, kResult: the job id
    bool existing = false;
    Status error;         // kRejected
    uint64_t retry_after_ms = 0;
    JobResult result;     // kResult
  };
  // The next acknowledgement, rejection or pushed result, waiting up to
  // `timeout`; kTimeout when none came. Pushed results not yet taken are
  // kept up to 1,024 and 256 MiB of outputs; past either the oldest are
  // dropped (Fetch or Wait gets them).
  StatusOr<Event> Poll(Millis timeout);
  // Waits for the result of job `id` (pushed, or fetched if it ended before
  // this Client was told). Events for other jobs that arrive meanwhile are
  // kept for Poll().
  StatusOr<JobResult> Wait(uint64_t id, std::optional<Millis> timeout = std::nullopt);

  // The job's state; its failure reason in JobResult::code.
  StatusOr<JobResult> GetStatus(uint64_t id);
  // The ended job's result; kNotFound when unknown or past retention, the
  // status (state queued/dispatched) when not ended yet.
  StatusOr<JobResult> Fetch(uint64_t id);
  // Cancels a job; returns its state afterwards (a job that had ended keeps
  // its state).
  StatusOr<schema::JobState> Cancel(uint64_t id);
  // The broker's stats map (schema/PROTOCOL.md, "Stats"), as msgpack.
  StatusOr<std::string> Stats();
  StatusOr<std::vector<schema::WorkerView>> Devices();
  // What tenants used, by tenant, of the jobs that ended in [since_ms,
  // until_ms) (Unix ms, to the hour; until 0: now). `tenant` empty: the
  // caller's own on a CURVE key, every tenant for an operator key or on
  // ipc. Another tenant's on a tenant's key: kForbidden.
  StatusOr<std::vector<schema::TenantUsage>> Usage(const std::string& tenant = "",
                                                   uint64_t since_ms = 0, uint64_t until_ms = 0);

  // A buffer of `size` bytes for an input (see InputBuffer). Asks the broker
  // for its local directory the first time (kTimeout if it does not answer).
  StatusOr<std::unique_ptr<InputBuffer>> NewInput(size_t size);

  // Registers a new region of `size` bytes (zeros) for `tenant` (empty:
  // "default"; a job names it only with the same tenant). Needs the broker's
  // ipc endpoint (kInvalid otherwise); kResourceExhausted past the tenant's
  // region limits.
  StatusOr<std::unique_ptr<Region>> NewRegion(uint64_t size, const std::string& tenant = "");

  // Opens a session on a GPU of the broker's host (see Session): the broker
  // places it and starts this tenant's process there if there is none.
  // kResourceExhausted past the tenant's session limits; kUnavailable when
  // no GPU of the broker's host matches.
  StatusOr<std::unique_ptr<Session>> OpenSession(const SessionOptions& options = {});
  // Ends session `id` through the broker (any client of its tenant).
  Status CloseSession(uint64_t id);

 private:
  class Impl;
  explicit Client(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// A thread-safe client whose calls return futures or call back. One I/O
// thread owns the socket; any thread may call any method.
//
// Ownership: Submit copies the job (inputs included; large ones into local
// files, see ClientOptions), so the caller's buffers may be reused at once. Futures and callbacks outlive nothing: destroying
// the AsyncClient resolves every pending one with kUnavailable. Callbacks run
// on the I/O thread: they must not block, and must not destroy the client.
class AsyncClient {
 public:
  static StatusOr<std::unique_ptr<AsyncClient>> Connect(const std::string& endpoint,
                                                        ClientOptions options = {});
  ~AsyncClient();
  AsyncClient(const AsyncClient&) = delete;
  AsyncClient& operator=(const AsyncClient&) = delete;

  // Resolves to the job id once the broker has stored the job (or to its
  // refusal: kQueueFull, kInvalid, ...; kTimeout when no answer came).
  std::future<StatusOr<uint64_t>> Submit(const JobRequest& job);
  // Resolves when job `id` ends (pushed by the broker, or fetched if it had
  // ended already).
  std::future<StatusOr<JobResult>> Result(uint64_t id);
  // Calls `done` on the I/O thread when job `id` ends.
  void OnResult(uint64_t id, std::function<void(StatusOr<JobResult>)> done);

 private:
  class Impl;
  explicit AsyncClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace gpuq
