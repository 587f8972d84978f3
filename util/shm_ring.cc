#include "util/shm_ring.h"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <ctime>

namespace gpuq {
namespace {

// Shared (not FUTEX_PRIVATE): the word lives in memory of two processes.
void FutexWait(std::atomic<uint32_t>* word, uint32_t expected,
               std::chrono::microseconds timeout) {
  timespec ts{static_cast<time_t>(timeout.count() / 1000000),
              static_cast<long>((timeout.count() % 1000000) * 1000)};
  (void)syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, &ts,
                nullptr, 0);
}

void FutexWake(std::atomic<uint32_t>* word) {
  (void)syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, 1, nullptr, nullptr,
                0);
}

}  // namespace

// Both clamp as Read and Write do: a peer that wrote nonsense into the
// header makes the ring look full or empty, never hold more than its
// capacity or less than nothing (a wait on it then sleeps, as it should).
size_t ByteRing::Readable() const {
  return static_cast<size_t>(std::min<uint64_t>(
      h_->head.load(std::memory_order_acquire) - h_->tail.load(std::memory_order_relaxed), cap_));
}

size_t ByteRing::Writable() const {
  return cap_ - static_cast<size_t>(std::min<uint64_t>(
                    h_->head.load(std::memory_order_relaxed) -
                        h_->tail.load(std::memory_order_acquire),
                    cap_));
}

size_t ByteRing::Write(const char* p, size_t n) {
  const uint64_t head = h_->head.load(std::memory_order_relaxed);
  const uint64_t tail = h_->tail.load(std::memory_order_acquire);
  // A peer that wrote nonsense into the header cannot make this copy out of
  // bounds: the room is clamped to the capacity.
  const uint64_t used = std::min<uint64_t>(head - tail, cap_);
  n = std::min<size_t>(n, cap_ - used);
  if (n == 0) return 0;
  const size_t at = static_cast<size_t>(head & (cap_ - 1));
  const size_t first = std::min(n, cap_ - at);
  std::memcpy(data_ + at, p, first);
  std::memcpy(data_, p + first, n - first);
  h_->head.store(head + n, std::memory_order_seq_cst);
  if (h_->reader_waiting.load(std::memory_order_seq_cst)) Wake();
  return n;
}

size_t ByteRing::Read(char* p, size_t n) {
  const uint64_t tail = h_->tail.load(std::memory_order_relaxed);
  const uint64_t head = h_->head.load(std::memory_order_acquire);
  n = std::min<size_t>(n, std::min<uint64_t>(head - tail, cap_));
  if (n == 0) return 0;
  const size_t at = static_cast<size_t>(tail & (cap_ - 1));
  const size_t first = std::min(n, cap_ - at);
  std::memcpy(p, data_ + at, first);
  std::memcpy(p + first, data_, n - first);
  h_->tail.store(tail + n, std::memory_order_seq_cst);
  if (h_->writer_waiting.load(std::memory_order_seq_cst)) {
    h_->space_seq.fetch_add(1, std::memory_order_seq_cst);
    FutexWake(&h_->space_seq);
  }
  return n;
}

void ByteRing::WaitReadable(std::chrono::microseconds timeout) {
  const uint32_t seq = h_->data_seq.load(std::memory_order_seq_cst);
  h_->reader_waiting.store(1, std::memory_order_seq_cst);
  if (Readable() == 0) FutexWait(&h_->data_seq, seq, timeout);
  h_->reader_waiting.store(0, std::memory_order_seq_cst);
}

void ByteRing::WaitWritable(std::chrono::microseconds timeout) {
  const uint32_t seq = h_->space_seq.load(std::memory_order_seq_cst);
  h_->writer_waiting.store(1, std::memory_order_seq_cst);
  if (Writable() == 0) FutexWait(&h_->space_seq, seq, timeout);
  h_->writer_waiting.store(0, std::memory_order_seq_cst);
}

void ByteRing::Wake() {
  h_->data_seq.fetch_add(1, std::memory_order_seq_cst);
  FutexWake(&h_->data_seq);
}

}  // namespace gpuq
