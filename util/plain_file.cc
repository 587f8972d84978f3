#include "util/plain_file.h"

#include <fcntl.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>

namespace gpuq {

StatusOr<UniqueFd> OpenPlainFile(const std::string& path, const PlainFileCheck& check) {
  UniqueFd fd(open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC));
  if (!fd.valid()) {
    if (errno == ELOOP) return Error(Code::kInvalid, path + " is a symbolic link");
    return Error(Code::kInvalid, path + ": " + strerror(errno));
  }
  struct stat st {};
  if (fstat(fd.get(), &st) != 0) return Error(Code::kInvalid, path + ": " + strerror(errno));
  if (!S_ISREG(st.st_mode)) return Error(Code::kInvalid, path + " is not a regular file");
  if (check.single_link && st.st_nlink != 1) {
    return Error(Code::kInvalid, path + " has another name (a hard link)");
  }
  if (check.size && static_cast<uint64_t>(st.st_size) != *check.size) {
    return Error(Code::kInvalid, path + " holds " + std::to_string(st.st_size) +
                                     " bytes, not the " + std::to_string(*check.size) + " named");
  }
  return fd;
}

Status ReadExactly(int fd, void* out, uint64_t size, const std::string& what) {
  auto* p = static_cast<char*>(out);
  uint64_t done = 0;
  while (done < size) {
    const ssize_t n = pread(fd, p + done, size - done, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Error(Code::kIoError, "reading " + what + ": " + strerror(errno));
    if (n == 0) {
      return Error(Code::kIoError, what + " ended after " + std::to_string(done) + " of its " +
                                       std::to_string(size) + " bytes (it was changed)");
    }
    done += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

}  // namespace gpuq
