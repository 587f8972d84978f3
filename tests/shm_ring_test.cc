// The shared-memory byte ring of the session channel (util/shm_ring.h): in
// order across the wrap, never more than its capacity, a sleeping reader
// woken by a write from another process, and a header its peer scribbled
// on never makes it copy out of bounds.
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "util/shm_ring.h"
#include "util/unix_socket.h"

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
  // What the ring says it holds and has room for is clamped as its copies
  // are: a tail one past the head made Writable() cap + 1 while Write
  // wrote nothing, so a writer that waited for room never slept.
  h->head = 1000;
  h->tail = 1001;
  EXPECT_EQ(ring.Writable(), 0u);
  EXPECT_EQ(ring.Write(buf.data(), 10), 0u);
  EXPECT_EQ(ring.Readable(), kCap);
  h->head = 5;
  h->tail = 1ull << 50;
  EXPECT_LE(ring.Readable(), kCap);
  EXPECT_EQ(ring.Writable(), 0u);
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
// The session channel's frames on a socket: a reader told to hold at most
// so many bytes takes no more than a chunk past them, and a frame of the
// largest size still comes whole when the bound is its size and length.
TEST(FrameReaderTest, AFillStopsAtItsBoundAndAFrameOfTheLargestSizeComesWhole) {
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
  UniqueFd a(sv[0]), b(sv[1]);
  constexpr size_t kMax = 70000;  // two fit in the socket's buffer
  std::string frame(kMax, '\0');
  for (size_t i = 0; i < frame.size(); ++i) frame[i] = static_cast<char>(i * 7);
  FrameWriter w;
  w.Push(frame);
  w.Push(frame);
  for (int i = 0; i < 1000 && w.pending(); ++i) ASSERT_TRUE(w.Flush(a.get()).ok());
  ASSERT_FALSE(w.pending());
  FrameReader r(kMax);
  ASSERT_TRUE(r.Fill(b.get(), 4).ok());
  EXPECT_GE(r.buffered(), 4u);
  EXPECT_LE(r.buffered(), 4u + 65536u) << "a chunk at most past its bound";
  EXPECT_FALSE(r.HasFrame());
  ASSERT_TRUE(r.Fill(b.get(), kMax + 4).ok());
  EXPECT_LE(r.buffered(), kMax + 4 + 65536);
  ASSERT_TRUE(r.HasFrame());
  std::string got;
  auto next = r.Next(&got);
  ASSERT_TRUE(next.ok() && *next);
  EXPECT_TRUE(got == frame);
  ASSERT_TRUE(r.Fill(b.get(), kMax + 4).ok());
  ASSERT_TRUE(r.HasFrame());
  next = r.Next(&got);
  ASSERT_TRUE(next.ok() && *next);
  EXPECT_TRUE(got == frame);
  EXPECT_FALSE(r.HasFrame());
}

}  // namespace gpuq
