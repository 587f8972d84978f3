// A byte pipe in shared memory between two processes, one writer and one
// reader (a single-producer single-consumer ring), with a futex for a side
// that sleeps: the session channel's fast path (PROTOCOL.md, "Sessions").
// Bytes go in and out without a system call; a wait that sleeps, and the
// write that ends it, cost one each.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>

namespace gpuq {

class ByteRing {
 public:
  // The shared header, then `capacity` bytes of data. Both processes map
  // the same bytes; the one that makes them zeroes them (a fresh memfd is).
  struct alignas(64) Header {
    alignas(64) std::atomic<uint64_t> head;  // bytes written, ever (the writer's)
    alignas(64) std::atomic<uint64_t> tail;  // bytes read, ever (the reader's)
    alignas(64) std::atomic<uint32_t> data_seq;   // futex: a reader waits on it
    std::atomic<uint32_t> reader_waiting;
    alignas(64) std::atomic<uint32_t> space_seq;  // futex: a writer waits on it
    std::atomic<uint32_t> writer_waiting;
  };
  static_assert(sizeof(Header) == 256, "the layout PROTOCOL.md gives");
  static constexpr size_t Bytes(size_t capacity) { return sizeof(Header) + capacity; }
  // A session's channel: two rings of `capacity`, then, at the next
  // multiple of 4096, a page whose first 32-bit word the GPU writes (the
  // end word: PROTOCOL.md, "Sessions").
  static constexpr size_t EndPage(size_t capacity) {
    return (2 * Bytes(capacity) + 4095) & ~size_t{4095};
  }
  static constexpr size_t PairBytes(size_t capacity) { return EndPage(capacity) + 4096; }
  // Whether the end word `word` (read with acquire) has reached request
  // `rid`: serial arithmetic on the low 32 bits, so a word less than 2^31
  // past it counts.
  static bool Reached(uint32_t* word, uint64_t rid) {
    const uint32_t w = std::atomic_ref<uint32_t>(*word).load(std::memory_order_acquire);
    return static_cast<int32_t>(w - static_cast<uint32_t>(rid)) >= 0;
  }

  ByteRing() = default;
  // `base` holds Bytes(capacity) bytes; `capacity` a power of two.
  ByteRing(void* base, size_t capacity)
      : h_(static_cast<Header*>(base)), data_(static_cast<char*>(base) + sizeof(Header)),
        cap_(capacity) {}
  bool valid() const { return h_ != nullptr; }

  // Copies in what fits of [p, p + n): the bytes written. Wakes a reader
  // that sleeps.
  size_t Write(const char* p, size_t n);
  // Copies out what is there, at most n: the bytes read. Wakes a writer
  // that sleeps.
  size_t Read(char* p, size_t n);
  size_t Readable() const;
  size_t Writable() const;
  // Sleep until there is something to read (or room to write), a Wake(),
  // or `timeout`.
  void WaitReadable(std::chrono::microseconds timeout);
  void WaitWritable(std::chrono::microseconds timeout);
  // Ends a reader's wait, whoever calls it.
  void Wake();

 private:
  Header* h_ = nullptr;
  char* data_ = nullptr;
  size_t cap_ = 0;
};

}  // namespace gpuq
