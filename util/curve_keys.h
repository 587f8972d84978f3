// CURVE key files. A secret key file holds the Z85 secret key (40 characters)
// on its first line; the public key is derived from it. A public key file
// holds the Z85 public key. An allowed-keys file has one "PUBLIC-KEY NAME"
// per line (the name is the tenant of a client, or the worker's name),
// optionally followed by "operator" (a client that sees every tenant's
// stats); blank lines and lines starting with # are ignored.
#pragma once

#include <map>
#include <string>

#include "util/status.h"

namespace gpuq {

struct CurveKeyPair {
  std::string public_key, secret_key;  // Z85
};

// A new key pair (libzmq's zmq_curve_keypair).
StatusOr<CurveKeyPair> NewCurveKeyPair();
// Reads a secret key file and derives its public key.
StatusOr<CurveKeyPair> ReadCurveSecretKey(const std::string& path);
// Reads a file whose first line is a Z85 key (40 characters).
StatusOr<std::string> ReadCurvePublicKey(const std::string& path);
struct AllowedKey {
  std::string name;
  bool operator_ = false;
  bool operator==(const AllowedKey&) const = default;
};
// Public key (Z85) -> its name and role.
StatusOr<std::map<std::string, AllowedKey>> ReadAllowedKeys(const std::string& path);
// Writes the secret key (mode 0600) to PREFIX.key and the public to PREFIX.pub.
Status WriteCurveKeyPair(const CurveKeyPair& keys, const std::string& prefix);
// Writes a public key file.
Status WriteCurvePublicKey(const std::string& public_key, const std::string& path);

}  // namespace gpuq
