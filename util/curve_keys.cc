#include "util/curve_keys.h"

#include <sys/stat.h>
#include <zmq.h>

#include <fstream>
#include <sstream>

namespace gpuq {
namespace {

bool IsZ85Key(const std::string& k) {
  if (k.size() != 40) return false;
  char bin[32];
  return zmq_z85_decode(reinterpret_cast<uint8_t*>(bin), k.c_str()) != nullptr;
}

StatusOr<std::string> FirstLine(const std::string& path) {
  std::ifstream in(path);
  if (!in) return Error(Code::kUnavailable, "cannot read " + path);
  std::string line;
  std::getline(in, line);
  while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
  return line;
}

}  // namespace

StatusOr<CurveKeyPair> NewCurveKeyPair() {
  char pub[41], sec[41];
  if (zmq_curve_keypair(pub, sec) != 0) {
    return Error(Code::kUnavailable, "this libzmq has no CURVE support");
  }
  return CurveKeyPair{pub, sec};
}

StatusOr<CurveKeyPair> ReadCurveSecretKey(const std::string& path) {
  GPUQ_ASSIGN_OR_RETURN(std::string secret, FirstLine(path));
  if (!IsZ85Key(secret)) return Error(Code::kInvalid, path + " holds no Z85 secret key");
  char pub[41];
  if (zmq_curve_public(pub, secret.c_str()) != 0) {
    return Error(Code::kInvalid, "cannot derive the public key of " + path);
  }
  return CurveKeyPair{pub, secret};
}

StatusOr<std::string> ReadCurvePublicKey(const std::string& path) {
  GPUQ_ASSIGN_OR_RETURN(std::string key, FirstLine(path));
  if (!IsZ85Key(key)) return Error(Code::kInvalid, path + " holds no Z85 public key");
  return key;
}

StatusOr<std::map<std::string, AllowedKey>> ReadAllowedKeys(const std::string& path) {
  std::ifstream in(path);
  if (!in) return Error(Code::kUnavailable, "cannot read " + path);
  std::map<std::string, AllowedKey> keys;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    std::istringstream ss(line);
    std::string key, name, role, extra;
    ss >> key >> name >> role >> extra;
    if (key.empty() || key[0] == '#') continue;
    if (!IsZ85Key(key) || name.empty() || !(role.empty() || role == "operator") ||
        !extra.empty()) {
      return Error(Code::kInvalid, path + ":" + std::to_string(n) +
                                       ": expected 'PUBLIC-KEY NAME' or 'PUBLIC-KEY NAME operator'");
    }
    keys[key] = AllowedKey{name, role == "operator"};
  }
  return keys;
}

Status WriteCurveKeyPair(const CurveKeyPair& keys, const std::string& prefix) {
  const std::string secret = prefix + ".key", pub = prefix + ".pub";
  {
    std::ofstream out(secret, std::ios::trunc);
    out << keys.secret_key << "\n";
    if (!out) return Error(Code::kIoError, "cannot write " + secret);
  }
  chmod(secret.c_str(), 0600);
  std::ofstream out(pub, std::ios::trunc);
  out << keys.public_key << "\n";
  if (!out) return Error(Code::kIoError, "cannot write " + pub);
  return Status::Ok();
}

}  // namespace gpuq
