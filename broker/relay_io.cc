#include "broker/relay_io.h"

#include <errno.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <algorithm>
#include <cstring>
#include <string>

namespace gpuq::broker {

void RelayWriter::Push(zmq::message_t body) {
  Segment& s = out_.emplace_back();
  const uint32_t n = static_cast<uint32_t>(body.size());
  for (int i = 0; i < 4; ++i) s.length[i] = static_cast<char>(n >> (8 * i));
  s.body = std::move(body);
  queued_ += 4 + s.body.size();
}

Status RelayWriter::Flush(int sock, size_t turn) {
  size_t written = 0;
  while (!out_.empty() && written < turn) {
    // The segments waiting, from where the front one stands, as one write.
    iovec iov[64];
    int n = 0;
    size_t offered = 0;
    const size_t budget = turn - written;
    size_t skip = done_;  // of the front segment only
    for (auto it = out_.begin(); it != out_.end() && n + 2 <= 64 && offered < budget; ++it) {
      if (skip < 4) {
        const size_t t = std::min(4 - skip, budget - offered);
        iov[n++] = {it->length + skip, t};
        offered += t;
        if (t < 4 - skip) break;
        skip = 0;
      } else {
        skip -= 4;
      }
      const size_t left = it->body.size() - skip;
      if (left > 0 && offered < budget) {
        const size_t t = std::min(left, budget - offered);
        iov[n++] = {static_cast<char*>(it->body.data()) + skip, t};
        offered += t;
      }
      skip = 0;
    }
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = static_cast<size_t>(n);
    const ssize_t w = sendmsg(sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return Status::Ok();
      return Status(Code::kIoError, std::string("writing: ") + strerror(errno));
    }
    size_t took = static_cast<size_t>(w);
    written += took;
    queued_ -= took;
    while (took > 0) {
      const size_t whole = 4 + out_.front().body.size();
      const size_t step = std::min(took, whole - done_);
      done_ += step;
      took -= step;
      if (done_ == whole) {
        out_.pop_front();
        done_ = 0;
      }
    }
    if (static_cast<size_t>(w) < offered) return Status::Ok();  // the socket is full
  }
  return Status::Ok();
}

Status RelayReader::Fill(int sock, size_t turn) {
  size_t read = 0;
  while (read < turn) {
    char* into;
    size_t want;
    if (have_ < 4) {
      into = reinterpret_cast<char*>(head_) + have_;
      want = 4 - have_;
    } else {
      into = body_.get() + (have_ - 4);
      want = std::min(size_ - (have_ - 4), turn - read);
    }
    if (want > 0) {
      const ssize_t r = recv(sock, into, want, MSG_DONTWAIT);
      if (r == 0) return Status(Code::kUnavailable, "the peer closed the connection");
      if (r < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return Status::Ok();
        return Status(Code::kIoError, std::string("reading: ") + strerror(errno));
      }
      have_ += static_cast<size_t>(r);
      read += static_cast<size_t>(r);
    }
    if (have_ == 4 && !body_) {
      size_ = head_[0] | (head_[1] << 8) | (head_[2] << 16) | (size_t{head_[3]} << 24);
      if (size_ > max_) {
        return Status(Code::kTooLarge, "a frame of " + std::to_string(size_) +
                                           " bytes is over the limit of " + std::to_string(max_));
      }
      // Not zero-filled: every byte of it is read before it is used.
      body_.reset(new char[std::max<size_t>(size_, 1)]);
    }
    if (have_ >= 4 && body_ && have_ - 4 == size_) {
      char* bytes = body_.release();
      ready_.emplace_back(bytes, size_, [](void* p, void*) { delete[] static_cast<char*>(p); },
                          nullptr);
      have_ = size_ = 0;
    }
  }
  return Status::Ok();
}

bool RelayReader::Next(zmq::message_t* frame) {
  if (ready_.empty()) return false;
  *frame = std::move(ready_.front());
  ready_.pop_front();
  return true;
}

void RelayReader::Clear() {
  ready_.clear();
  body_.reset();
  have_ = size_ = 0;
}

}  // namespace gpuq::broker
