#include "util/curve_keys.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#include <cerrno>
#include <cstring>

#include <fstream>
#include <sstream>

#include "util/fd.h"
#include "util/file_io.h"

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

namespace {

// `line` and a newline into `path`, created (or truncated) with `mode`: a
// secret key is never readable by others, not even between the open and a
// chmod.
Status WriteKeyFile(const std::string& path, const std::string& line, mode_t mode) {
  // A new file, not the old one rewritten: whoever holds the old one open
  // (readable once, say) does not read the new key through it.
  if (unlink(path.c_str()) != 0 && errno != ENOENT) {
    return Error(Code::kIoError, "cannot replace " + path + ": " + strerror(errno));
  }
  UniqueFd fd(open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, mode));
  if (!fd.valid()) return Error(Code::kIoError, "cannot write " + path + ": " + strerror(errno));
  // Exactly `mode`, whatever the umask.
  if (fchmod(fd.get(), mode) != 0) {
    return Error(Code::kIoError, "cannot chmod " + path + ": " + strerror(errno));
  }
  return WriteAll(fd.get(), line + "\n", path);
}

}  // namespace

Status WriteCurveKeyPair(const CurveKeyPair& keys, const std::string& prefix) {
  GPUQ_RETURN_IF_ERROR(WriteKeyFile(prefix + ".key", keys.secret_key, 0600));
  return WriteCurvePublicKey(keys.public_key, prefix + ".pub");
}

Status WriteCurvePublicKey(const std::string& public_key, const std::string& path) {
  return WriteKeyFile(path, public_key, 0644);
}

}  // namespace gpuq
