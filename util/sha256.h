// SHA-256 through libsodium. Used for kernel cache keys, where a
// cryptographic hash matters: tenants share the cache, and a colliding source
// would run under another tenant's name. (libsodium rather than OpenSSL 3,
// whose first digest in a process costs 0.4-0.8 ms of provider loading: more
// than a whole cache hit.)
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

namespace gpuq {

using Digest = std::array<uint8_t, 32>;

// Incremental hasher. Not thread-safe; one per thread.
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  void Update(std::string_view bytes);
  // Hashes a length prefix then the bytes, so that field boundaries are part
  // of the digest ("ab"+"c" and "a"+"bc" differ).
  void UpdateField(std::string_view bytes);
  Digest Finish();

 private:
  struct Ctx;
  std::unique_ptr<Ctx> ctx_;
};

std::string ToHex(const uint8_t* data, size_t size);
inline std::string ToHex(const Digest& d) { return ToHex(d.data(), d.size()); }
// Returns false unless `hex` is exactly 64 hex digits.
bool DigestFromHex(std::string_view hex, Digest* out);

}  // namespace gpuq
