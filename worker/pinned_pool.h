// Page-locked host buffers for device-to-host copies, handed to ZeroMQ as
// message data and taken back when ZeroMQ frees the message (on its I/O
// thread, after the send). A copy into pinned memory runs at the bus's
// speed; one into fresh pageable memory is staged by the driver and faults
// in every page.
//
// Thread-safe. Buffers are kept for reuse, in power-of-two classes, up to
// a cap on the pinned bytes held; past it Message() falls back to ordinary
// memory.
#pragma once

#include <zmq.hpp>

#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "worker/cuda_driver.h"

namespace gpuq::worker {

class PinnedPool {
 public:
  PinnedPool(const CudaDriver& cu, size_t cap_bytes) : cu_(cu), cap_(cap_bytes) {}
  PinnedPool(const PinnedPool&) = delete;
  PinnedPool& operator=(const PinnedPool&) = delete;
  // FreeAll() must have run, with a context current.
  ~PinnedPool() = default;

  // A message of `size` bytes; needs a context current on this thread.
  zmq::message_t Message(size_t size);

  // Frees every buffer. A context must be current and no message from the
  // pool may be alive.
  void FreeAll();

  size_t held_bytes() const {
    std::lock_guard lock(mu_);
    return held_;
  }

 private:
  struct Block {
    PinnedPool* pool;
    void* ptr;
    size_t bytes;
  };
  static void Release(void* data, void* hint);

  const CudaDriver& cu_;
  const size_t cap_;
  mutable std::mutex mu_;
  std::map<size_t, std::vector<Block*>> free_;   // GUARDED_BY(mu_), by class
  std::vector<std::unique_ptr<Block>> blocks_;   // GUARDED_BY(mu_), every buffer
  size_t held_ = 0;                              // GUARDED_BY(mu_)
};

inline zmq::message_t PinnedPool::Message(size_t size) {
  if (size == 0) return zmq::message_t();
  size_t cls = 4096;
  while (cls < size) cls <<= 1;
  Block* b = nullptr;
  {
    std::lock_guard lock(mu_);
    auto it = free_.find(cls);
    if (it != free_.end() && !it->second.empty()) {
      b = it->second.back();
      it->second.pop_back();
    } else if (held_ + cls <= cap_) {
      void* p = nullptr;
      if (cu_.cuMemHostAlloc(&p, cls, CU_MEMHOSTALLOC_PORTABLE) == CUDA_SUCCESS) {
        blocks_.push_back(std::make_unique<Block>(Block{this, p, cls}));
        b = blocks_.back().get();
        held_ += cls;
      }
    }
  }
  if (!b) return zmq::message_t(size);
  return zmq::message_t(b->ptr, size, &PinnedPool::Release, b);
}

inline void PinnedPool::Release(void*, void* hint) {
  auto* b = static_cast<Block*>(hint);
  std::lock_guard lock(b->pool->mu_);
  b->pool->free_[b->bytes].push_back(b);
}

inline void PinnedPool::FreeAll() {
  std::lock_guard lock(mu_);
  for (auto& b : blocks_) (void)cu_.cuMemFreeHost(b->ptr);
  blocks_.clear();
  free_.clear();
  held_ = 0;
}

}  // namespace gpuq::worker
