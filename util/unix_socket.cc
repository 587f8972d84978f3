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

StatusOr<UniqueFd> ListenSeqpacket(const std::string& path) {
  GPUQ_ASSIGN_OR_RETURN(sockaddr_un a, Address(path));
  UniqueFd s(socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
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

StatusOr<UniqueFd> ConnectSeqpacket(const std::string& path) {
  GPUQ_ASSIGN_OR_RETURN(sockaddr_un a, Address(path));
  UniqueFd s(socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!s.valid()) return Errno("socket");
  if (connect(s.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    return Errno("connecting to " + path);
  }
  return s;
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
