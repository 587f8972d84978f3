#include "broker/blob_dir.h"

#include "util/file_io.h"
#include "util/plain_file.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <algorithm>
#include <memory>
#include <optional>

namespace gpuq::broker {
namespace {

Status Errno(const std::string& what) { return FileError(what, errno); }

struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd >= 0) close(fd);
  }
};

// `len` bytes of `file` from `off`: all of them, or an error.
StatusOr<std::string> ReadRange(const std::string& file, uint64_t off,
                                std::optional<uint64_t> len) {
  Fd f(open(file.c_str(), O_RDONLY | O_CLOEXEC));
  if (f.fd < 0) return Errno("opening " + file);
  if (!len) {
    struct stat st {};
    if (fstat(f.fd, &st) != 0) return Errno(file);
    len = static_cast<uint64_t>(st.st_size);
  }
  std::string data(*len, '\0');
  size_t got = 0;
  while (got < data.size()) {
    ssize_t n = pread(f.fd, data.data() + got, data.size() - got, static_cast<off_t>(off + got));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Errno("reading " + file);
    }
    if (n == 0) return Error(Code::kIoError, file + " is shorter than its store says");
    got += static_cast<size_t>(n);
  }
  return data;
}

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
  Status s = WriteAll(f.fd, data, file);
  if (s.ok() && sync && fdatasync(f.fd) != 0) s = Errno("syncing " + file);
  if (!s.ok()) (void)unlink(file.c_str());
  return s;
}

StatusOr<std::string> BlobDir::Read(const std::string& name) const {
  return ReadRange(path_ + "/" + name, 0, std::nullopt);
}

