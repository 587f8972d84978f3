#include "util/file_io.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace gpuq {

Status FileError(const std::string& what, int err) {
  if (err == ENOSPC || err == EDQUOT || err == EFBIG) {
    return Error(Code::kResourceExhausted, "no space: " + what + ": " + std::strerror(err));
  }
  return Error(Code::kIoError, what + ": " + std::strerror(err));
}

Status WriteAll(int fd, std::string_view data, const std::string& what) {
  const char* p = data.data();
  size_t left = data.size();
  while (left > 0) {
    const ssize_t n = write(fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return FileError("writing " + what, errno);
    // write() of a regular file returns 0 only for an empty request; a
    // device that takes nothing is out of room.
    if (n == 0) return FileError("writing " + what, ENOSPC);
    p += n;
    left -= static_cast<size_t>(n);
  }
  return Status::Ok();
}

}  // namespace gpuq
