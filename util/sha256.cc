#include "util/sha256.h"

#include <sodium.h>

#include <cstdlib>
#include <mutex>

namespace gpuq {

struct Sha256::Ctx {
  crypto_hash_sha256_state state;
};

Sha256::Sha256() : ctx_(new Ctx) {
  static std::once_flag init;
  // sodium_init() fails only when the library cannot work at all.
  std::call_once(init, [] {
    if (sodium_init() < 0) std::abort();
  });
  crypto_hash_sha256_init(&ctx_->state);
}

Sha256::~Sha256() = default;

void Sha256::Update(std::string_view bytes) {
  crypto_hash_sha256_update(&ctx_->state, reinterpret_cast<const unsigned char*>(bytes.data()),
                            bytes.size());
}

void Sha256::UpdateField(std::string_view bytes) {
  uint8_t len[8];
  uint64_t n = bytes.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(n >> (8 * i));
  Update(std::string_view(reinterpret_cast<const char*>(len), sizeof len));
  Update(bytes);
}

Digest Sha256::Finish() {
  static_assert(sizeof(Digest) == crypto_hash_sha256_BYTES);
  Digest d{};
  crypto_hash_sha256_final(&ctx_->state, d.data());
  return d;
}

std::string ToHex(const uint8_t* data, size_t size) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string s(size * 2, '0');
  for (size_t i = 0; i < size; ++i) {
    s[2 * i] = kDigits[data[i] >> 4];
    s[2 * i + 1] = kDigits[data[i] & 15];
  }
  return s;
}

bool DigestFromHex(std::string_view hex, Digest* out) {
  if (hex.size() != 64) return false;
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  for (size_t i = 0; i < 32; ++i) {
    int hi = nibble(hex[2 * i]), lo = nibble(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return false;
    (*out)[i] = static_cast<uint8_t>(hi << 4 | lo);
  }
  return true;
}

}  // namespace gpuq
