// gpuq::Session (include/gpuq/client.h; PROTOCOL.md, "Sessions"): the
// client's end of a session's direct channel.
#include <poll.h>
#include <sys/socket.h>

#include <string.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <set>
#include <zmq_addon.hpp>

#include "client/connection.h"
#include "gpuq/client.h"
#include "schema/codec.h"
#include "util/cpu_relax.h"
#include "util/sealed_memfd.h"
#include "util/shm_ring.h"
#include "util/unix_socket.h"

namespace gpuq {

using schema::ClientOp;
using schema::ClientReply;
using schema::ClientRequest;
using schema::ReplyOp;
using schema::SessionMessage;
using schema::SessionOp;

class Session::Impl {
 public:
  uint64_t id = 0;
  std::string device, path, token;  // where it is, and its token (attach)
  UniqueFd fd;
  std::chrono::milliseconds timeout{10000};
  std::chrono::microseconds spin{0};
  uint64_t rid = 0;
  FrameReader reader{size_t{1} << 32};
  std::map<uint64_t, SessionMessage> early;  // answers read before they were asked for
  Status lost;  // once the session has ended under us
  bool closed = false;
  // The shared-memory rings (PROTOCOL.md, "Sessions"), when the session's
  // process gave them: requests go out in `out`, answers come in `in`.
  Mapping rings;
  ByteRing out, in;
  // With the rings, the end word: the GPU writes the rid of the latest
  // request whose work has ended (PROTOCOL.md, "Sessions").
  uint32_t* ended = nullptr;
  std::set<uint64_t> untimed;  // launches sent untimed: the word tells their end
  std::set<uint64_t> skip;     // answers to drop: the word told their end
  // Through the broker (PROTOCOL.md, "Sessions through the broker"): each
  // request a session_call on this connection of the session's own, each
  // answer the call's reply. (The socket goes before its context.)
  std::unique_ptr<zmq::context_t> zctx;
  zmq::socket_t relay;
  bool relayed() const { return relay.handle() != nullptr; }
  // Kernels this client launched by source, and the handles the session
  // gave them: later launches of one name it by handle (PROTOCOL.md,
  // "Sessions"). `naming`: the launch whose answer brings the handle.
  struct Known {
    schema::KernelSpec spec;
    uint32_t ref = 0;
    uint64_t naming = 0;
  };
  std::vector<Known> kernels;
  size_t naming = 0;  // kernels waiting for their handle
  static constexpr size_t kMaxKnown = 64;
  static constexpr std::chrono::microseconds kSlice{20000};

  // Sends a request. While the socket cannot take it, the answers that
  // come are read (the session's process never waits on a client that is
  // itself waiting to send).
  StatusOr<uint64_t> Send(SessionMessage m) {
    if (!lost.ok()) return lost;
    m.rid = ++rid;
    if (relayed()) {
      ClientRequest call;
      call.op = ClientOp::kSessionCall;
      call.rid = m.rid;  // the call's reply is this request's answer
      call.id = id;
      call.token = token;
      const std::string body = schema::EncodeSessionMessage(m);
      if (Status s = client_internal::SendRequest(relay, schema::EncodeClientRequest(call), {body});
          !s.ok()) {
        return Lose(s.WithContext("to the broker"));
      }
      return m.rid;
    }
    const std::string frame = schema::EncodeSessionFrame(m);
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (size_t done = 0; done < frame.size();) {
      if (out.valid()) {
        // Into the ring; while it is full, answers are taken (the session's
        // process may be waiting for room for them).
        done += out.Write(frame.data() + done, frame.size() - done);
        if (done < frame.size()) GPUQ_RETURN_IF_ERROR(RingWait(deadline));
        continue;
      }
      const ssize_t w = send(fd.get(), frame.data() + done, frame.size() - done,
                             MSG_NOSIGNAL | MSG_DONTWAIT);
      if (w > 0) {
        done += static_cast<size_t>(w);
        continue;
      }
      if (w < 0 && errno == EINTR) continue;
      if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        pollfd p{fd.get(), POLLIN | POLLOUT, 0};
        if (poll(&p, 1, static_cast<int>(timeout.count())) == 0) {
          return Lose(Status(Code::kTimeout, "the session's process takes no requests"));
        }
        if (p.revents & POLLIN) {
          if (Status r = Fill(); !r.ok() && !lost.ok()) return lost;
        }
        continue;
      }
      // Why it ended may be waiting to be read.
      (void)Fill();
      return Lose(Status(Code::kSessionLost,
                         std::string("the session's process is gone: ") + strerror(errno)));
    }
    return m.rid;
  }