StatusOr<uint64_t> BlobDir::Size(const std::string& name) const {
  struct stat st {};
  if (lstat((path_ + "/" + name).c_str(), &st) != 0) {
    return Error(Code::kIoError, std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) return Error(Code::kIoError, "not a regular file");
  return static_cast<uint64_t>(st.st_size);
}

void BlobDir::Remove(const std::string& name) const {
  (void)unlink((path_ + "/" + name).c_str());
}

void BlobDir::Unadopt(const std::string& from, const std::string& to) const {
  const std::string src = path_ + "/" + to, dst = path_ + "/" + from;
  if (rename(src.c_str(), dst.c_str()) != 0) (void)unlink(src.c_str());
}

Status BlobDir::Adopt(const std::string& from, const std::string& to, uint64_t* size,
                      bool sync) const {
  // Renamed first, then checked under its new name: what is checked is what
  // the store keeps. A peer's file is opened without blocking (a FIFO) or
  // following a link, and checked on the open descriptor.
  const std::string src = path_ + "/" + from, dst = path_ + "/" + to;
  if (rename(src.c_str(), dst.c_str()) != 0) {
    if (errno == ENOENT) return Error(Code::kInvalid, src + ": no such file");
    return Errno("renaming " + src);
  }
  PlainFileCheck one_link;
  one_link.single_link = true;
  auto f = OpenPlainFile(dst, one_link);
  if (!f.ok()) {
    (void)unlink(dst.c_str());
    return Error(Code::kInvalid, src + " is not a plain file of one link");
  }
  struct stat st {};
  if (fstat(f->get(), &st) != 0) {
    Status s = Errno("reading " + dst);
    (void)unlink(dst.c_str());
    return s;
  }
  *size = static_cast<uint64_t>(st.st_size);
  if (sync && fdatasync(f->get()) != 0) {
    Status s = Errno("syncing " + dst);
    (void)unlink(dst.c_str());
    return s;
  }
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
  ++dir_syncs_;
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

StatusOr<std::unique_ptr<BlobLog>> BlobLog::Open(const BlobDir* dir, std::string prefix,
                                                 std::map<uint64_t, uint64_t> live,
                                                 uint64_t segment_bytes) {
  std::unique_ptr<BlobLog> log(new BlobLog(dir, prefix, segment_bytes));
  GPUQ_ASSIGN_OR_RETURN(std::vector<std::string> names, dir->List());
  uint64_t last = 0;
  const size_t n = prefix.size();
  for (const std::string& name : names) {
    if (name.rfind(prefix, 0) != 0) continue;
    uint64_t seg = 0;
    bool digits = name.size() > n && name.size() <= n + 19;
    for (size_t i = n; digits && i < name.size(); ++i) {
      digits = name[i] >= '0' && name[i] <= '9';
      if (digits) seg = seg * 10 + uint64_t(name[i] - '0');
    }
    if (!digits) continue;
    last = std::max(last, seg);
    if (!live.count(seg)) dir->Remove(name);
  }
  for (const auto& [seg, rows] : live) last = std::max(last, seg);
  log->live_ = std::move(live);
  log->seg_ = last + 1;  // created by the first write
  return log;
}

BlobLog::~BlobLog() {
  if (fd_ >= 0) close(fd_);
}

BlobLog::Ref BlobLog::Append(std::string_view data) {
  Ref r{seg_, size_ + pending_.size(), data.size()};
  pending_.append(data);
  added_.push_back(seg_);
  return r;
}

void BlobLog::RollbackTo(const Mark& m) {
  added_.resize(m.rows);
  pending_.resize(m.bytes);
}

void BlobLog::Release(uint64_t seg) { released_.push_back(seg); }

Status BlobLog::Flush(bool sync) {
  if (pending_.empty()) return Status::Ok();
  const std::string file = dir_->path() + "/" + Name(seg_);
  if (fd_ < 0) {
    // A segment is opened only when it is new (at start, or when the last
    // filled up): no committed byte is lost to O_TRUNC.
    fd_ = open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0600);
    if (fd_ < 0) return Errno("creating " + file);
    // A new segment's directory entry must outlive a power loss too: the
    // rows about to commit name it.
    if (sync) GPUQ_RETURN_IF_ERROR(dir_->SyncDir());
  }
  GPUQ_RETURN_IF_ERROR(WriteAll(fd_, pending_, file));
  size_ += pending_.size();
  pending_.clear();
  if (sync && fdatasync(fd_) != 0) return Errno("syncing " + file);
  return Status::Ok();
}

void BlobLog::Committed() {
  for (uint64_t seg : added_) ++live_[seg];
  for (uint64_t seg : released_) {
    auto it = live_.find(seg);
    if (it == live_.end()) continue;
    if (--it->second == 0) {
      live_.erase(it);
      if (seg != seg_) dir_->Remove(Name(seg));
    }
  }
  added_.clear();
  released_.clear();
  if (size_ >= segment_bytes_) {  // the next write starts a new segment
    close(fd_);
    fd_ = -1;
    if (!live_.count(seg_)) dir_->Remove(Name(seg_));
    ++seg_;
    size_ = 0;
  }
  committed_size_ = size_;
}

void BlobLog::Aborted() {
  pending_.clear();
  added_.clear();
  released_.clear();
  if (fd_ < 0) return;
  // The transaction's bytes (all of them, or the part a failed write left)
  // are cut off. Should that fail too, the next append goes after them
  // (O_APPEND, and size_ is the file's): they stay bytes no row names.
  (void)ftruncate(fd_, static_cast<off_t>(committed_size_));
  struct stat st {};
  size_ = fstat(fd_, &st) == 0 ? static_cast<uint64_t>(st.st_size) : committed_size_;
  committed_size_ = size_;
}

StatusOr<std::string> BlobLog::Read(const Ref& r) const {
  if (r.seg == seg_ && r.off >= size_) {
    // Appended by the open transaction, not yet written.
    const uint64_t at = r.off - size_;
    if (at + r.len > pending_.size()) {
      return Error(Code::kIoError, Name(r.seg) + " is shorter than its store says");
    }
    return pending_.substr(at, r.len);
  }
  return ReadRange(dir_->path() + "/" + Name(r.seg), r.off, r.len);
}

Status BlobLog::Check(const Ref& r) const {
  uint64_t holds = 0;
  if (r.seg == seg_) {
    holds = size_ + pending_.size();
  } else {
    GPUQ_ASSIGN_OR_RETURN(holds, dir_->Size(Name(r.seg)));
  }
  if (r.off + r.len > holds) {
    return Error(Code::kIoError, "the segment holds " + std::to_string(holds) + " bytes");
  }
  return Status::Ok();
}

}  // namespace gpuq::broker
