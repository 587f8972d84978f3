// Unix seqpacket sockets that pass file descriptors (SCM_RIGHTS): the region
// channel between clients, the broker and its local workers (PROTOCOL.md,
// "Regions"). Each packet is one message; a descriptor travels with it.
#pragma once

#include <cstdint>
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

// ---- stream sockets of frames (the session channel, PROTOCOL.md
// "Sessions"): each frame is a 4-byte little-endian length, then its bytes.

StatusOr<UniqueFd> ListenStream(const std::string& path);  // as ListenSeqpacket
StatusOr<UniqueFd> ConnectStream(const std::string& path);  // blocking

// Appends `body` as a frame to `out`: its length, then its bytes.
void AppendFrame(std::string* out, std::string_view body);

// Writes one frame whole (blocking; never raises SIGPIPE).
Status WriteFrame(int sock, std::string_view bytes);
// Reads one frame whole (blocking); kTooLarge over `max` (the stream is then
// unusable), kUnavailable when the peer closed it.
StatusOr<std::string> ReadFrame(int sock, size_t max);

// Frames from a non-blocking stream, as they arrive.
class FrameReader {
 public:
  explicit FrameReader(size_t max) : max_(max) {}
  // Takes what is waiting, until `max_buffered` bytes are held.
  // kUnavailable when the peer closed the stream.
  Status Fill(int sock, size_t max_buffered = SIZE_MAX);
  // Whether a whole frame (or one over the limit) waits for Next().
  bool HasFrame() const {
    return buffered() >= 4 && (FrameLength() > max_ || buffered() - 4 >= FrameLength());
  }
  // The next whole frame: false when none is whole yet; kTooLarge for a
  // frame over the limit (the stream is then unusable).
  StatusOr<bool> Next(std::string* frame);
  size_t buffered() const { return buf_.size() - pos_; }
  // The bytes not taken as frames yet, handed to another reader.
  std::string TakeRest() {
    std::string rest = buf_.substr(pos_);
    buf_.clear();
    pos_ = 0;
    return rest;
  }
  void Append(std::string_view bytes) { buf_.append(bytes); }

 private:
  size_t FrameLength() const;
  const size_t max_;
  std::string buf_;
  size_t pos_ = 0;
};

// Frames to a non-blocking stream: what the socket does not take yet waits.
class FrameWriter {
 public:
  void Push(std::string_view bytes);
  // Writes what it can; kIoError when the peer is gone.
  Status Flush(int sock);
  bool pending() const { return pos_ < buf_.size(); }
  size_t queued() const { return buf_.size() - pos_; }
  // What waits, and taking `n` bytes of it (for a writer other than a socket).
  std::string_view Waiting() const { return std::string_view(buf_).substr(pos_); }
  void Taken(size_t n) {
    pos_ += n;
    Compact();
  }

 private:
  // Drops what was taken once it is all taken, or past 1 MiB and half of
  // what the buffer holds: a peer that always leaves some unread holds at
  // most twice what it has not read, not every frame ever sent.
  void Compact();

  std::string buf_;
  size_t pos_ = 0;
};

}  // namespace gpuq