  // With rings, while a request waits for room: takes answers, then sleeps
  // a slice.
  Status RingWait(std::chrono::steady_clock::time_point deadline) {
    GPUQ_RETURN_IF_ERROR(Fill());
    if (!lost.ok()) return lost;
    if (std::chrono::steady_clock::now() > deadline) {
      return Lose(Status(Code::kTimeout, "the session's process takes no requests"));
    }
    if (out.Writable() == 0) out.WaitWritable(kSlice);
    return Status::Ok();
  }

  Status Lose(Status why) {
    if (lost.ok()) lost = std::move(why);
    fd.Reset();
    if (relayed()) relay.close();
    return lost;
  }

  // Waits up to `ms` for something to read; false when nothing came.
  bool Readable(int64_t ms) {
    if (relayed()) {
      zmq::pollitem_t item = {relay.handle(), 0, ZMQ_POLLIN, 0};
      try {
        return zmq::poll(&item, 1, std::chrono::milliseconds(ms)) > 0;
      } catch (const zmq::error_t&) {
        return true;  // EINTR: look again
      }
    }
    pollfd p{fd.get(), POLLIN, 0};
    return poll(&p, 1, static_cast<int>(ms)) != 0;
  }

  // The answer to request `want`.
  StatusOr<SessionMessage> Answer(uint64_t want) {
    for (;;) {
      if (auto it = early.find(want); it != early.end()) {
        SessionMessage m = std::move(it->second);
        early.erase(it);
        if (m.op == SessionOp::kError) return Status(m.code, m.error);
        return m;
      }
      if (!lost.ok()) return lost;
      if (spin.count() > 0) {
        // Reads without waiting, one system call a turn, for a while.
        const auto spin_until = std::chrono::steady_clock::now() + spin;
        for (uint32_t turn = 1; !early.count(want) && lost.ok() &&
                                std::chrono::steady_clock::now() < spin_until;
             ++turn) {
          // The rings cost no system call; the socket (is the process
          // there?) is asked every 1024 turns.
          GPUQ_RETURN_IF_ERROR(Fill(!in.valid() || turn % 1024 == 0));
          CpuRelax();
        }
        if (early.count(want) || !lost.ok()) continue;
      }
      if (in.valid()) {
        const auto deadline = std::chrono::steady_clock::now() + timeout;
        while (!early.count(want) && lost.ok()) {
          if (std::chrono::steady_clock::now() > deadline) {
            return Status(Code::kTimeout, "no answer from the session in " +
                                              std::to_string(timeout.count()) + " ms");
          }
          if (in.Readable() == 0) in.WaitReadable(kSlice);
          GPUQ_RETURN_IF_ERROR(Fill());
        }
        continue;
      }
      if (!Readable(timeout.count())) {
        return Status(Code::kTimeout, "no answer from the session in " +
                                          std::to_string(timeout.count()) + " ms");
      }
      GPUQ_RETURN_IF_ERROR(Fill());
    }
  }

  // Whether the end word has reached request `rid` (serial arithmetic).
  bool Reached(uint64_t rid) const { return ByteRing::Reached(ended, rid); }

