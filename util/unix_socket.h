// Unix seqpacket sockets that pass file descriptors (SCM_RIGHTS): the region
// channel between clients, the broker and its local workers (PROTOCOL.md,
// "Regions"). Each packet is one message; a descriptor travels with it.
#pragma once

#include <string>
#include <string_view>

#include "gpuq/status.h"
#include "util/fd.h"

namespace gpuq {

// A socket bound at `path` (a stale socket file there is replaced) and
// listening, non-blocking, mode 0600.
StatusOr<UniqueFd> ListenSeqpacket(const std::string& path);
// A connection to the socket at `path` (blocking).
StatusOr<UniqueFd> ConnectSeqpacket(const std::string& path);
// A connection accepted from `listener` (non-blocking); an invalid fd when
// none is waiting.
StatusOr<UniqueFd> AcceptSeqpacket(int listener);

// Sends one packet, with descriptor `pass` unless it is -1. Never raises
// SIGPIPE; with `dontwait`, kUnavailable when the peer's buffer is full.
Status SendPacket(int sock, std::string_view bytes, int pass = -1, bool dontwait = false);

struct Packet {
  std::string bytes;
  UniqueFd fd;       // the descriptor it carried, if any
  bool eof = false;  // the peer closed the connection
  bool none = false; // dontwait, and nothing was waiting
};
// Receives one packet of at most `max` bytes. A longer packet, or more than
// one descriptor, is an error (kMalformed: the extra descriptors are closed,
// never kept); received descriptors are close-on-exec.
StatusOr<Packet> RecvPacket(int sock, size_t max, bool dontwait = false);

}  // namespace gpuq
