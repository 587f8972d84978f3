#include "schema/region_channel.h"

#include "schema/codec.h"
#include "schema/filename.h"
#include "util/unix_socket.h"

namespace gpuq::schema {

StatusOr<UniqueFd> ConnectRegionChannel(const std::string& local_dir, const std::string& token) {
  auto sock = ConnectSeqpacket(RegionSocketPath(local_dir));
  if (!sock.ok()) return sock.status();
  RegionMessage hello;
  hello.op = RegionOp::kHello;
  hello.protocol = std::string(kRegionProtocol);
  hello.worker = !token.empty();
  hello.token = token;
  if (Status s = SendRegionMessage(sock->get(), hello); !s.ok()) return s;
  return std::move(*sock);
}

Status SendRegionMessage(int sock, const RegionMessage& m, int pass) {
  return SendPacket(sock, EncodeRegionMessage(m), pass);
}

StatusOr<bool> ReadRegionMessage(int sock, bool dontwait, RegionMessage* m, UniqueFd* fd) {
  auto p = RecvPacket(sock, kMaxRegionMessageBytes, dontwait);
  if (!p.ok()) return p.status();
  if (p->none) return false;
  if (p->eof) return Status(Code::kUnavailable, "the broker closed the region channel");
  if (Status s = DecodeRegionMessage(p->bytes, Limits{}, m); !s.ok()) return s;
  *fd = std::move(p->fd);
  return true;
}

}  // namespace gpuq::schema