  // The end of untimed launch `want`: from the end word while spinning,
  // else from its answer. A refusal is in the ring before the word passes
  // its request, so the ring is read once more when the word has.
  StatusOr<SessionMessage> Ended(uint64_t want) {
    untimed.erase(want);
    if (!ended || spin.count() == 0) return Answer(want);
    const auto spin_until = std::chrono::steady_clock::now() + spin;
    for (uint32_t turn = 1;; ++turn) {
      if (early.count(want) || !lost.ok()) return Answer(want);
      if (Reached(want)) {
        GPUQ_RETURN_IF_ERROR(Fill(false));
        if (early.count(want) || !lost.ok()) return Answer(want);
        skip.insert(want);
        SessionMessage m;
        m.op = SessionOp::kDone;
        m.rid = want;
        return m;
      }
      if (turn % 256 == 0) {
        GPUQ_RETURN_IF_ERROR(Fill(turn % 4096 == 0));  // a fault's answer; the process there
        if (std::chrono::steady_clock::now() > spin_until) return Answer(want);
      }
      CpuRelax();
    }
  }

  // Takes what the socket holds, and every whole answer in it. With the
  // rings, `socket` also asks whether the process is still there.
  Status Fill(bool socket = true) {
    if (relayed()) return FillFromBroker();
    if (!fd.valid()) return lost;
    Status st;
    if (in.valid()) {
      char chunk[65536];
      size_t took = 0;
      for (size_t n; (n = in.Read(chunk, sizeof chunk)) > 0; took += n) {
        reader.Append(std::string_view(chunk, n));
      }
      if (took == 0 && socket) {
        // Nothing in the ring: is the session's process still there? (Its
        // socket carries nothing once the rings are up: readable is closed.)
        pollfd p{fd.get(), POLLIN, 0};
        if (poll(&p, 1, 0) > 0) {
          for (size_t n; (n = in.Read(chunk, sizeof chunk)) > 0;) {
            reader.Append(std::string_view(chunk, n));
          }
          st = Status(Code::kUnavailable, "the peer closed the connection");
        }
      }
    } else {
      st = reader.Fill(fd.get());
    }
    std::string frame;
    for (;;) {
      auto next = reader.Next(&frame);
      if (!next.ok()) return Lose(Status(Code::kMalformed, next.status().message()));
      if (!*next) break;
      GPUQ_RETURN_IF_ERROR(Take(frame));
    }
    if (!st.ok()) {
      return Lose(Status(Code::kSessionLost, "the session's process ended (a kernel fault or a "
                                             "kill there ends its tenant's sessions on that "
                                             "GPU): " + st.message()));
    }
    return Status::Ok();
  }

  // One answer from the session's process.
  Status Take(std::string_view frame) {
    SessionMessage m;
    if (Status d = schema::DecodeSessionMessage(frame, schema::Limits{}, UINT32_MAX, &m);
        !d.ok()) {
      return Lose(Status(Code::kMalformed, "the session's process sent " + d.message()));
    }
    if (m.op == SessionOp::kError && m.rid == 0) return Lose(Status(m.code, m.error));
    Keep(std::move(m));
    return Status::Ok();
  }

  void Keep(SessionMessage m) {
    if (naming > 0) {
      for (Known& k : kernels) {
        if (k.naming != m.rid) continue;
        k.ref = m.kernel_ref;  // 0 (none given): the next launch names it again
        k.naming = 0;
        --naming;
        break;
      }
    }
    if (skip.erase(m.rid)) return;
    early[m.rid] = std::move(m);
  }

