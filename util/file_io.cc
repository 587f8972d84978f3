#include "util/file_io.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace gpuq {

Status WriteAll(int fd, std::string_view data, const std::string& what) {
  const char* p = data.data();
  size_t left = data.size();
  while (left > 0) {
    const ssize_t n = write(fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      return Error(Code::kIoError,
                   "writing " + what + ": " + (n < 0 ? std::strerror(errno) : "wrote nothing"));
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
  return Status::Ok();
}

}  // namespace gpuq
