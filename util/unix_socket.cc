#include "util/unix_socket.h"

#include "util/status.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <vector>

namespace gpuq {
namespace {

Status Errno(const std::string& what, int err = errno) {
  return Status(err == EAGAIN || err == EWOULDBLOCK ? Code::kUnavailable : Code::kIoError,
                what + ": " + strerror(err));
}

StatusOr<sockaddr_un> Address(const std::string& path) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof a.sun_path) {
    return Status(Code::kInvalid, "socket path '" + path + "' is empty or longer than " +
                                      std::to_string(sizeof a.sun_path - 1) + " bytes");
  }
  memcpy(a.sun_path, path.data(), path.size());
  return a;
}

}  // namespace

namespace {
StatusOr<UniqueFd> Listen(const std::string& path, int type) {
  GPUQ_ASSIGN_OR_RETURN(sockaddr_un a, Address(path));
  UniqueFd s(socket(AF_UNIX, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!s.valid()) return Errno("socket");
  (void)unlink(path.c_str());
  if (bind(s.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    return Errno("binding " + path);
  }
  // Only the owner may connect (the process's umask is left alone: other
  // threads create files meanwhile).
  if (chmod(path.c_str(), 0600) != 0) return Errno("chmod " + path);
  if (listen(s.get(), 64) != 0) return Errno("listening on " + path);
  return s;
}

StatusOr<UniqueFd> Connect(const std::string& path, int type) {
  GPUQ_ASSIGN_OR_RETURN(sockaddr_un a, Address(path));
  UniqueFd s(socket(AF_UNIX, type | SOCK_CLOEXEC, 0));
  if (!s.valid()) return Errno("socket");
  if (connect(s.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    return Errno("connecting to " + path);
  }
  return s;
}
}  // namespace

StatusOr<UniqueFd> ListenSeqpacket(const std::string& path) {
  return Listen(path, SOCK_SEQPACKET);
}
StatusOr<UniqueFd> ConnectSeqpacket(const std::string& path) {
  return Connect(path, SOCK_SEQPACKET);
}
StatusOr<UniqueFd> ListenStream(const std::string& path) { return Listen(path, SOCK_STREAM); }
StatusOr<UniqueFd> ConnectStream(const std::string& path) { return Connect(path, SOCK_STREAM); }

void AppendFrame(std::string* out, std::string_view body) {
  const uint32_t n = static_cast<uint32_t>(body.size());
  const char len[4] = {static_cast<char>(n), static_cast<char>(n >> 8),
                       static_cast<char>(n >> 16), static_cast<char>(n >> 24)};
  out->append(len, 4);
  out->append(body);
}

Status WriteFrame(int sock, std::string_view bytes) {
  if (bytes.size() > UINT32_MAX) return Status(Code::kTooLarge, "a frame is at most 4 GiB");
  std::string frame;
  AppendFrame(&frame, bytes);
  for (size_t done = 0; done < frame.size();) {
    ssize_t w = send(sock, frame.data() + done, frame.size() - done, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      return Errno("writing a frame");
    }
    done += static_cast<size_t>(w);
  }
  return Status::Ok();
}

namespace {
Status ReadAll(int sock, char* p, size_t n, bool* eof) {
  while (n > 0) {
    ssize_t r = recv(sock, p, n, 0);
    if (r == 0) {
      *eof = true;
      return Status(Code::kUnavailable, "the peer closed the connection");
    }
    if (r < 0) {
      if (errno == EINTR) continue;
      return Errno("reading a frame");
    }
    p += r;
    n -= static_cast<size_t>(r);
  }
  return Status::Ok();
}
}  // namespace

StatusOr<std::string> ReadFrame(int sock, size_t max) {
  unsigned char len[4];
  bool eof = false;
  GPUQ_RETURN_IF_ERROR(ReadAll(sock, reinterpret_cast<char*>(len), 4, &eof));
  const size_t n = len[0] | (len[1] << 8) | (len[2] << 16) | (size_t{len[3]} << 24);
  if (n > max) {
    return Status(Code::kTooLarge, "a frame of " + std::to_string(n) +
                                       " bytes is over the limit of " + std::to_string(max));
  }
  std::string out(n, '\0');
  GPUQ_RETURN_IF_ERROR(ReadAll(sock, out.data(), n, &eof));
  return out;
}

Status FrameReader::Fill(int sock, size_t max_buffered) {
  char chunk[65536];
  while (buffered() < max_buffered) {
    ssize_t r = recv(sock, chunk, sizeof chunk, MSG_DONTWAIT);
    if (r == 0) return Status(Code::kUnavailable, "the peer closed the connection");
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return Status::Ok();
      return Errno("reading");
    }
    buf_.append(chunk, static_cast<size_t>(r));
    // A frame's length is known once 4 bytes are in: stop taking bytes past
    // a frame over the limit (Next() reports it).
    if (buf_.size() >= 4 && FrameLength() > max_) return Status::Ok();
    if (static_cast<size_t>(r) < sizeof chunk) return Status::Ok();
  }
  return Status::Ok();
}

size_t FrameReader::FrameLength() const {
  const auto* b = reinterpret_cast<const unsigned char*>(buf_.data()) + pos_;
  return b[0] | (b[1] << 8) | (b[2] << 16) | (size_t{b[3]} << 24);
}

StatusOr<bool> FrameReader::Next(std::string* frame) {
  if (buf_.size() - pos_ < 4) return false;
  const size_t n = FrameLength();
  if (n > max_) {
    return Status(Code::kTooLarge, "a frame of " + std::to_string(n) +
                                       " bytes is over the limit of " + std::to_string(max_));
  }
  if (buf_.size() - pos_ - 4 < n) return false;
  frame->assign(buf_, pos_ + 4, n);
  pos_ += 4 + n;
  if (pos_ == buf_.size()) {
    buf_.clear();
    pos_ = 0;
  } else if (pos_ > (1u << 20)) {
    buf_.erase(0, pos_);
    pos_ = 0;
  }
  return true;
}

void FrameWriter::Push(std::string_view bytes) { AppendFrame(&buf_, bytes); }

Status FrameWriter::Flush(int sock) {
  while (pos_ < buf_.size()) {
    ssize_t w = send(sock, buf_.data() + pos_, buf_.size() - pos_, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      return Errno("writing");
    }
    pos_ += static_cast<size_t>(w);
  }
  Compact();
  return Status::Ok();
}

void FrameWriter::Compact() {
  if (pos_ == buf_.size()) {
    buf_.clear();
    pos_ = 0;
  } else if (pos_ > (1u << 20) && pos_ >= buf_.size() / 2) {
    // At least half taken: the move costs no more than what was taken.
    buf_.erase(0, pos_);
    pos_ = 0;
  }
}

StatusOr<UniqueFd> AcceptSeqpacket(int listener) {
  UniqueFd c(accept4(listener, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
  if (!c.valid()) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNABORTED) return UniqueFd();
    return Errno("accept");
  }
  return c;
}

Status SendPacket(int sock, std::string_view bytes, int pass, bool dontwait) {
  iovec iov{const_cast<char*>(bytes.data()), bytes.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  if (pass >= 0) {
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &pass, sizeof(int));
  }
  for (;;) {
    const ssize_t n = sendmsg(sock, &msg, MSG_NOSIGNAL | (dontwait ? MSG_DONTWAIT : 0));
    if (n >= 0) return Status::Ok();
    if (errno != EINTR) return Errno("sending on the region channel");
  }
}

StatusOr<Packet> RecvPacket(int sock, size_t max, bool dontwait) {
  Packet p;
  std::vector<char> buf(max + 1);
  iovec iov{buf.data(), buf.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  // Room for a few descriptors, so that extra ones are received (and closed)
  // rather than left in flight.
  alignas(cmsghdr) char control[CMSG_SPACE(4 * sizeof(int))] = {};
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  ssize_t n;
  for (;;) {
    n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | (dontwait ? MSG_DONTWAIT : 0));
    if (n >= 0 || errno != EINTR) break;
  }
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      p.none = true;
      return p;
    }
    if (errno == ECONNRESET) {
      p.eof = true;
      return p;
    }
    return Errno("receiving on the region channel");
  }
  std::vector<UniqueFd> fds;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < count; ++i) {
      int fd;
      memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
      fds.emplace_back(fd);
    }
  }
  if (n == 0 && fds.empty()) {
    p.eof = true;
    return p;
  }
  if ((msg.msg_flags & MSG_CTRUNC) || fds.size() > 1) {
    return Status(Code::kMalformed, "a region channel message carries at most one descriptor");
  }
  if ((msg.msg_flags & MSG_TRUNC) || static_cast<size_t>(n) > max) {
    return Status(Code::kTooLarge, "a region channel message is over " + std::to_string(max) +
                                       " bytes");
  }
  p.bytes.assign(buf.data(), static_cast<size_t>(n));
  if (!fds.empty()) p.fd = std::move(fds[0]);
  return p;
}

}  // namespace gpuq
