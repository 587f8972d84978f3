// Sealed shared memory: what a region is made of (PROTOCOL.md, "Regions").
// A memfd whose size is sealed can neither shrink nor grow, so a process that
// maps it never takes SIGBUS for pages its owner took away.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "gpuq/status.h"
#include "util/fd.h"

namespace gpuq {

// A new memfd of `size` bytes (zeros), sealed against shrinking, growing
// and further sealing. `name` shows in /proc/PID/fd only.
StatusOr<UniqueFd> CreateSealedMemfd(uint64_t size, const std::string& name);

// Whether `fd` is a memfd of exactly `size` bytes, open read-write, sealed
// against shrinking, growing and further seals, and not against writes:
// kInvalid saying what is wrong otherwise.
Status CheckSealedMemfd(int fd, uint64_t size);

// A shared mapping of the whole of `fd`, read-write; unmapped when dropped.
class Mapping {
 public:
  static StatusOr<Mapping> Map(int fd, uint64_t size);
  Mapping() = default;
  ~Mapping();
  Mapping(Mapping&& o) noexcept;
  Mapping& operator=(Mapping&& o) noexcept;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  char* data() const { return data_; }
  uint64_t size() const { return size_; }

 private:
  char* data_ = nullptr;
  uint64_t size_ = 0;
};

}  // namespace gpuq
