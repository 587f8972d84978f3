#include "broker/blob_dir.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <memory>

namespace gpuq::broker {
namespace {

Status Errno(const std::string& what) {
  return Error(Code::kIoError, what + ": " + std::strerror(errno));
}

struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd >= 0) close(fd);
  }
};

}  // namespace

StatusOr<BlobDir> BlobDir::Open(std::string path) {
  if (mkdir(path.c_str(), 0700) != 0 && errno != EEXIST) return Errno("creating " + path);
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) return Errno(path);
  if (!S_ISDIR(st.st_mode)) return Error(Code::kIoError, path + " is not a directory");
  return BlobDir(std::move(path));
}

Status BlobDir::Write(const std::string& name, std::string_view data, bool sync) const {
  const std::string file = path_ + "/" + name;
  Fd f(open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (f.fd < 0) return Errno("creating " + file);
  const char* p = data.data();
  size_t left = data.size();
  while (left > 0) {
    ssize_t n = write(f.fd, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Errno("writing " + file);
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
  if (sync && fdatasync(f.fd) != 0) return Errno("syncing " + file);
  return Status::Ok();
}

StatusOr<std::string> BlobDir::Read(const std::string& name) const {
  const std::string file = path_ + "/" + name;
  Fd f(open(file.c_str(), O_RDONLY | O_CLOEXEC));
  if (f.fd < 0) return Errno("opening " + file);
  struct stat st {};
  if (fstat(f.fd, &st) != 0) return Errno(file);
  std::string data(static_cast<size_t>(st.st_size), '\0');
  size_t got = 0;
  while (got < data.size()) {
    ssize_t n = pread(f.fd, data.data() + got, data.size() - got, static_cast<off_t>(got));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Errno("reading " + file);
    }
    if (n == 0) return Error(Code::kIoError, file + " is shorter than its size");
    got += static_cast<size_t>(n);
  }
  return data;
}

void BlobDir::Remove(const std::string& name) const {
  (void)unlink((path_ + "/" + name).c_str());
}

Status BlobDir::Adopt(const std::string& from, const std::string& to, uint64_t* size,
                      bool sync) const {
  // Renamed first, then checked under its new name: what is checked is what
  // the store keeps.
  const std::string src = path_ + "/" + from, dst = path_ + "/" + to;
  if (rename(src.c_str(), dst.c_str()) != 0) return Errno("renaming " + src);
  Fd f(open(dst.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
  struct stat st {};
  if (f.fd < 0 || fstat(f.fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_nlink != 1) {
    (void)unlink(dst.c_str());
    return Error(Code::kInvalid, src + " is not a plain file");
  }
  *size = static_cast<uint64_t>(st.st_size);
  if (sync && fdatasync(f.fd) != 0) return Errno("syncing " + dst);
  return Status::Ok();
}

void BlobDir::RemoveStale(const std::string& prefix, int64_t age_s) const {
  auto names = List();
  if (!names.ok()) return;
  const time_t now = time(nullptr);
  for (const std::string& name : *names) {
    if (name.rfind(prefix, 0) != 0) continue;
    struct stat st {};
    if (lstat((path_ + "/" + name).c_str(), &st) == 0 && now - st.st_mtime > age_s) Remove(name);
  }
}

Status BlobDir::SyncDir() const {
  Fd f(open(path_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (f.fd < 0) return Errno("opening " + path_);
  if (fsync(f.fd) != 0) return Errno("syncing " + path_);
  return Status::Ok();
}

StatusOr<std::vector<std::string>> BlobDir::List() const {
  std::unique_ptr<DIR, int (*)(DIR*)> d(opendir(path_.c_str()), closedir);
  if (!d) return Errno("listing " + path_);
  std::vector<std::string> names;
  while (dirent* e = readdir(d.get())) {
    if (e->d_type == DT_REG) names.emplace_back(e->d_name);
  }
  return names;
}

}  // namespace gpuq::broker
