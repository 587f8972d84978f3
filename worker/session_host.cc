#include "worker/session_host.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <deque>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include "schema/codec.h"
#include "util/cpu_relax.h"
#include "util/fd.h"
#include "util/mutex.h"
#include "util/sealed_memfd.h"
#include "util/sha256.h"
#include "util/shm_ring.h"
#include "util/unix_socket.h"
#include "worker/exit_codes.h"

namespace gpuq::worker {

using schema::SessionMessage;
using schema::SessionOp;
using Clock = std::chrono::steady_clock;

namespace {

constexpr size_t kMaxPending = 64;   // connections that have not said hello
constexpr int64_t kHelloMs = 5000;   // how long one may take to say it
constexpr size_t kRingBytes = 256u << 10;  // each way, for a client that asks for rings
// A sleeping side of the rings checks its socket (for the peer's end) this often.
constexpr std::chrono::microseconds kRingSlice{20000};
// Work ahead whose answers would wait behind others (their client reads
// slowly) is looked at again this often, instead of waited for.
constexpr std::chrono::microseconds kWorkSlice{1000};
constexpr size_t kMaxKernelRefs = 1024;  // kernel handles per session
// What a buffer of `size` bytes counts against its session's memory: the
// device's allocator takes at least 512 bytes for any buffer (a million
// 1-byte buffers took 512 MiB), and a limit on sizes alone let a session
// take hundreds of times its memory.
constexpr uint64_t Charged(uint64_t size) { return (size + 511) / 512 * 512; }
constexpr uint64_t kAnnounceEvery = 64;   // requests between end-word writes at most
constexpr size_t kBatch = 32;             // requests decoded before they are handled
// Past this many bytes of answers its client has not taken and of host
// memory its requests hold until answered (reads' bytes, writes' held for
// their copies, launches' own buffers), a session reads no more requests
// until its client takes answers.
constexpr uint64_t kMaxUnread = 64u << 20;
// What a request waiting for its answer counts toward that bound besides
// its bytes: its entry (about 700 bytes) and its answer.
constexpr uint64_t kEntryBytes = 1024;
// Requests waiting for answers past which the GPU is asked what has ended
// on every turn, requests or not.
constexpr size_t kCompleteEvery = 256;
constexpr size_t kMaxAttached = 16;       // regions attached to a session
// A session's thread polls at least this long after a request or an answer.
constexpr std::chrono::microseconds kPollAfter{30};

bool SameToken(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  unsigned char d = 0;
  for (size_t i = 0; i < a.size(); ++i) d |= static_cast<unsigned char>(a[i] ^ b[i]);
  return d == 0;
}

SessionMessage ErrorReply(uint64_t rid, const Status& s) {
  SessionMessage m;
  m.op = SessionOp::kError;
  m.rid = rid;
  m.code = s.code() == Code::kOk ? Code::kInternal : s.code();
  m.error = s.message();
  return m;
}

// Bytes [offset, offset + size) lie within a buffer of `cap` bytes.
bool InRange(uint64_t offset, uint64_t size, uint64_t cap) {
  return offset <= cap && size <= cap - offset;
}

// The kernel a launch names: its source, options, headers and entry.
std::string KernelKey(const schema::KernelSpec& k) {
  Sha256 h;
  auto part = [&](std::string_view s) { h.UpdateField(s); };
  part(k.source);
  for (const auto& o : k.options) part(o);
  part("|");
  for (const auto& hd : k.headers) {
    part(hd.name);
    part(hd.content);
  }
  part(k.entry);
  part(k.name_expression ? "expr" : "extern");
  return ToHex(h.Finish());
}

}  // namespace

class SessionHost::Impl {
 public:
  Impl(SessionHostOptions o, std::unique_ptr<SessionDevice> d)
      : opt_(std::move(o)), device_(std::move(d)), control_reader_(64u << 20),
        wake_(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {}
  int Run();

 private:
  enum Hold { kRunning, kWaiting, kTaken };  // Session::hold
  // Host bytes of a copy, until it has run (or been answered): in the
  // stream's page-locked memory where it has some to give, else on the heap
  // (whose copies the driver stages before CopyIn or CopyOut returns; the
  // heap keeps their address while the entry moves).
  struct HostBytes {
    std::unique_ptr<SessionStaging> staged;
    std::unique_ptr<std::string> unstaged;
    char* data() { return staged ? staged->data() : unstaged ? unstaged->data() : nullptr; }
    uint64_t size() const { return staged ? staged->size() : unstaged ? unstaged->size() : 0; }
    // The bytes as a string (moved where they are one).
    std::string Take() { return unstaged ? std::move(*unstaged) : std::string(data(), size()); }
  };
  // A request whose answer waits for the stream's end word to reach `seq`
  // (its rid; 0: nothing to wait for): a read's bytes come from `bytes`; a
  // write's bytes are kept there until then; a timed launch's time from
  // `mark`.
  struct Entry {
    SessionMessage reply;
    uint64_t seq = 0;
    std::unique_ptr<SessionMark> mark;
    bool refused = false;
    std::shared_ptr<const void> hold;  // an attached region its copy uses
    HostBytes bytes;  // a write's, until its copy has run; a read's, until answered
    bool read = false;
    // A launch's buffers of its own: its inputs' bytes until copied, its
    // outputs' (in argument order) until answered; its device bytes.
    std::vector<HostBytes> ins, outs;
    uint64_t own = 0;
    uint64_t host = 0;  // host bytes it holds until answered (Session::holding)
  };
  struct Buffer {
    uint64_t ptr = 0, size = 0;
  };
  // A region its client attached (PROTOCOL.md, "Sessions"): a sealed memfd
  // mapped here and pinned for the device. Copies that use it hold it until
  // they are answered; the session's stream ends before its last holder.
  struct Attached {
    Mapping map;
    uint64_t size = 0;
    std::unique_ptr<SessionPinned> pinned;
    ~Attached() { pinned.reset(); }  // unpinned before it is unmapped
  };
  // A session. Its thread (Serve) owns the connection, the stream and the
  // buffers while it runs; the control thread sets it up before and takes
  // them back after (Reap).
  struct Session {
    uint64_t id = 0;
    std::string token;
    uint64_t memory = 0, held = 0;
    uint64_t own = 0;  // device bytes of launches' own buffers, until they are answered
    uint64_t holding = 0;  // host bytes of `pending` (Entry::host)
    std::chrono::milliseconds idle{0};
    UniqueFd conn;
    UniqueFd wake;  // an eventfd: the control thread asks it to end
    std::unique_ptr<FrameReader> reader;
    FrameWriter out;  // answers the socket (or ring) has not taken yet
    // With rings (the client asked): requests come in `in`, answers go out
    // in `back`; the socket then only tells that the client is gone.
    Mapping rings;
    ByteRing in, back;
    // Attached by the control thread, used by the session's thread. Before
    // the stream: it ends (and waits for its copies) first.
    Mutex attach_mu;
    std::map<uint32_t, std::shared_ptr<Attached>> attached GUARDED_BY(attach_mu);
    // Regions detached while copies still hold them: mapped and pinned until
    // the last is answered, so they count against the limits until then.
    std::vector<std::weak_ptr<Attached>> detached GUARDED_BY(attach_mu);
    uint64_t attached_bytes GUARDED_BY(attach_mu) = 0;
    uint32_t next_region GUARDED_BY(attach_mu) = 1;
    std::unique_ptr<SessionStream> stream;
    std::map<uint32_t, Buffer> buffers;
    std::deque<Entry> pending;  // answered in order
    // The kernel of its latest launch: the next launch of the same kernel
    // (the common case: a loop) finds it without hashing its source.
    schema::KernelSpec last_spec;
    std::shared_ptr<SessionKernel> last_kernel;
    // A launch's arguments as the driver takes them, kept between launches
    // so that a launch allocates nothing.
    std::vector<uint64_t> slots;
    std::vector<void*> params;
    std::vector<uint64_t> own_sizes;  // a launch's own buffers' sizes, by argument
    uint32_t last_ref = 0;
    // Kernels by the handles their launches' answers gave (handle - 1), and
    // the handle of each kernel's key: a later launch names one by handle.
    std::vector<std::shared_ptr<SessionKernel>> kernels;
    std::map<std::string, uint32_t> kernel_refs;
    std::vector<std::pair<Status, SessionMessage>> batch;  // requests decoded, to handle
    uint64_t close_rid = 0;     // its client's close, answered once the broker knows
    uint64_t requests = 0;      // taken so far
    uint64_t answered = 0;      // answers given so far
    // The reached word (the process's own) and the end word (PROTOCOL.md,
    // "Sessions"): the latest rid of work enqueued, the latest announced
    // (its write into the reached word enqueued after it), the latest
    // written into the end word too, and all up to `done_through`
    // known ended by a full wait. While a refusal waits in `pending`, or
    // answers wait for room, the end word is not written: a client that
    // learns of ends from it finds a refusal in its ring before the word
    // passes it.
    uint64_t last_rid = 0, enqueued = 0, announced = 0, in_end_word = 0, done_through = 0;
    size_t refused = 0;
    std::thread thread;
    // Shared with the control thread.
    std::atomic<int64_t> last_ns{0};  // its latest request (steady clock)
    std::atomic<uint64_t> unanswered{0};
    std::atomic<bool> stop{false}, finished{false};
    // A launch's run-time limit (0: none). With one, launch n is preceded
    // in its stream by the write of 2n+1 into the stream's watch word and
    // followed by 2n+2: the word is odd while a launch runs. The end's
    // write is put off (`watch_due`) to go with the next launch's start,
    // which stands for it, or with the end word's, or before the next
    // request's work. `mark_sent` is the latest value enqueued (the
    // session's thread writes it; the watchdog reads it).
    std::chrono::milliseconds limit{0};
    uint32_t next_mark = 1;  // the next launch's start
    uint32_t watch_due = 0;  // an end not yet enqueued, or 0
    std::atomic<uint32_t> mark_sent{0};
    // A launch sent to an idle stream has no start mark (it starts at
    // once): the even mark before it, standing for its start (1: none).
    std::atomic<uint32_t> idle_after{1};
    const uint32_t* watch_word = nullptr;  // the stream's, set before its thread starts
    // The watchdog's own (under watch_mu_): the word as last seen odd, and
    // since when.
    uint32_t watch_seen = 0;
    int64_t watch_since_ns = 0;  // 0: the word was even (no launch running)
    // While its thread waits for the GPU (kWaiting) it touches neither its
    // answers nor its connection; the watchdog may then take them over
    // (kTaken) to tell its client why the process ends.
    std::atomic<int> hold{kRunning};
    std::atomic<bool> told{false};  // its client has been told why the process ends
    Mutex mu;
    bool ending GUARDED_BY(mu) = false;
    Code end_code GUARDED_BY(mu) = Code::kOk;
    std::string end_why GUARDED_BY(mu);
  };
  struct Pending {
    UniqueFd fd;
    UniqueFd passed;  // a descriptor its first message carried (an attach's memfd)
    FrameReader reader;
    int64_t since_ns;  // a connection that says no hello within kHelloMs is closed
    explicit Pending(UniqueFd f, size_t max) : fd(std::move(f)), reader(max), since_ns(NowNs()) {}
  };
  struct Module {
    std::shared_ptr<SessionKernel> kernel;
    Status failed;
    bool ready = false;
    int waiters = 0;  // sessions' threads waiting for it in Kernel()
  };

  static int64_t NowNs() { return Clock::now().time_since_epoch().count(); }
  size_t MaxFrame() const { return opt_.max_data + (1u << 20); }
  void Control(const SessionMessage& m);
  void OnControl(SessionMessage& m);
  void Open(const SessionMessage& m);
  void OnModule(SessionMessage& m);
  void Accept();
  void OnPending(size_t i);
  // An attach (a connection's first message, with a memfd): its answer.
  SessionMessage Attach(const SessionMessage& m, UniqueFd fd);
  StatusOr<std::shared_ptr<Attached>> AttachedRegion(Session& s, uint32_t region, uint64_t offset,
                                                     uint64_t size);
  // The session's thread: reads its requests, enqueues their work, and
  // answers them in order as the work is done.
  void Serve(Session* s);
  // Hands the answers waiting to the socket or the ring: false when the
  // socket is gone.
  bool FlushOut(Session& s);
  // With rings: whether the client's socket is still open.
  bool ClientThere(Session& s);
  // Sends one frame on the session's way back (after its thread ended):
  // whether it went.
  bool Last(Session& s, const SessionMessage& m);
  // False when the connection has ended.
  bool Read(Session& s);
  void Handle(Session& s, SessionMessage& m);
  void Launch(Session& s, SessionMessage& m);
  // A launch's buffers of its own (in, inout, out, scratch): device memory
  // for it alone (zero-filled; inputs copied in), pointers into `s.slots`,
  // input bytes held by `e` until copied, device bytes counted in e->own,
  // each argument's size in `s.own_sizes`. On an error, nothing is left
  // allocated.
  Status OwnBuffers(Session& s, SessionMessage& m, Entry* e, std::vector<uint64_t>* ptrs);
  // Host memory for `size` bytes a copy writes (a read's, a launch's
  // outputs).
  HostBytes Bytes(Session& s, uint64_t size) {
    HostBytes h;
    h.staged = size > 0 ? s.stream->Staging(size) : nullptr;
    if (!h.staged) h.unstaged = std::make_unique<std::string>(size, '\0');
    return h;
  }
  // `bytes` where a copy reads them (a write's, a launch's inputs): copied
  // into page-locked memory, or moved.
  HostBytes Bytes(Session& s, std::string& bytes) {
    HostBytes h;
    h.staged = bytes.empty() ? nullptr : s.stream->Staging(bytes.size());
    if (h.staged) {
      std::memcpy(h.staged->data(), bytes.data(), bytes.size());
    } else {
      h.unstaged = std::make_unique<std::string>(std::move(bytes));
    }
    return h;
  }
  // The kernel of `k` (its KernelKey `key`), compiled and loaded once per process.
  StatusOr<std::shared_ptr<SessionKernel>> Kernel(Session& s, const schema::KernelSpec& k,
                                                  const std::string& key);
  // Answers what is done at the head of `pending`; with `wait`, waits for
  // the head first. False after a fault.
  bool Complete(Session& s, bool wait);
  void Push(Session& s, Entry e) {
    // The entry itself counts too (its reply, its mark): a client that
    // sends small requests faster than they are answered (fills, frees)
    // holds no more than the bound of them.
    e.host = kEntryBytes + e.reply.error.size() + e.bytes.size();
    for (const HostBytes& b : e.ins) e.host += b.size();
    for (const HostBytes& b : e.outs) e.host += b.size();
    s.holding += e.host;
    s.unanswered.fetch_add(1);
    s.pending.push_back(std::move(e));
  }
  // Whether the session may read more requests: the answers its client has
  // not taken and what its requests hold are under the bound, with
  // `promised` more (requests decoded, not yet handled).
  static bool Takes(const Session& s, uint64_t promised = 0) {
    return s.out.queued() + s.holding + promised < kMaxUnread;
  }
  // The host bytes request `m` will hold until it is answered, at most.
  static uint64_t HostBytesOf(const SessionMessage& m) {
    switch (m.op) {
      case SessionOp::kRead:
        return m.region == 0 ? m.size : 0;
      case SessionOp::kWrite:
        return m.region == 0 ? m.data.size() : 0;
      case SessionOp::kLaunch: {
        uint64_t n = 0;
        for (const std::string& in : m.inputs) n += 2 * in.size();  // in, and out for an inout
        for (const schema::Arg& a : m.args) {
          if (a.kind == schema::ArgKind::kOut) n += a.size;
        }
        return n;
      }
      default:
        return 0;
    }
  }
  void Answer(Session& s, uint64_t rid, const Status& st) {
    Entry e;
    e.reply = ErrorReply(rid, st);
    e.refused = true;
    ++s.refused;
    Push(s, std::move(e));
  }
  // Enqueues the reached word's write after the work enqueued so far, the
  // end word's with it when the client may be told, and the watch word's
  // write that is due (with them, or alone).
  void Announce(Session& s) {
    const bool tell = s.in_end_word != s.enqueued && s.refused == 0 && !s.out.pending();
    if (s.enqueued == s.announced && !tell) return Watch(s);
    if (s.watch_due == 0) {
      (void)s.stream->Announce(s.enqueued, tell);
    } else if (s.stream->AnnounceAndWatch(s.enqueued, tell, s.watch_due).ok()) {
      s.mark_sent.store(s.watch_due, std::memory_order_release);
      s.watch_due = 0;
    }
    s.announced = s.enqueued;
    if (tell) s.in_end_word = s.enqueued;
  }
  // Enqueues the watch word's write that is due.
  void Watch(Session& s) {
    if (s.watch_due != 0) Mark(s, s.watch_due);
  }
  // Enqueues the write of `value` into the watch word (due or not).
  void Mark(Session& s, uint32_t value) {
    if (!s.stream->Watch(value).ok()) return;  // a stream that fails ends the process
    s.mark_sent.store(value, std::memory_order_release);
    if (value == s.watch_due) s.watch_due = 0;
  }
  void Done(Session& s, uint64_t rid) { Done(s, rid, Entry()); }
  void Done(Session& s, uint64_t rid, Entry e);
  void Usage(Session& s);
  // Asks session `s` to end (from any thread); the first reason stands.
  void End(Session& s, Code code, std::string why);
  void Reap();
  // Ends the process: tells the broker why each session ends, and exits
  // with `exit_code`. From any thread; the first to come ends it.
  void Fault(const Status& s, int exit_code = kExitFault);
  // The run-time limit (PROTOCOL.md, "Sessions"): a thread of its own,
  // which makes no CUDA call (a call can wait for the very kernel that runs
  // too long), ends the process when a session's watch word has stayed odd
  // for its limit.
  void Watchdog();
  // Tells every watched session's client why the process ends, then ends
  // it. With watch_mu_ held.
  [[noreturn]] void Doom(const Status& why) EXCLUSIVE_LOCKS_REQUIRED(watch_mu_);
  // Tells session `s`'s client why the process ends (from its thread, or
  // from the watchdog once it has taken the session over).
  void Tell(Session& s);
  // A session's thread once the process is ending (Doom): nothing is left
  // for it to do, and it must not touch its session again; it waits for
  // the end (which comes within the watchdog's grace) rather than return.
  [[noreturn]] static void Park() {
    for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
  }
  void Wake() {
    uint64_t one = 1;
    (void)!write(wake_.get(), &one, sizeof one);
  }

  const SessionHostOptions opt_;
  std::unique_ptr<SessionDevice> device_;
  FrameReader control_reader_;
  UniqueFd wake_;
  UniqueFd listener_;
  Mutex control_mu_;  // held for each write to the control channel
  bool broker_gone_ GUARDED_BY(control_mu_) = false;
  std::map<uint64_t, std::unique_ptr<Session>> sessions_;  // the control thread's
  std::vector<std::unique_ptr<Pending>> pending_;
  // Kernels, loaded once for every session of the process.
  Mutex modules_mu_;
  CondVar modules_cv_{&modules_mu_};
  std::map<std::string, Module> modules_ GUARDED_BY(modules_mu_);
  std::deque<std::string> module_order_ GUARDED_BY(modules_mu_);
  std::map<uint64_t, std::string> compiling_ GUARDED_BY(modules_mu_);  // rid -> key
  uint64_t next_rid_ GUARDED_BY(modules_mu_) = 1;
  // Handles start at a random number per process: another process's
  // handles are almost never this one's.
  std::atomic<uint32_t> next_buffer_{1 + static_cast<uint32_t>(std::random_device{}() %
                                                               (1u << 30))};
  Mutex fault_mu_;  // held by the thread that ends the process
  std::atomic<bool> faulted_{false};
  // The sessions whose threads run, for the watchdog (Watchdog), and its stop.
  Mutex watch_mu_;
  CondVar watch_cv_{&watch_mu_};
  std::vector<Session*> watched_ GUARDED_BY(watch_mu_);
  bool watch_stop_ GUARDED_BY(watch_mu_) = false;
  // Why the process ends, once the watchdog has found a launch past its limit.
  std::atomic<bool> doomed_{false};
  Mutex doom_mu_;
  Status doom_ GUARDED_BY(doom_mu_);
  Mutex ids_mu_;
  std::set<uint64_t> ids_ GUARDED_BY(ids_mu_);  // the sessions, for a fault's report
};

SessionHost::SessionHost(SessionHostOptions options, std::unique_ptr<SessionDevice> device)
    : impl_(std::make_unique<Impl>(std::move(options), std::move(device))) {}
SessionHost::~SessionHost() = default;
int SessionHost::Run() { return impl_->Run(); }

void SessionHost::Impl::Control(const SessionMessage& m) {
  MutexLock lock(&control_mu_);
  if (broker_gone_) return;
  if (Status s = WriteFrame(opt_.control_fd, schema::EncodeSessionMessage(m)); !s.ok()) {
    spdlog::warn("session process: the broker's channel: {}", s.ToString());
  }
}

void SessionHost::Impl::Usage(Session& s) {
  SessionMessage u;
  u.op = SessionOp::kUsage;
  u.session = s.id;
  u.size = s.held;
  Control(u);
}

int SessionHost::Impl::Run() {
  auto l = ListenStream(opt_.socket_path);
  if (!l.ok()) {
    spdlog::error("session process: {}", l.status().ToString());
    return 1;
  }
  listener_ = std::move(*l);
  spdlog::info("session process for tenant '{}' on {} listening at {}", opt_.tenant,
               device_->info().uuid, opt_.socket_path);
  std::thread watchdog([this] { Watchdog(); });
  struct Stop {
    Impl* impl;
    std::thread& thread;
    ~Stop() {
      {
        MutexLock lock(&impl->watch_mu_);
        impl->watch_stop_ = true;
        impl->watch_cv_.Signal();
      }
      thread.join();
    }
  } stop{this, watchdog};
  for (;;) {
    std::vector<pollfd> fds = {{opt_.control_fd, POLLIN, 0}, {wake_.get(), POLLIN, 0}};
    if (pending_.size() < kMaxPending) fds.push_back({listener_.get(), POLLIN, 0});
    const size_t first_pending = fds.size();
    for (auto& p : pending_) fds.push_back({p->fd.get(), POLLIN, 0});
    const int64_t now = NowNs();
    int64_t timeout_ms = pending_.empty() ? 1000 : 100;
    for (auto& [id, s] : sessions_) {
      if (s->stop.load() || s->unanswered.load() != 0) continue;
      const int64_t left = (s->last_ns.load() + s->idle.count() * 1000000 - now) / 1000000;
      timeout_ms = std::min(timeout_ms, std::max<int64_t>(left, 0));
    }
    if (poll(fds.data(), fds.size(), static_cast<int>(timeout_ms) + 1) < 0 && errno != EINTR) {
      spdlog::error("session process: poll: {}", strerror(errno));
      return 1;
    }
    if (fds[1].revents) {
      uint64_t n;
      (void)!read(wake_.get(), &n, sizeof n);
    }
    if (fds[0].revents) {
      Status st = control_reader_.Fill(opt_.control_fd);
      std::string frame;
      for (;;) {
        auto next = control_reader_.Next(&frame);
        if (!next.ok()) {
          st = next.status();
          break;
        }
        if (!*next) break;
        SessionMessage m;
        Status d = schema::DecodeSessionMessage(frame, schema::Limits{}, 64u << 20, &m);
        if (!d.ok()) {
          spdlog::error("session process: a bad message from the broker: {}", d.ToString());
          continue;
        }
        OnControl(m);
      }
      if (!st.ok()) {
        // The broker is gone, or done with this process: every session ends.
        {
          MutexLock lock(&control_mu_);
          broker_gone_ = true;
        }
        for (auto& [id, s] : sessions_) {
          End(*s, Code::kSessionLost, "the broker ended the session's process");
        }
        {
          // Sessions waiting for a kernel wait no more.
          MutexLock lock(&modules_mu_);
          modules_cv_.SignalAll();
        }
        while (!sessions_.empty()) {
          Reap();
          if (!sessions_.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
        (void)unlink(opt_.socket_path.c_str());
        return 0;
      }
    }
    if (first_pending > 2 && fds[2].revents) Accept();
    for (size_t i = fds.size(); i > first_pending; --i) {
      if (fds[i - 1].revents) OnPending(i - 1 - first_pending);
    }
    const int64_t later = NowNs();
    std::erase_if(pending_, [&](const std::unique_ptr<Pending>& p) {
      return later - p->since_ns > kHelloMs * 1000000;
    });
    for (auto& [id, s] : sessions_) {
      if (s->unanswered.load() == 0 && later - s->last_ns.load() >= s->idle.count() * 1000000) {
        End(*s, Code::kSessionLost,
            "idle for " + std::to_string(s->idle.count()) + " ms, its timeout");
      }
    }
    Reap();
  }
}

void SessionHost::Impl::OnControl(SessionMessage& m) {
  switch (m.op) {
    case SessionOp::kOpen:
      Open(m);
      return;
    case SessionOp::kEnd: {
      auto it = sessions_.find(m.session);
      if (it != sessions_.end()) End(*it->second, Code::kSessionLost, "closed through the broker");
      return;
    }
    case SessionOp::kModule:
      OnModule(m);
      return;
    default:
      spdlog::error("session process: the broker sent '{}', which it never sends",
                    schema::SessionOpName(m.op));
  }
}

void SessionHost::Impl::Open(const SessionMessage& m) {
  SessionMessage r;
  r.op = SessionOp::kOpened;
  r.session = m.session;
  if (sessions_.count(m.session) || m.session == 0) {
    r.code = Code::kInvalid;
    r.error = "session " + std::to_string(m.session) + " exists";
    Control(r);
    return;
  }
  auto s = std::make_unique<Session>();
  s->id = m.session;
  s->token = m.token;
  s->memory = m.memory;
  s->idle = std::chrono::milliseconds(m.idle_ms);
  s->limit = std::chrono::milliseconds(m.limit_ms);
  s->last_ns = NowNs();
  s->wake = UniqueFd(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  sessions_.emplace(m.session, std::move(s));
  {
    MutexLock lock(&ids_mu_);
    ids_.insert(m.session);
  }
  Control(r);
}

SessionMessage SessionHost::Impl::Attach(const SessionMessage& m, UniqueFd fd) {
  auto it = sessions_.find(m.session);
  if (it == sessions_.end() || !SameToken(it->second->token, m.token) ||
      it->second->stop.load()) {
    return ErrorReply(0, Error(Code::kNotFound, "no session " + std::to_string(m.session) +
                                                    " with that token here"));
  }
  Session& s = *it->second;
  if (!fd.valid()) {
    return ErrorReply(0, Error(Code::kInvalid, "an attach carries the region's memfd"));
  }
  if (m.size == 0) return ErrorReply(0, Error(Code::kInvalid, "a region is at least 1 byte"));
  {
    MutexLock lock(&s.attach_mu);
    std::erase_if(s.detached, [](const std::weak_ptr<Attached>& w) { return w.expired(); });
    uint64_t held = 0;  // detached, still pinned for copies not yet answered
    for (const std::weak_ptr<Attached>& w : s.detached) {
      if (auto a = w.lock()) held += a->size;
    }
    const std::string detached =
        s.detached.empty() ? ""
                           : " (" + std::to_string(s.detached.size()) +
                                 " of them detached, held by copies not yet answered)";
    if (s.attached.size() + s.detached.size() >= kMaxAttached) {
      return ErrorReply(0, Error(Code::kResourceExhausted,
                                 "the session has " + std::to_string(kMaxAttached) +
                                     " regions attached, its limit" + detached));
    }
    const uint64_t in_use = s.attached_bytes + held;
    if (in_use > opt_.max_attach || m.size > opt_.max_attach - in_use) {
      return ErrorReply(0, Error(Code::kResourceExhausted,
                                 "the session has " + std::to_string(in_use) +
                                     " bytes attached of its " + std::to_string(opt_.max_attach) +
                                     detached + "; " + std::to_string(m.size) + " more asked"));
    }
  }
  // Sealed as a region's must be: it can neither shrink under the mapping
  // (no SIGBUS here) nor change its seals.
  if (Status c = CheckSealedMemfd(fd.get(), m.size); !c.ok()) return ErrorReply(0, c);
  auto a = std::make_shared<Attached>();
  auto map = Mapping::Map(fd.get(), m.size);
  if (!map.ok()) return ErrorReply(0, map.status());
  a->map = std::move(*map);
  a->size = m.size;
  auto pinned = device_->Pin(a->map.data(), m.size);
  if (!pinned.ok()) return ErrorReply(0, pinned.status());
  a->pinned = std::move(*pinned);
  SessionMessage ok;
  ok.op = SessionOp::kDone;
  MutexLock lock(&s.attach_mu);
  ok.region = s.next_region++;
  s.attached_bytes += m.size;
  s.attached.emplace(ok.region, std::move(a));
  return ok;
}

StatusOr<std::shared_ptr<SessionHost::Impl::Attached>> SessionHost::Impl::AttachedRegion(
    Session& s, uint32_t region, uint64_t offset, uint64_t size) {
  std::shared_ptr<Attached> a;
  {
    MutexLock lock(&s.attach_mu);
    auto it = s.attached.find(region);
    if (it == s.attached.end()) {
      return Error(Code::kNotFound, "no region " + std::to_string(region) + " attached to this session");
    }
    a = it->second;
  }
  if (!InRange(offset, size, a->size)) {
    return Error(Code::kInvalid, "bytes [" + std::to_string(offset) + ", +" + std::to_string(size) +
                                     ") are outside region " + std::to_string(region) + " of " +
                                     std::to_string(a->size) + " bytes");
  }
  return a;
}

void SessionHost::Impl::Accept() {
  for (;;) {
    auto c = AcceptSeqpacket(listener_.get());  // any socket type: accept4
    if (!c.ok() || !c->valid()) return;
    // Blocking, for the session thread's writes; reads never wait
    // (FrameReader reads with MSG_DONTWAIT).
    (void)fcntl(c->get(), F_SETFL, fcntl(c->get(), F_GETFL) & ~O_NONBLOCK);
    pending_.push_back(std::make_unique<Pending>(std::move(*c), 4096));
    if (pending_.size() >= kMaxPending) return;
  }
}

void SessionHost::Impl::OnPending(size_t i) {
  Pending& p = *pending_[i];
  // A packet at a time: an attach carries its memfd with its bytes.
  Status st;
  auto packet = RecvPacket(p.fd.get(), 4096, /*dontwait=*/true);
  if (!packet.ok()) {
    st = packet.status();
  } else if (packet->eof) {
    st = Status(Code::kUnavailable, "the peer closed the connection");
  } else {
    p.reader.Append(packet->bytes);
    if (packet->fd.valid() && !p.passed.valid()) p.passed = std::move(packet->fd);
  }
  std::string frame;
  auto next = p.reader.Next(&frame);
  auto drop = [&] { pending_.erase(pending_.begin() + static_cast<std::ptrdiff_t>(i)); };
  if (!next.ok() || (!st.ok() && !*next)) {
    drop();
    return;
  }
  if (!*next) return;
  SessionMessage m;
  Status d = schema::DecodeSessionMessage(frame, schema::Limits{}, 0, &m);
  auto refuse = [&](const Status& why) {
    (void)WriteFrame(p.fd.get(), schema::EncodeSessionMessage(ErrorReply(0, why)));
    drop();
  };
  if (!d.ok()) return refuse(d);
  if (m.op == SessionOp::kAttach) {
    (void)WriteFrame(p.fd.get(), schema::EncodeSessionMessage(Attach(m, std::move(p.passed))));
    drop();
    return;
  }
  if (m.op != SessionOp::kHello) {
    return refuse(Error(Code::kInvalid, "a connection begins with hello (or attach)"));
  }
  auto it = sessions_.find(m.session);
  if (it == sessions_.end() || !SameToken(it->second->token, m.token) ||
      it->second->stop.load()) {
    return refuse(Error(Code::kNotFound, "no session " + std::to_string(m.session) +
                                             " with that token here"));
  }
  Session& s = *it->second;
  if (s.conn.valid()) {
    return refuse(Error(Code::kInvalid, "session " + std::to_string(s.id) +
                                            " has its client's connection already"));
  }
  auto stream = device_->NewStream();
  if (!stream.ok()) return refuse(stream.status());
  s.stream = std::move(*stream);
  s.conn = std::move(p.fd);
  s.reader = std::make_unique<FrameReader>(MaxFrame());
  // What came after the hello is the session's.
  s.reader->Append(p.reader.TakeRest());
  s.last_ns = NowNs();
  SessionMessage ok;
  ok.op = SessionOp::kDone;
  UniqueFd memfd;
  if (m.ring) {
    // Two rings and the end word's page in one sealed memfd, handed over
    // with the answer.
    auto fd = CreateSealedMemfd(ByteRing::PairBytes(kRingBytes), "gpuq-session-rings");
    auto map = fd.ok() ? Mapping::Map(fd->get(), ByteRing::PairBytes(kRingBytes))
                       : StatusOr<Mapping>(fd.status());
    Status word = map.ok() ? s.stream->UseEndWord(map->data() + ByteRing::EndPage(kRingBytes))
                           : map.status();
    if (!word.ok()) map = word;
    if (map.ok()) {
      s.rings = std::move(*map);
      s.in = ByteRing(s.rings.data(), kRingBytes);
      s.back = ByteRing(s.rings.data() + ByteRing::Bytes(kRingBytes), kRingBytes);
      ok.ring = kRingBytes;
      memfd = std::move(*fd);
    } else {
      spdlog::warn("session {}: no rings, the socket serves: {}", s.id, map.status().ToString());
    }
  }
  (void)SendPacket(s.conn.get(), schema::EncodeSessionFrame(ok), memfd.valid() ? memfd.get() : -1);
  drop();
  Session* raw = &s;
  s.watch_word = s.stream->WatchWord();
  s.thread = std::thread([this, raw] { Serve(raw); });
  MutexLock lock(&watch_mu_);
  watched_.push_back(raw);
}

void SessionHost::Impl::Serve(Session* sp) {
  Session& s = *sp;
  bool open = true;
  // The thread polls (its client and the GPU) for this long after each
  // request it takes and each answer it gives, then sleeps: --spin-us, and
  // at least kPollAfter, so that a client that sends its next request soon
  // after an answer (a request-and-answer loop) finds it awake and need not
  // wake it, as the CUDA runtime polls a while before it sleeps.
  const auto poll_for = std::max(opt_.spin, kPollAfter);
  auto spin_until = Clock::now() + poll_for;
  uint64_t answered = 0;
  while (!s.stop.load()) {
    if (doomed_.load(std::memory_order_relaxed)) {
      Tell(s);
      Park();
    }
    const uint64_t before = s.requests;
    if (open && Takes(s)) open = Read(s);
    const bool took = s.requests != before;
    // New requests first: launches are enqueued before the GPU is asked
    // what has ended (the answers come on a turn that took none, or once
    // kCompleteEvery wait: a client that never pauses still hears back).
    if ((!took || s.pending.size() >= kCompleteEvery) && !Complete(s, false)) return;
    // Answers given this turn or on the last (by a wait): poll on.
    if (took || s.answered != answered) {
      spin_until = Clock::now() + poll_for;
      answered = s.answered;
    }
    if (s.out.pending() && !FlushOut(s)) open = false;
    // The end word once no more requests are coming (one write for all that
    // came together), or every kAnnounceEvery while they keep coming.
    if (!took) Announce(s);
    if (s.stop.load()) break;
    if (!open) {
      if (s.pending.empty()) break;
      if (!Complete(s, true)) return;
      continue;
    }
    // Requests read and not yet decoded (the bound stopped them) go on as
    // soon as it lets them.
    if (Takes(s) && s.reader->HasFrame()) continue;
    // Polling: the socket or ring (Read, above) and the GPU (Complete) in
    // turn, one system call a turn on a socket.
    const bool spinning = Clock::now() < spin_until;
    if (spinning && !s.out.pending()) {
      CpuRelax();
      continue;
    }
    if (s.in.valid()) {
      // Rings: wait for the work ahead, for room for the answers, or for a
      // request; the socket only says whether the client is still there.
      // A request that waits counts as none while the bound holds it (its
      // client has not read its answers): the thread sleeps then too. The
      // work ahead is waited for only when its answers can go at once:
      // behind answers that wait for room, it is looked at again after a
      // short wait for room (Complete, at the top of the loop).
      const bool none = s.in.Readable() == 0 || !Takes(s);
      if (!s.pending.empty() && !s.out.pending()) {
        if (none && !Complete(s, true)) return;
        continue;
      }
      if (s.out.pending()) {
        if (none) s.back.WaitWritable(s.pending.empty() ? kRingSlice : kWorkSlice);
      } else if (s.in.Readable() == 0) {
        s.in.WaitReadable(kRingSlice);
      }
      if (none && !ClientThere(s)) open = false;
      continue;
    }
    // Nothing to take: wait for a request, for room for the answers, or
    // for the work ahead.
    pollfd fds[2] = {{s.conn.get(), 0, 0}, {s.wake.get(), POLLIN, 0}};
    if (Takes(s)) fds[0].events |= POLLIN;
    if (s.out.pending()) fds[0].events |= POLLOUT;
    // As with rings: the work ahead is waited for only when its answers can
    // go at once.
    const bool wait_work = !s.pending.empty() && !s.out.pending();
    const int timeout_ms = spinning || wait_work       ? 0
                           : !s.pending.empty()        ? static_cast<int>(kWorkSlice.count() / 1000)
                                                       : 1000;
    const int ready = poll(fds, 2, timeout_ms);
    if (ready == 0 && wait_work) {
      if (!Complete(s, true)) return;
    }
    if (fds[1].revents) {
      uint64_t n;
      (void)!read(s.wake.get(), &n, sizeof n);
    }
  }
  // Ending: what was asked is answered first.
  while (!s.pending.empty()) {
    if (!Complete(s, true)) return;
  }
  // For at most 10 s: a client that reads nothing holds only this thread.
  const int64_t until = NowNs() + 10000 * 1000000ll;
  while (s.out.pending() && NowNs() < until) {
    if (s.back.valid()) {
      if (!FlushOut(s)) break;
      if (s.out.pending()) s.back.WaitWritable(std::chrono::milliseconds(10));
      continue;
    }
    pollfd p{s.conn.get(), POLLOUT, 0};
    if (poll(&p, 1, 10) < 0 || !s.out.Flush(s.conn.get()).ok()) break;
  }
  if (!open) End(s, Code::kSessionLost, "its client's connection closed");
  s.finished = true;
  Wake();
}

bool SessionHost::Impl::FlushOut(Session& s) {
  if (!s.back.valid()) return s.out.Flush(s.conn.get()).ok();
  while (s.out.pending()) {
    const std::string_view w = s.out.Waiting();
    const size_t n = s.back.Write(w.data(), w.size());
    if (n == 0) break;
    s.out.Taken(n);
  }
  return true;
}

bool SessionHost::Impl::ClientThere(Session& s) {
  pollfd p{s.conn.get(), POLLIN, 0};
  if (poll(&p, 1, 0) <= 0) return true;
  // With rings, nothing comes on the socket: readable means closed.
  return false;
}

bool SessionHost::Impl::Read(Session& s) {
  Status st;
  if (s.in.valid()) {
    char chunk[65536];
    for (size_t n; s.reader->buffered() < MaxFrame() + 4 &&
                   (n = s.in.Read(chunk, sizeof chunk)) > 0;) {
      s.reader->Append(std::string_view(chunk, n));
    }
  } else {
    // At most a frame of the largest size (and its length) read ahead.
    st = s.reader->Fill(s.conn.get(), MaxFrame() + 4);
  }
  // Requests are decoded a group at a time, then handled in order: the
  // launches of a group reach the driver back to back.
  std::string frame;
  Status framing;
  auto& batch = s.batch;
  while (framing.ok() && !s.stop.load()) {
    batch.clear();
    uint64_t promised = 0;  // what the batch's requests will hold
    while (batch.size() < kBatch && Takes(s, promised)) {
      auto next = s.reader->Next(&frame);
      if (!next.ok()) {
        framing = next.status();
        break;
      }
      if (!*next) break;
      ++s.requests;
      auto& [decoded, m] = batch.emplace_back();
      decoded = schema::DecodeSessionMessage(frame, schema::Limits{}, opt_.max_data, &m);
      // A request that does not decode is answered as its own when its rid
      // can be read (rid 0 would say the session ended).
      if (!decoded.ok() && m.rid == 0) m.rid = schema::PeekRequestId(frame);
      if (decoded.ok()) promised += HostBytesOf(m);
    }
    if (batch.empty()) break;
    s.last_ns = NowNs();
    for (auto& [decoded, m] : batch) {
      if (doomed_.load()) break;  // the process ends (Serve tells its client why)
      if (!decoded.ok()) {
        // Its rid, read past what did not decode, is used up as a request's.
        if (m.rid > s.last_rid && m.rid - s.last_rid < (uint64_t{1} << 31)) s.last_rid = m.rid;
        Answer(s, m.rid, decoded);
        continue;
      }
      Handle(s, m);
      if (s.stop.load()) break;
    }
  }
  batch.clear();
  if (!framing.ok()) {
    Answer(s, 0, framing);
    End(s, Code::kSessionLost, "its client sent " + framing.message());
    return false;
  }
  if (s.enqueued - s.announced >= kAnnounceEvery) Announce(s);
  return s.stop.load() || st.ok();
}

bool SessionHost::Impl::Complete(Session& s, bool wait) {
  while (!s.pending.empty()) {
    Entry& e = s.pending.front();
    if (e.seq > s.done_through && !s.stream->Reached(e.seq)) {
      if (!wait) return true;
      Announce(s);
      const uint64_t through = s.enqueued;
      // While it waits, the watchdog may take the session over (Doom).
      if (doomed_.load()) {
        Tell(s);
        Park();
      }
      s.hold.store(kWaiting);
      const Status w = s.stream->Wait(e.seq);
      if (int waiting = kWaiting; !s.hold.compare_exchange_strong(waiting, kRunning)) {
        Park();  // taken over: its client has been told
      }
      if (doomed_.load()) {
        Tell(s);
        Park();
      }
      if (!w.ok()) {
        // A fault: the context is gone, and with it every session here. No
        // session of this process answers anything from now on.
        Status lost(Code::kSessionLost, "a kernel faulted: " + w.message());
        faulted_ = true;
        s.out.Push(schema::EncodeSessionMessage(ErrorReply(e.reply.rid, lost)));
        (void)FlushOut(s);
        if (s.back.valid()) s.back.Wake();
        Fault(lost);
        return false;
      }
      // Either the word reached it, or everything enqueued has ended.
      if (!s.stream->Reached(e.seq)) s.done_through = through;
    }
    if (e.mark) e.reply.kernel_ns = s.stream->Elapsed(*e.mark);
    if (e.read) e.reply.data = e.bytes.Take();
    for (HostBytes& o : e.outs) e.reply.outputs.push_back(o.Take());
    s.own -= e.own;
    if (faulted_.load()) return false;
    s.out.Push(schema::EncodeSessionMessage(e.reply));
    if (e.refused) --s.refused;
    s.holding -= e.host;
    s.pending.pop_front();
    s.unanswered.fetch_sub(1);
    ++s.answered;
    wait = false;
  }
  return true;
}

void SessionHost::Impl::Done(Session& s, uint64_t rid, Entry e) {
  e.seq = rid;
  s.enqueued = rid;
  e.reply.op = SessionOp::kDone;
  e.reply.rid = rid;
  Push(s, std::move(e));
}

void SessionHost::Impl::Handle(Session& s, SessionMessage& m) {
  const uint64_t rid = m.rid;
  if (rid == 0) return Answer(s, 0, Error(Code::kMalformed, "rid must be at least 1"));
  // Past the previous rid, by less than 2^31: the end word compares the low
  // 32 bits (serial arithmetic).
  if (rid <= s.last_rid || rid - s.last_rid >= (uint64_t{1} << 31)) {
    return Answer(s, rid, Error(Code::kMalformed, "rid " + std::to_string(rid) +
                                                      " is not past the previous request's, " +
                                                      std::to_string(s.last_rid) +
                                                      ", by less than 2^31"));
  }
  s.last_rid = rid;
  // A launch's end still due goes before this request's work (a launch's
  // start stands for it: Launch).
  if (m.op != SessionOp::kLaunch) Watch(s);
  auto buffer = [&](uint32_t h, uint64_t offset, uint64_t size) -> StatusOr<Buffer> {
    auto it = s.buffers.find(h);
    if (it == s.buffers.end()) {
      return Error(Code::kNotFound, "no buffer " + std::to_string(h) + " in this session");
    }
    if (!InRange(offset, size, it->second.size)) {
      return Error(Code::kInvalid, "bytes [" + std::to_string(offset) + ", +" +
                                       std::to_string(size) + ") are outside buffer " +
                                       std::to_string(h) + " of " +
                                       std::to_string(it->second.size) + " bytes");
    }
    return it->second;
  };
  // A write or read naming a range of an attached region: the GPU copies
  // between it and the buffer; the copy holds the region until answered.
  auto region_copy = [&](bool into_buffer) {
    auto a = AttachedRegion(s, m.region, m.region_offset, m.size);
    if (!a.ok()) return Answer(s, rid, a.status());
    auto b = buffer(m.buffer, m.offset, m.size);
    if (!b.ok()) return Answer(s, rid, b.status());
    char* host = (*a)->map.data() + m.region_offset;
    Status c = into_buffer ? s.stream->CopyIn(b->ptr + m.offset, host, m.size)
                           : s.stream->CopyOut(host, b->ptr + m.offset, m.size);
    if (!c.ok()) return Answer(s, rid, c);
    Entry e;
    e.hold = std::move(*a);
    Done(s, rid, std::move(e));
  };
  switch (m.op) {
    case SessionOp::kAlloc: {
      if (m.size == 0) return Answer(s, rid, Error(Code::kInvalid, "a buffer is at least 1 byte"));
      // Its launches' own buffers count until they are answered.
      const uint64_t charged = Charged(m.size);
      if (s.held + s.own > s.memory || charged > s.memory - s.held - s.own) {
        return Answer(s, rid, Error(Code::kResourceExhausted,
                                    "the session holds " + std::to_string(s.held + s.own) +
                                        " of its " + std::to_string(s.memory) + " bytes (" +
                                        std::to_string(s.own) + " in launches' own buffers); " +
                                        std::to_string(charged) + " more asked (" +
                                        std::to_string(m.size) + " rounded up to 512)"));
      }
      if (s.buffers.size() >= opt_.max_buffers) {
        return Answer(s, rid, Error(Code::kResourceExhausted,
                                    "the session holds " + std::to_string(s.buffers.size()) +
                                        " buffers, the most it may"));
      }
      const uint32_t h = next_buffer_.fetch_add(1);
      if (h == 0 || s.buffers.count(h)) {
        return Answer(s, rid, Error(Code::kResourceExhausted, "buffer handles ran out"));
      }
      auto p = s.stream->Alloc(m.size, /*zeroed=*/true);
      if (!p.ok()) return Answer(s, rid, p.status());
      s.buffers[h] = Buffer{*p, m.size};
      s.held += charged;
      Entry e;
      e.reply.buffer = h;
      Done(s, rid, std::move(e));
      Usage(s);
      return;
    }
    case SessionOp::kDetach: {
      // The region goes when the last copy that uses it is answered (each
      // holds it); its handle is refused from now on.
      MutexLock lock(&s.attach_mu);
      auto it = s.attached.find(m.region);
      if (it == s.attached.end()) {
        return Answer(s, rid, Error(Code::kNotFound, "no region " + std::to_string(m.region) +
                                                         " attached to this session"));
      }
      s.attached_bytes -= it->second->size;
      s.detached.push_back(it->second);  // counted while copies hold it
      s.attached.erase(it);
      Done(s, rid);
      return;
    }
    case SessionOp::kFree: {
      auto b = buffer(m.buffer, 0, 0);
      if (!b.ok()) return Answer(s, rid, b.status());
      s.stream->Free(b->ptr);
      s.held -= Charged(b->size);
      s.buffers.erase(m.buffer);
      Done(s, rid);
      Usage(s);
      return;
    }
    case SessionOp::kWrite: {
      if (m.region != 0) return region_copy(/*into_buffer=*/true);
      auto b = buffer(m.buffer, m.offset, m.data.size());
      if (!b.ok()) return Answer(s, rid, b.status());
      Entry e;
      const uint64_t n = m.data.size();
      e.bytes = Bytes(s, m.data);
      if (Status w = s.stream->CopyIn(b->ptr + m.offset, e.bytes.data(), n); !w.ok()) {
        return Answer(s, rid, w);
      }
      Done(s, rid, std::move(e));
      return;
    }
    case SessionOp::kRead: {
      if (m.region != 0) return region_copy(/*into_buffer=*/false);
      if (m.size > opt_.max_data) {
        return Answer(s, rid, Error(Code::kTooLarge, "a read is at most " +
                                                         std::to_string(opt_.max_data) +
                                                         " bytes"));
      }
      auto b = buffer(m.buffer, m.offset, m.size);
      if (!b.ok()) return Answer(s, rid, b.status());
      Entry e;
      e.read = true;
      e.bytes = Bytes(s, m.size);
      if (Status r = s.stream->CopyOut(e.bytes.data(), b->ptr + m.offset, m.size); !r.ok()) {
        return Answer(s, rid, r);
      }
      Done(s, rid, std::move(e));
      return;
    }
    case SessionOp::kCopy: {
      auto dst = buffer(m.buffer, m.offset, m.size);
      if (!dst.ok()) return Answer(s, rid, dst.status());
      auto src = buffer(m.src, m.src_offset, m.size);
      if (!src.ok()) return Answer(s, rid, src.status());
      if (m.size > 0) {
        if (Status c = s.stream->Copy(dst->ptr + m.offset, src->ptr + m.src_offset, m.size);
            !c.ok()) {
          return Answer(s, rid, c);
        }
      }
      Done(s, rid);
      return;
    }
    case SessionOp::kFill: {
      auto b = buffer(m.buffer, m.offset, m.size);
      if (!b.ok()) return Answer(s, rid, b.status());
      if (m.size > 0) {
        if (Status f = s.stream->Fill(b->ptr + m.offset, static_cast<uint8_t>(m.value), m.size);
            !f.ok()) {
          return Answer(s, rid, f);
        }
      }
      Done(s, rid);
      return;
    }
    case SessionOp::kLaunch:
      Launch(s, m);
      return;
    case SessionOp::kClose:
      // Answered after the broker has heard that it ended (Reap): a client
      // that opens another at once finds its limits as they are.
      s.close_rid = rid;
      End(s, Code::kOk, "closed by its client");
      return;
    default:
      return Answer(s, rid, Error(Code::kUnknownCommand,
                                  "'" + std::string(schema::SessionOpName(m.op)) +
                                      "' is not a request a client makes"));
  }
}

StatusOr<std::shared_ptr<SessionKernel>> SessionHost::Impl::Kernel(Session& s,
                                                                   const schema::KernelSpec& k,
                                                                   const std::string& key) {
  MutexLock lock(&modules_mu_);
  auto it = modules_.find(key);
  if (it == modules_.end()) {
    // Compiled once by the broker's compile service (its cache and its
    // sandbox), loaded here once.
    it = modules_.emplace(key, Module{}).first;
    module_order_.push_back(key);
    SessionMessage c;
    c.op = SessionOp::kCompile;
    c.rid = next_rid_++;
    c.kernel = k;
    compiling_[c.rid] = key;
    Control(c);
  }
  // Counted while it waits: neither the eviction nor another waiter takes
  // the entry (a failure told to the first waiter only left the others
  // saying their session had ended).
  ++it->second.waiters;
  bool doomed = false;
  for (;;) {
    auto m = modules_.find(key);
    if (m == modules_.end() || m->second.ready || s.stop.load()) break;
    // The run-time limit's end (Doom) does not wake this wait: look.
    if (doomed_.load()) {
      doomed = true;
      break;
    }
    (void)modules_cv_.WaitUntil(Clock::now() + std::chrono::milliseconds(20));
  }
  it = modules_.find(key);
  if (it != modules_.end()) --it->second.waiters;
  if (doomed) return Error(Code::kSessionLost, "the session's process is ending");
  if (it == modules_.end() || !it->second.ready) {
    return Error(Code::kUnavailable, "the session ended while its kernel compiled");
  }
  Module& mod = it->second;
  if (!mod.failed.ok()) {
    // Failures are not kept: a later launch asks again (the broker's cache
    // answers a failed compile at once). The last waiter drops it.
    Status failed = mod.failed;
    if (mod.waiters == 0) {
      modules_.erase(it);
      std::erase(module_order_, key);
    }
    return failed;
  }
  return mod.kernel;
}

void SessionHost::Impl::Launch(Session& s, SessionMessage& m) {
  StatusOr<std::shared_ptr<SessionKernel>> kernel = s.last_kernel;
  uint32_t ref = 0;  // the handle the answer gives, for a kernel named by source
  if (m.kernel_ref != 0) {
    if (m.kernel_ref > s.kernels.size()) {
      return Answer(s, m.rid, Error(Code::kNotFound, "no kernel " + std::to_string(m.kernel_ref) +
                                                         " in this session"));
    }
    kernel = s.kernels[m.kernel_ref - 1];
  } else if (s.last_kernel && m.kernel == s.last_spec) {
    ref = s.last_ref;
  } else {
    const std::string key = KernelKey(m.kernel);
    if (auto known = s.kernel_refs.find(key); known != s.kernel_refs.end()) {
      ref = known->second;
      kernel = s.kernels[ref - 1];
    } else {
      Watch(s);  // a compile may take a while
      kernel = Kernel(s, m.kernel, key);
      if (!kernel.ok()) return Answer(s, m.rid, kernel.status());
      if (s.kernels.size() < kMaxKernelRefs) {
        s.kernels.push_back(*kernel);
        ref = static_cast<uint32_t>(s.kernels.size());
        s.kernel_refs.emplace(key, ref);
      }
    }
    s.last_spec = m.kernel;
    s.last_kernel = *kernel;
    s.last_ref = ref;
  }
  if (Status c = device_->CheckLaunch(**kernel, m.launch, m.args); !c.ok()) {
    return Answer(s, m.rid, c);
  }
  std::vector<uint64_t>& slots = s.slots;
  std::vector<void*>& params = s.params;
  slots.resize(m.args.size());
  params.resize(m.args.size());
  bool own = false;  // buffers of its own (in, inout, out, scratch)
  for (size_t i = 0; i < m.args.size(); ++i) {
    const schema::Arg& a = m.args[i];
    params[i] = &slots[i];
    if (a.kind == schema::ArgKind::kScalar) {
      slots[i] = a.bits;
      continue;
    }
    if (a.kind != schema::ArgKind::kBuffer) {
      own = true;
      continue;
    }
    auto b = s.buffers.find(a.buffer);
    if (b == s.buffers.end()) {
      return Answer(s, m.rid, Error(Code::kNotFound, "argument " + std::to_string(i) +
                                                         ": no buffer " +
                                                         std::to_string(a.buffer) +
                                                         " in this session"));
    }
    if (a.offset > b->second.size) {
      return Answer(s, m.rid, Error(Code::kInvalid, "argument " + std::to_string(i) +
                                                        ": offset " + std::to_string(a.offset) +
                                                        " is past buffer " +
                                                        std::to_string(a.buffer) + "'s end"));
    }
    slots[i] = b->second.ptr + a.offset;
  }
  Entry e;
  std::vector<uint64_t> own_ptrs;
  if (own) {
    Watch(s);  // the end still due goes before the copies in
    if (Status o = OwnBuffers(s, m, &e, &own_ptrs); !o.ok()) return Answer(s, m.rid, o);
  }
  // The launch's own buffers go once the copies of their outputs have run.
  auto free_own = [&] {
    for (uint64_t p : own_ptrs) s.stream->Free(p);
  };
  // The run-time limit's marks (Session::limit): the start right before
  // the kernel (standing for an end still due), the end right after it
  // when copies follow (a copy into pageable memory may hold this thread
  // until the kernel ends), else put off.
  uint32_t start = 0;
  if (s.limit.count() > 0) {
    start = s.next_mark;
    s.next_mark += 2;
    // On an idle stream (its last mark, an end, has passed, and the end
    // word says everything sent has run) the kernel starts at once: the
    // mark before it stands for its start, and no write is needed.
    const uint32_t sent = s.mark_sent.load(std::memory_order_relaxed);
    if (s.watch_due == 0 && (sent & 1) == 0 &&
        std::atomic_ref<const uint32_t>(*s.watch_word).load(std::memory_order_acquire) == sent &&
        s.stream->Reached(s.enqueued)) {
      s.idle_after.store(sent, std::memory_order_release);
    } else {
      s.watch_due = 0;
      Mark(s, start);
    }
  }
  auto mark = s.stream->Launch(**kernel, m.launch, params, !m.untimed);
  if (!mark.ok()) {
    if (start) Mark(s, start + 1);
    free_own();
    return Answer(s, m.rid, mark.status());
  }
  if (start && own) {
    Mark(s, start + 1);
  } else if (start) {
    s.watch_due = start + 1;
  }
  for (size_t i = 0; own && i < m.args.size(); ++i) {
    const schema::Arg& a = m.args[i];
    if (a.kind != schema::ArgKind::kOut && a.kind != schema::ArgKind::kInOut) continue;
    const uint64_t size = s.own_sizes[i];  // an inout's input has moved
    HostBytes h = Bytes(s, size);
    if (size > 0) {
      if (Status c = s.stream->CopyOut(h.data(), slots[i], size); !c.ok()) {
        // The launch was sent: its answer waits for the stream as any
        // does (the copies sent keep their bytes until then).
        free_own();
        s.own += e.own;
        e.reply = ErrorReply(m.rid, c.WithContext("argument " + std::to_string(i)));
        e.refused = true;
        ++s.refused;
        e.seq = m.rid;
        s.enqueued = m.rid;
        return Push(s, std::move(e));
      }
    }
    e.outs.push_back(std::move(h));
  }
  free_own();
  s.own += e.own;
  e.mark = std::move(*mark);
  e.reply.kernel_ref = ref;
  Done(s, m.rid, std::move(e));
}

Status SessionHost::Impl::OwnBuffers(Session& s, SessionMessage& m, Entry* e,
                                     std::vector<uint64_t>* ptrs) {
  using schema::ArgKind;
  auto size_of = [&](const schema::Arg& a) -> uint64_t {
    if (a.kind == ArgKind::kIn || a.kind == ArgKind::kInOut) return m.inputs[a.frame].size();
    return a.kind == ArgKind::kOut || a.kind == ArgKind::kScratch ? a.size : 0;
  };
  // Sizes are bounded by the decoder (each by the largest buffer, at most
  // max_args of them): their sums do not overflow.
  uint64_t bytes = 0, out = 0;
  s.own_sizes.resize(m.args.size());
  for (size_t i = 0; i < m.args.size(); ++i) {
    const schema::Arg& a = m.args[i];
    s.own_sizes[i] = size_of(a);
    bytes += s.own_sizes[i];
    if (a.kind == ArgKind::kOut || a.kind == ArgKind::kInOut) out += s.own_sizes[i];
  }
  if (s.held + s.own > s.memory || bytes > s.memory - s.held - s.own) {
    return Error(Code::kResourceExhausted,
                 "the session holds " + std::to_string(s.held + s.own) + " of its " +
                     std::to_string(s.memory) + " bytes (" + std::to_string(s.own) +
                     " in launches' own buffers); this launch's own buffers need " +
                     std::to_string(bytes) + " more");
  }
  if (out > opt_.max_data) {
    return Error(Code::kTooLarge, "a launch's outputs are at most " +
                                      std::to_string(opt_.max_data) + " bytes in all; " +
                                      std::to_string(out) + " asked");
  }
  for (size_t i = 0; i < m.args.size(); ++i) {
    const schema::Arg& a = m.args[i];
    if (a.kind == ArgKind::kScalar || a.kind == ArgKind::kBuffer) continue;
    const uint64_t size = s.own_sizes[i];
    s.slots[i] = 0;  // an empty buffer: a null pointer
    if (size == 0) continue;
    // In and inout: the copy fills it whole. Out and scratch: zeros.
    const bool copied = a.kind == ArgKind::kIn || a.kind == ArgKind::kInOut;
    auto p = s.stream->Alloc(size, /*zeroed=*/!copied);
    Status st = p.status();
    if (p.ok()) {
      ptrs->push_back(*p);
      s.slots[i] = *p;
      if (copied) {
        HostBytes h = Bytes(s, m.inputs[a.frame]);
        st = s.stream->CopyIn(*p, h.data(), size);
        e->ins.push_back(std::move(h));
      }
    }
    if (!st.ok()) {
      for (uint64_t q : *ptrs) s.stream->Free(q);
      ptrs->clear();
      e->ins.clear();
      return st.WithContext("argument " + std::to_string(i));
    }
  }
  e->own = bytes;
  return Status::Ok();
}

void SessionHost::Impl::OnModule(SessionMessage& m) {
  std::string key;
  {
    MutexLock lock(&modules_mu_);
    auto c = compiling_.extract(m.rid);
    if (c.empty() || !modules_.count(c.mapped())) return;
    key = c.mapped();
  }
  // Loaded (and unloaded, below) without the lock: the driver's module
  // calls wait for a kernel that runs, and the sessions waiting for other
  // kernels must not wait behind them, nor see the run-time limit's end
  // wait (Kernel).
  Status failed;
  std::shared_ptr<SessionKernel> kernel;
  if (m.code != Code::kOk) {
    failed = Status(m.code, m.error);
  } else if (auto k = device_->Load(m.image, m.image_kind, m.symbol); k.ok()) {
    kernel = std::move(*k);
  } else {
    failed = k.status();
  }
  std::vector<std::shared_ptr<SessionKernel>> dropped;  // unloaded after the lock
  MutexLock lock(&modules_mu_);
  if (auto it = modules_.find(key); it != modules_.end()) {
    it->second.ready = true;
    it->second.failed = failed;
    it->second.kernel = std::move(kernel);
  }
  // Kernels no session holds are dropped, oldest first, past their count
  // or past the device memory their modules take; those held (by a
  // session, as its last kernel or by a handle), compiling or waited for
  // keep their place, to be dropped once let go (they were forgotten here,
  // and stayed loaded for the life of the process).
  uint64_t loaded = 0;
  for (const auto& [k, mod] : modules_) {
    if (mod.kernel) loaded += mod.kernel->device_bytes;
  }
  const uint64_t budget = opt_.module_budget;
  for (auto at = module_order_.begin();
       (module_order_.size() > opt_.max_modules || (budget && loaded > budget)) &&
       at != module_order_.end();) {
    auto old = modules_.find(*at);
    if (old == modules_.end()) {
      at = module_order_.erase(at);
      continue;
    }
    const Module& mod = old->second;
    if (mod.ready && mod.waiters == 0 && mod.kernel.use_count() <= 1) {
      if (mod.kernel) loaded -= mod.kernel->device_bytes;
      dropped.push_back(std::move(old->second.kernel));
      modules_.erase(old);
      at = module_order_.erase(at);
      continue;
    }
    ++at;
  }
  // The modules of kernels that sessions hold are device memory outside
  // every session's buffers: a kernel that does not fit beside them is
  // refused (its waiters are told, and a later launch asks again).
  if (auto it = modules_.find(key); budget && loaded > budget && it != modules_.end() &&
                                     it->second.kernel) {
    const uint64_t bytes = it->second.kernel->device_bytes;
    it->second.failed = Status(
        Code::kResourceExhausted,
        "the kernel's module takes " + std::to_string(bytes) +
            " bytes of device memory when loaded; the tenant's kernels loaded on this GPU "
            "that sessions hold take " + std::to_string(loaded - bytes) + " of the " +
            std::to_string(budget) +
            " bytes their modules may (a session lets go of its kernels when it ends)");
    dropped.push_back(std::move(it->second.kernel));
  }
  modules_cv_.SignalAll();
}

void SessionHost::Impl::End(Session& s, Code code, std::string why) {
  {
    MutexLock lock(&s.mu);
    if (s.ending) return;
    s.ending = true;
    s.end_code = code;
    s.end_why = std::move(why);
  }
  s.stop = true;
  uint64_t one = 1;
  (void)!write(s.wake.get(), &one, sizeof one);
  if (s.in.valid()) s.in.Wake();
  {
    MutexLock lock(&modules_mu_);
    modules_cv_.SignalAll();
  }
  Wake();
}

void SessionHost::Impl::Reap() {
  for (auto it = sessions_.begin(); it != sessions_.end();) {
    Session& s = *it->second;
    // A session whose client never came ends here; one with a thread once
    // its thread has answered what it was asked.
    if (!s.stop.load() || (s.thread.joinable() && !s.finished.load())) {
      ++it;
      continue;
    }
    {
      MutexLock lock(&watch_mu_);  // before its stream (and watch word) go
      std::erase(watched_, &s);
    }
    if (s.thread.joinable()) s.thread.join();
    if (s.stream) {
      // Its work is done: its memory goes back, in stream order.
      for (auto& [h, b] : s.buffers) s.stream->Free(b.ptr);
      s.buffers.clear();
      s.pending.clear();  // what they hold of the stream goes before it
      s.holding = 0;
      s.stream.reset();   // after its work has ended
    }
    Code code;
    std::string why;
    {
      MutexLock lock(&s.mu);
      code = s.end_code;
      why = s.end_why;
    }
    bool through = true;  // the client takes what is sent (else no more waits for it)
    if (s.conn.valid() && code != Code::kOk) through = Last(s, ErrorReply(0, Status(code, why)));
    SessionMessage ended;
    ended.op = SessionOp::kEnded;
    ended.session = s.id;
    ended.code = code;
    ended.error = why;
    Control(ended);
    if (s.conn.valid() && s.close_rid && through) {
      SessionMessage done;
      done.op = SessionOp::kDone;
      done.rid = s.close_rid;
      Last(s, done);
    }
    spdlog::info("session {} ended: {}", s.id, why);
    {
      MutexLock lock(&ids_mu_);
      ids_.erase(s.id);
    }
    it = sessions_.erase(it);
  }
}

bool SessionHost::Impl::Last(Session& s, const SessionMessage& m) {
  if (!s.back.valid()) {
    // After the answers still waiting (a frame is never cut by another),
    // for at most 200 ms: a client (or the broker's relay for one) that
    // reads nothing does not hold this thread, which serves the tenant's
    // other sessions too; the socket's close then tells it the rest.
    s.out.Push(schema::EncodeSessionMessage(m));
    const int64_t until = NowNs() + 200 * 1000000ll;
    while (s.out.Flush(s.conn.get()).ok() && s.out.pending()) {
      const int64_t left_ms = (until - NowNs()) / 1000000;
      pollfd p{s.conn.get(), POLLOUT, 0};
      if (left_ms <= 0 || poll(&p, 1, static_cast<int>(left_ms)) <= 0) return false;
    }
    return !s.out.pending();
  }
  // Into the ring if it has room (the client may have stopped reading);
  // the socket's close then tells the client to read what is left.
  s.out.Push(schema::EncodeSessionMessage(m));
  (void)FlushOut(s);
  if (s.back.valid()) s.back.Wake();
  return true;
}

void SessionHost::Impl::Watchdog() {
  MutexLock lock(&watch_mu_);
  while (!watch_stop_) {
    int64_t next_ms = 100;
    const int64_t now = NowNs();
    for (Session* sp : watched_) {
      Session& s = *sp;
      if (s.limit.count() == 0 || s.finished.load()) continue;
      // A look every tenth of the limit (at most 100 ms apart).
      next_ms = std::min<int64_t>(next_ms, std::clamp<int64_t>(s.limit.count() / 10, 1, 100));
      const uint32_t word = std::atomic_ref<const uint32_t>(*s.watch_word).load(
          std::memory_order_acquire);
      if ((word & 1) == 0 && word != s.idle_after.load(std::memory_order_acquire)) {
        s.watch_since_ns = 0;  // no launch runs
        continue;
      }
      // Odd (or the mark before a launch sent to an idle stream): that
      // launch runs (the write before it passed, the one after it has
      // not), since no later than the watchdog first saw the word so.
      // While its end has not been enqueued (put off for a moment), it
      // cannot be told from a launch that ended: no verdict until it has.
      if (s.watch_since_ns == 0 || word != s.watch_seen) {
        s.watch_seen = word;
        s.watch_since_ns = now;
      } else if (now - s.watch_since_ns >= s.limit.count() * 1000000 &&
                 s.mark_sent.load(std::memory_order_acquire) != word) {
        Doom(Status(Code::kSessionLost,
                    "a launch ran past its session's run-time limit of " +
                        std::to_string(s.limit.count()) +
                        " ms (the kill of a session process ends its tenant's sessions on "
                        "that GPU)"));
      }
    }
    (void)watch_cv_.WaitUntil(Clock::now() + std::chrono::milliseconds(next_ms));
  }
}

void SessionHost::Impl::Doom(const Status& why) {
  spdlog::error("session process for tenant '{}': {}", opt_.tenant, why.ToString());
  {
    MutexLock lock(&doom_mu_);
    doom_ = why;
  }
  doomed_ = true;
  // Each session's client hears why: from its thread, at its next turn, or
  // from here, once its thread waits on the GPU (where the launch that ran
  // too long keeps it). A thread that does neither within the grace (one
  // blocked in another call to the driver) leaves its client to learn of
  // the end from its connection's close.
  const auto grace = Clock::now() + std::chrono::milliseconds(200);
  for (;;) {
    bool all = true;
    for (Session* sp : watched_) {
      Session& s = *sp;
      if (s.finished.load() || s.told.load()) continue;
      if (int waiting = kWaiting; s.hold.compare_exchange_strong(waiting, kTaken)) {
        Tell(s);
        continue;
      }
      if (s.hold.load() == kTaken) continue;
      all = false;
      uint64_t one = 1;
      (void)!write(s.wake.get(), &one, sizeof one);
    }
    if (all || Clock::now() > grace) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  Fault(why, kExitTimeout);
  __builtin_unreachable();
}

void SessionHost::Impl::Tell(Session& s) {
  Status why;
  {
    MutexLock lock(&doom_mu_);
    why = doom_;
  }
  s.out.Push(schema::EncodeSessionMessage(ErrorReply(0, why)));
  (void)FlushOut(s);
  if (s.back.valid()) s.back.Wake();
  s.told = true;
}

void SessionHost::Impl::Fault(const Status& why, int exit_code) NO_THREAD_SAFETY_ANALYSIS {
  fault_mu_.Lock();  // the first thread to come ends the process; never unlocked
  spdlog::error("session process for tenant '{}': {}; its sessions end", opt_.tenant,
                why.ToString());
  std::set<uint64_t> ids;
  {
    MutexLock lock(&ids_mu_);
    ids = ids_;
  }
  for (uint64_t id : ids) {
    SessionMessage ended;
    ended.op = SessionOp::kEnded;
    ended.session = id;
    ended.code = Code::kSessionLost;
    ended.error = why.message();
    Control(ended);
  }
  (void)unlink(opt_.socket_path.c_str());
  // Session threads may be blocked on a dead context: the process ends
  // without waiting for them.
  spdlog::shutdown();
  _exit(exit_code);
}

int SessionProcessMain(int argc, char** argv, const OpenSessionDevice& open) {
  CLI::App app{"A session process of gpuqd: one tenant's sessions on one GPU"};
  SessionHostOptions o;
  std::string uuid;
  uint64_t spin_us = 0, max_data_mb = 256, max_attach_mb = 4096;
  app.add_option("--control-fd", o.control_fd, "the broker's control channel")->required();
  app.add_option("--socket", o.socket_path, "where the tenant's clients connect")->required();
  app.add_option("--tenant", o.tenant, "whose sessions these are");
  app.add_option("--device", uuid, "the GPU's UUID")->required();
  app.add_option("--spin-us", spin_us, "completion threads poll this long before sleeping");
  app.add_option("--max-data-mb", max_data_mb, "a write's or a read's bytes, at most");
  app.add_option("--max-attach-mb", max_attach_mb, "host memory a session may attach");
  app.add_option("--max-kernels", o.max_modules, "kernels kept loaded, oldest unheld dropped")
      ->check(CLI::Range(size_t{1}, size_t{1} << 20));
  app.add_option("--max-buffers", o.max_buffers, "buffers a session holds at once")
      ->check(CLI::Range(size_t{1}, size_t{1} << 24));
  uint64_t kernels_mib = o.module_budget >> 20;
  app.add_option("--kernels-memory-mib", kernels_mib,
                 "device memory the loaded kernels' modules may take in all, held by sessions or "
                 "not (MiB; 0: no limit)")
      ->check(CLI::Range(uint64_t{0}, uint64_t{1} << 30));
  ModuleBounds bounds;
  uint64_t module_mib = bounds.module_bytes >> 20, local_mib = bounds.local_bytes >> 20;
  app.add_option("--module-memory-mib", module_mib,
                 "device memory a module may take when loaded (MiB; 0: no limit)")
      ->check(CLI::Range(uint64_t{0}, uint64_t{1} << 30));
  app.add_option("--local-memory-mib", local_mib,
                 "local memory a kernel may need over all the threads the GPU holds (MiB; 0: "
                 "no limit)")
      ->check(CLI::Range(uint64_t{0}, uint64_t{1} << 30));
  CLI11_PARSE(app, argc, argv);
  bounds.module_bytes = module_mib << 20;
  bounds.local_bytes = local_mib << 20;
  o.module_budget = kernels_mib << 20;
  o.max_attach = max_attach_mb << 20;
  o.spin = std::chrono::microseconds(spin_us);
  o.max_data = static_cast<size_t>(max_data_mb) << 20;
  auto device = open(uuid, o.spin, bounds);
  if (!device.ok()) {
    spdlog::error("session process: {}", device.status().ToString());
    return kExitNoDevice;
  }
  SessionHost host(std::move(o), std::move(*device));
  return host.Run();
}

}  // namespace gpuq::worker
