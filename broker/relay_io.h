// The byte side of the broker's session relays (broker/sessions.h): frames
// (a 4-byte little-endian length, then the bytes: PROTOCOL.md, "Sessions")
// to and from a session process's stream socket, without copying a frame's
// bytes in the broker beyond the socket's own copy, and a bounded amount of
// work per turn of the loop, so that a large request or answer never holds
// the loop for the whole of its transfer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <zmq.hpp>

#include "gpuq/status.h"

namespace gpuq::broker {

// Frames to a non-blocking stream; each frame's bytes stay in the message
// they came in.
class RelayWriter {
 public:
  void Push(zmq::message_t body);
  // Writes what the socket takes, at most `turn` bytes; kIoError when the
  // peer is gone.
  Status Flush(int sock, size_t turn);
  bool pending() const { return queued_ > 0; }
  size_t queued() const { return queued_; }

 private:
  struct Segment {
    char length[4];
    zmq::message_t body;
  };
  std::deque<Segment> out_;
  size_t done_ = 0;  // bytes of the front segment written (its length's 4 first)
  size_t queued_ = 0;
};

// Frames from a non-blocking stream, each read into memory of its own.
class RelayReader {
 public:
  explicit RelayReader(size_t max) : max_(max) {}
  // Reads what is waiting, at most `turn` bytes. kUnavailable when the peer
  // closed the stream, kTooLarge for a frame over the limit (the stream is
  // then unusable).
  Status Fill(int sock, size_t turn);
  // The next whole frame, if one is.
  bool Next(zmq::message_t* frame);
  bool ready() const { return !ready_.empty(); }
  // Drops what it holds.
  void Clear();

 private:
  const size_t max_;
  unsigned char head_[4] = {};
  size_t have_ = 0;  // bytes of the current frame read, its length's 4 first
  size_t size_ = 0;  // the current frame's length, once known
  std::unique_ptr<char[]> body_;
  std::deque<zmq::message_t> ready_;
};

}  // namespace gpuq::broker
