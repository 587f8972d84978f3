// The shared-memory byte ring of the session channel (util/shm_ring.h): in
// order across the wrap, never more than its capacity, a sleeping reader
// woken by a write from another process, and a header its peer scribbled
// on never makes it copy out of bounds.
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "util/shm_ring.h"

namespace gpuq {
namespace {

constexpr size_t kCap = 1024;

struct Shared {
  Shared() {
    base = mmap(nullptr, ByteRing::Bytes(kCap), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                -1, 0);
  }
  ~Shared() { munmap(base, ByteRing::Bytes(kCap)); }
  void* base;
};

TEST(ByteRingTest, BytesComeOutInOrderAcrossTheWrapAndNeverPastItsCapacity) {
  Shared mem;
  ByteRing w(mem.base, kCap), r(mem.base, kCap);
  std::string sent, got;
  char buf[700];
  for (int round = 0; round < 50; ++round) {
    std::string chunk(300 + round % 7, '\0');
    for (size_t i = 0; i < chunk.size(); ++i) chunk[i] = static_cast<char>(sent.size() + i);
    size_t n = w.Write(chunk.data(), chunk.size());
    sent.append(chunk, 0, n);
    EXPECT_LE(r.Readable(), kCap);
    const size_t m = r.Read(buf, 250 + round % 3 * 100);
    got.append(buf, m);
  }
  while (size_t m = r.Read(buf, sizeof buf)) got.append(buf, m);
  EXPECT_EQ(got, sent);
  std::string big(3000, 'x');
  EXPECT_EQ(w.Write(big.data(), big.size()), kCap) << "what fits, and no more";
  EXPECT_EQ(w.Writable(), 0u);
  EXPECT_EQ(w.Write("y", 1), 0u);
}

TEST(ByteRingTest, AScribbledHeaderNeverMakesItCopyOutOfBounds) {
  Shared mem;
  ByteRing ring(mem.base, kCap);
  auto* h = static_cast<ByteRing::Header*>(mem.base);
  h->head = 1ull << 40;  // as a peer might write
  h->tail = 7;
  std::vector<char> buf(1 << 16);
  EXPECT_LE(ring.Read(buf.data(), buf.size()), kCap);
  h->head = 3;
  h->tail = 1ull << 50;
  EXPECT_LE(ring.Write(buf.data(), buf.size()), kCap);
}

TEST(ByteRingTest, ASleepingReaderIsWokenByAWriteOfAnotherProcess) {
  Shared mem;
  ByteRing ring(mem.base, kCap);
  pid_t child = fork();
  if (child == 0) {
    usleep(100000);
    ByteRing w(mem.base, kCap);
    _exit(w.Write("hello", 5) == 5 ? 0 : 1);
  }
  const auto t0 = std::chrono::steady_clock::now();
  while (ring.Readable() == 0 &&
         std::chrono::steady_clock::now() - t0 < std::chrono::seconds(20)) {
    ring.WaitReadable(std::chrono::seconds(10));
  }
  char buf[8];
  ASSERT_EQ(ring.Read(buf, sizeof buf), 5u);
  EXPECT_EQ(std::string(buf, 5), "hello");
  int status = 0;
  waitpid(child, &status, 0);
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

}  // namespace
}  // namespace gpuq