  // Through the broker: every reply waiting, each a call's answer (the
  // process's, relayed) or the broker's refusal of it.
  Status FillFromBroker() {
    if (!lost.ok()) return lost;
    for (;;) {
      std::vector<zmq::message_t> frames;
      try {
        if (!zmq::recv_multipart(relay, std::back_inserter(frames), zmq::recv_flags::dontwait)) {
          return Status::Ok();
        }
      } catch (const zmq::error_t& e) {
        if (e.num() == EINTR) continue;
        return Lose(Status(Code::kUnavailable, std::string("the broker: ") + e.what()));
      }
      if (frames.size() < 2 ||
          !schema::CheckProtocolFrame(frames[0].to_string_view(), schema::kClientProtocol).ok()) {
        continue;
      }
      std::vector<uint64_t> sizes;
      for (size_t i = 2; i < frames.size(); ++i) sizes.push_back(frames[i].size());
      ClientReply r;
      if (Status d = schema::DecodeClientReply(frames[1].to_string_view(), sizes,
                                               schema::Limits{}, &r);
          !d.ok()) {
        return Lose(Status(Code::kMalformed, "the broker sent " + d.message()));
      }
      if (r.op == ReplyOp::kSessionAnswer) {
        GPUQ_RETURN_IF_ERROR(Take(frames[2].to_string_view()));
        continue;
      }
      if (r.op != ReplyOp::kError || r.rid == 0) continue;
      // The broker's refusal of this call: of the call alone (a request it
      // does not relay, or not now), else of the session, which this client
      // can no longer reach (not_found: the broker no longer knows it).
      SessionMessage m;
      m.op = SessionOp::kError;
      m.rid = r.rid;
      m.code = r.code == Code::kNotFound ? Code::kSessionLost : r.code;
      m.error = std::move(r.error);
      const bool own = m.code == Code::kMalformed || m.code == Code::kTooLarge ||
                       m.code == Code::kResourceExhausted || m.code == Code::kUnknownCommand;
      if (!own && lost.ok()) lost = Status(m.code, m.error);
      Keep(std::move(m));
    }
  }

  StatusOr<SessionMessage> Call(SessionMessage m) {
    GPUQ_ASSIGN_OR_RETURN(uint64_t r, Send(std::move(m)));
    return Answer(r);
  }
};

