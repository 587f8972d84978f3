#include "util/sealed_memfd.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/vfs.h>

#include <utility>

#include "util/status.h"

namespace gpuq {
namespace {

constexpr int kSizeSeals = F_SEAL_SHRINK | F_SEAL_GROW;
#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif

Status Errno(const std::string& what) {
  return Status(errno == ENOMEM ? Code::kResourceExhausted : Code::kIoError,
                what + ": " + strerror(errno));
}

}  // namespace

StatusOr<UniqueFd> CreateSealedMemfd(uint64_t size, const std::string& name) {
  if (size == 0) return Status(Code::kInvalid, "a region is at least 1 byte");
  UniqueFd fd(memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd.valid()) return Errno("memfd_create");
  if (ftruncate(fd.get(), static_cast<off_t>(size)) != 0) return Errno("sizing a memfd");
  if (fcntl(fd.get(), F_ADD_SEALS, kSizeSeals | F_SEAL_SEAL) != 0) return Errno("sealing a memfd");
  return fd;
}

Status CheckSealedMemfd(int fd, uint64_t size) {
  // Seals first: only shmem files have them, so nothing after this reaches
  // a file system that could keep the caller waiting.
  const int seals = fcntl(fd, F_GET_SEALS);
  if (seals < 0) {
    return Status(Code::kInvalid, "a region is a memfd that can be sealed (this file cannot)");
  }
  struct stat st {};
  if (fstat(fd, &st) != 0) return Errno("fstat");
  if (!S_ISREG(st.st_mode)) return Status(Code::kInvalid, "a region is a memfd, not this file");
  // Of ordinary memory (shmem): a memfd of huge pages (hugetlbfs) has seals
  // too, but a hole its owner punches in it may find no huge page free when
  // touched again, and the toucher gets SIGBUS.
  struct statfs fs {};
  if (fstatfs(fd, &fs) != 0) return Errno("fstatfs");
  if (static_cast<unsigned long>(fs.f_type) != TMPFS_MAGIC) {
    return Status(Code::kInvalid,
                  "a region is a memfd of ordinary memory (not of huge pages or another file "
                  "system)");
  }
  // Sealed for good (F_SEAL_SEAL): no seal can come later that would make a
  // worker's mapping fail (a write seal) or its pages go (a size change).
  if ((seals & (kSizeSeals | F_SEAL_SEAL)) != (kSizeSeals | F_SEAL_SEAL)) {
    return Status(Code::kInvalid,
                  "a region's memfd must be sealed against shrinking and growing, and against "
                  "further seals (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)");
  }
  if (seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE)) {
    return Status(Code::kInvalid, "a region's memfd must be writable (it is sealed against writes)");
  }
  const int flags = fcntl(fd, F_GETFL);
  if (flags < 0 || (flags & O_ACCMODE) != O_RDWR) {
    return Status(Code::kInvalid, "a region's descriptor must be open for reading and writing");
  }
  if (static_cast<uint64_t>(st.st_size) != size) {
    return Status(Code::kInvalid, "the memfd has " + std::to_string(st.st_size) +
                                      " bytes, not the " + std::to_string(size) + " declared");
  }
  return Status::Ok();
}

StatusOr<Mapping> Mapping::Map(int fd, uint64_t size) {
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return Errno("mapping a region");
  Mapping m;
  m.data_ = static_cast<char*>(p);
  m.size_ = size;
  return m;
}

Mapping::~Mapping() {
  if (data_) munmap(data_, size_);
}
Mapping::Mapping(Mapping&& o) noexcept
    : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
Mapping& Mapping::operator=(Mapping&& o) noexcept {
  if (this != &o) {
    if (data_) munmap(data_, size_);
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
  }
  return *this;
}

}  // namespace gpuq