Session::Session(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Session::~Session() { (void)Close(); }
uint64_t Session::id() const { return impl_->id; }
const std::string& Session::device() const { return impl_->device; }

StatusOr<std::unique_ptr<Session>> Session::Connect(uint64_t id, const std::string& device,
                                                    const std::string& path,
                                                    const std::string& token,
                                                    std::chrono::milliseconds timeout,
                                                    std::chrono::microseconds spin) {
  auto impl = std::make_unique<Impl>();
  impl->id = id;
  impl->device = device;
  impl->path = path;
  impl->token = token;
  impl->timeout = timeout;
  impl->spin = spin;
  auto fd = ConnectStream(path);
  if (!fd.ok()) {
    return Status(Code::kUnavailable, "the session's process: " + fd.status().message());
  }
  impl->fd = std::move(*fd);
  SessionMessage hello;
  hello.op = SessionOp::kHello;
  hello.protocol = std::string(schema::kSessionProtocol);
  hello.session = id;
  hello.token = token;
  hello.ring = 1;  // the shared-memory rings, please
  GPUQ_RETURN_IF_ERROR(WriteFrame(impl->fd.get(), schema::EncodeSessionMessage(hello)));
  // The answer, with the rings' memfd when they come: read as one packet
  // (nothing else is on the socket yet), then its frame.
  pollfd p{impl->fd.get(), POLLIN, 0};
  if (poll(&p, 1, static_cast<int>(timeout.count())) == 0) {
    return Status(Code::kTimeout, "no answer from the session's process");
  }
  auto packet = RecvPacket(impl->fd.get(), 4096);
  if (!packet.ok()) return packet.status();
  if (packet->eof) return Status(Code::kUnavailable, "the session's process closed the connection");
  impl->reader.Append(packet->bytes);
  GPUQ_RETURN_IF_ERROR(impl->Fill());  // the rest of the frame, if it came apart
  GPUQ_ASSIGN_OR_RETURN(SessionMessage ok, impl->Answer(0));
  if (ok.ring > 0 && packet->fd.valid()) {
    if ((ok.ring & (ok.ring - 1)) != 0 || ok.ring < 4096 || ok.ring > (64u << 20)) {
      return Status(Code::kMalformed, "the session's rings are not a power of two");
    }
    const uint64_t bytes = ByteRing::PairBytes(ok.ring);
    GPUQ_RETURN_IF_ERROR(CheckSealedMemfd(packet->fd.get(), bytes));
    GPUQ_ASSIGN_OR_RETURN(impl->rings, Mapping::Map(packet->fd.get(), bytes));
    impl->out = ByteRing(impl->rings.data(), ok.ring);
    impl->in = ByteRing(impl->rings.data() + ByteRing::Bytes(ok.ring), ok.ring);
    impl->ended = reinterpret_cast<uint32_t*>(impl->rings.data() + ByteRing::EndPage(ok.ring));
  }
  return std::unique_ptr<Session>(new Session(std::move(impl)));
}

StatusOr<std::unique_ptr<Session>> Session::ConnectThroughBroker(
    uint64_t id, const std::string& device, const std::string& token, const std::string& endpoint,
    const ClientOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->id = id;
  impl->device = device;
  impl->token = token;
  impl->timeout = options.timeout;
  impl->spin = options.spin;
  impl->zctx = std::make_unique<zmq::context_t>(1);
  GPUQ_ASSIGN_OR_RETURN(impl->relay,
                        client_internal::ConnectDealer(*impl->zctx, endpoint, options, 's'));
  return std::unique_ptr<Session>(new Session(std::move(impl)));
}

StatusOr<uint32_t> Session::Alloc(uint64_t size) {
  SessionMessage m;
  m.op = SessionOp::kAlloc;
  m.size = size;
  GPUQ_ASSIGN_OR_RETURN(SessionMessage r, impl_->Call(std::move(m)));
  return r.buffer;
}

Status Session::Free(uint32_t buffer) {
  SessionMessage m;
  m.op = SessionOp::kFree;
  m.buffer = buffer;
  return impl_->Call(std::move(m)).status();
}

namespace {

// A message's bytes (msgpack bin) are at most 4 GiB - 1: more were cut to
// their size modulo 4 GiB, and the request went out whole-looking.
Status CheckBin(uint64_t size, const char* what) {
  if (size <= UINT32_MAX) return Status::Ok();
  return Status(Code::kTooLarge, std::string(what) + " of " + std::to_string(size) +
                                     " bytes: a session request carries at most " +
                                     std::to_string(UINT32_MAX));
}

}  // namespace

StatusOr<uint64_t> Session::WriteAsync(uint32_t buffer, uint64_t offset, const void* data,
                                       size_t size) {
  GPUQ_RETURN_IF_ERROR(CheckBin(size, "a write"));
  SessionMessage m;
  m.op = SessionOp::kWrite;
  m.buffer = buffer;
  m.offset = offset;
  m.data.assign(static_cast<const char*>(data), size);
  return impl_->Send(std::move(m));
}

Status Session::Write(uint32_t buffer, uint64_t offset, const void* data, size_t size) {
  GPUQ_ASSIGN_OR_RETURN(uint64_t t, WriteAsync(buffer, offset, data, size));
  return Wait(t).status();
}

StatusOr<uint64_t> Session::ReadAsync(uint32_t buffer, uint64_t offset, uint64_t size) {
  SessionMessage m;
  m.op = SessionOp::kRead;
  m.buffer = buffer;
  m.offset = offset;
  m.size = size;
  return impl_->Send(std::move(m));
}

StatusOr<std::string> Session::WaitRead(uint64_t ticket) {
  GPUQ_ASSIGN_OR_RETURN(SessionMessage r, impl_->Answer(ticket));
  return std::move(r.data);
}

StatusOr<std::string> Session::Read(uint32_t buffer, uint64_t offset, uint64_t size) {
  GPUQ_ASSIGN_OR_RETURN(uint64_t t, ReadAsync(buffer, offset, size));
  return WaitRead(t);
}

Status Session::Copy(uint32_t dst, uint64_t dst_offset, uint32_t src, uint64_t src_offset,
                     uint64_t size) {
  SessionMessage m;
  m.op = SessionOp::kCopy;
  m.buffer = dst;
  m.offset = dst_offset;
  m.src = src;
  m.src_offset = src_offset;
  m.size = size;
  return impl_->Call(std::move(m)).status();
}

Status Session::Fill(uint32_t buffer, uint64_t offset, uint64_t size, uint8_t value) {
  SessionMessage m;
  m.op = SessionOp::kFill;
  m.buffer = buffer;
  m.offset = offset;
  m.size = size;
  m.value = value;
  return impl_->Call(std::move(m)).status();
}

StatusOr<uint64_t> Session::LaunchAsync(const SessionLaunch& launch) {
  for (const auto& in : launch.inputs) GPUQ_RETURN_IF_ERROR(CheckBin(in.size(), "an input"));
  SessionMessage m;
  m.op = SessionOp::kLaunch;
  m.launch = launch.launch;
  m.args = launch.args;
  m.untimed = !launch.timed;
  m.inputs.assign(launch.inputs.begin(), launch.inputs.end());
  // Outputs come in the answer: its end from the word would not carry them.
  const bool outputs = std::any_of(launch.args.begin(), launch.args.end(), [](const schema::Arg& a) {
    return a.kind == schema::ArgKind::kOut || a.kind == schema::ArgKind::kInOut;
  });
  auto& kernels = impl_->kernels;
  Impl::Known* known = nullptr;
  for (auto& k : kernels) {
    if (k.spec == launch.kernel) {
      known = &k;
      break;
    }
  }
  if (known && known->ref != 0) {
    m.kernel_ref = known->ref;  // by handle: none of its source travels
  } else {
    m.kernel = launch.kernel;
    if (!known && kernels.size() < Impl::kMaxKnown) known = &kernels.emplace_back(Impl::Known{launch.kernel});
  }
  const bool names = known && known->ref == 0 && known->naming == 0;
  GPUQ_ASSIGN_OR_RETURN(uint64_t t, impl_->Send(std::move(m)));
  if (names) {
    known->naming = t;
    ++impl_->naming;
  }
  if (!launch.timed && impl_->ended && !outputs) impl_->untimed.insert(t);
  return t;
}

StatusOr<uint64_t> Session::Wait(uint64_t ticket) { return Wait(ticket, nullptr); }

StatusOr<uint64_t> Session::Wait(uint64_t ticket, std::vector<std::string>* outputs) {
  if (outputs) outputs->clear();
  if (impl_->untimed.count(ticket)) {
    GPUQ_RETURN_IF_ERROR(impl_->Ended(ticket).status());
    return uint64_t{0};
  }
  GPUQ_ASSIGN_OR_RETURN(SessionMessage r, impl_->Answer(ticket));
  if (outputs) *outputs = std::move(r.outputs);
  return r.kernel_ns;
}

StatusOr<uint64_t> Session::Launch(const SessionLaunch& launch) {
  return Launch(launch, nullptr);
}

StatusOr<uint64_t> Session::Launch(const SessionLaunch& launch,
                                   std::vector<std::string>* outputs) {
  GPUQ_ASSIGN_OR_RETURN(uint64_t t, LaunchAsync(launch));
  return Wait(t, outputs);
}

StatusOr<uint32_t> Session::Attach(const Region& region) {
  if (!impl_->lost.ok()) return impl_->lost;
  if (region.fd_ < 0) return Status(Code::kInvalid, "the region has no memfd");
  if (impl_->relayed()) {
    return Status(Code::kUnavailable, "a session reached through the broker attaches no "
                                      "regions: they need a client on the GPU's host, "
                                      "connected directly");
  }
  // A connection of its own, whose first message carries the memfd.
  auto fd = ConnectStream(impl_->path);
  if (!fd.ok()) {
    return Status(Code::kUnavailable, "the session's process: " + fd.status().message());
  }
  SessionMessage m;
  m.op = SessionOp::kAttach;
  m.protocol = std::string(schema::kSessionProtocol);
  m.session = impl_->id;
  m.token = impl_->token;
  m.size = region.size();
  GPUQ_RETURN_IF_ERROR(SendPacket(fd->get(), schema::EncodeSessionFrame(m), region.fd_));
  // Pinning takes a while for a large region (milliseconds per GiB).
  pollfd p{fd->get(), POLLIN, 0};
  if (poll(&p, 1, static_cast<int>(std::max<int64_t>(impl_->timeout.count(), 60000))) <= 0) {
    return Status(Code::kTimeout, "no answer from the session's process to the attach");
  }
  auto frame = ReadFrame(fd->get(), 1 << 20);
  if (!frame.ok()) return frame.status();
  SessionMessage r;
  GPUQ_RETURN_IF_ERROR(schema::DecodeSessionMessage(*frame, schema::Limits{}, 0, &r));
  if (r.op == SessionOp::kError) return Status(r.code, r.error);
  if (r.op != SessionOp::kDone || r.region == 0) {
    return Status(Code::kMalformed, "the session's process answered the attach without a region");
  }
  return r.region;
}

StatusOr<uint64_t> Session::WriteFromAsync(uint32_t buffer, uint64_t offset, uint32_t region,
                                           uint64_t region_offset, uint64_t size) {
  if (region == 0) return Status(Code::kInvalid, "no region 0: Attach gives handles from 1");
  SessionMessage m;
  m.op = SessionOp::kWrite;
  m.buffer = buffer;
  m.offset = offset;
  m.region = region;
  m.region_offset = region_offset;
  m.size = size;
  return impl_->Send(std::move(m));
}

Status Session::WriteFrom(uint32_t buffer, uint64_t offset, uint32_t region,
                          uint64_t region_offset, uint64_t size) {
  GPUQ_ASSIGN_OR_RETURN(uint64_t t, WriteFromAsync(buffer, offset, region, region_offset, size));
  return Wait(t).status();
}

StatusOr<uint64_t> Session::ReadIntoAsync(uint32_t buffer, uint64_t offset, uint64_t size,
                                          uint32_t region, uint64_t region_offset) {
  if (region == 0) return Status(Code::kInvalid, "no region 0: Attach gives handles from 1");
  SessionMessage m;
  m.op = SessionOp::kRead;
  m.buffer = buffer;
  m.offset = offset;
  m.size = size;
  m.region = region;
  m.region_offset = region_offset;
  return impl_->Send(std::move(m));
}

Status Session::ReadInto(uint32_t buffer, uint64_t offset, uint64_t size, uint32_t region,
                         uint64_t region_offset) {
  GPUQ_ASSIGN_OR_RETURN(uint64_t t, ReadIntoAsync(buffer, offset, size, region, region_offset));
  return Wait(t).status();
}

Status Session::Detach(uint32_t region) {
  SessionMessage m;
  m.op = SessionOp::kDetach;
  m.region = region;
  return impl_->Call(std::move(m)).status();
}

Status Session::Close() {
  if (impl_->closed) return Status::Ok();
  if (!impl_->fd.valid() && !impl_->relayed()) return impl_->lost;
  SessionMessage m;
  m.op = SessionOp::kClose;
  Status s = impl_->Call(std::move(m)).status();
  impl_->fd.Reset();
  if (impl_->relayed()) impl_->relay.close();
  impl_->closed = true;
  if (impl_->lost.ok()) impl_->lost = Status(Code::kSessionLost, "the session is closed");
  return s;
}

}  // namespace gpuq
