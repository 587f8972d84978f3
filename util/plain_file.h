// Reading a file that another process named and may still change: the local
// buffers of clients and workers (schema/PROTOCOL.md, "Local buffers").
//
// Such a file is never mapped: a peer that truncates a mapped file kills the
// reader with SIGBUS. It is opened without following a symbolic link and
// without blocking (a FIFO would block open() until a writer came), its type
// is checked on the open descriptor (not the name, which may be swapped in
// between), and it is read with pread, so that a file that shrinks after
// the check is a short read: an error, never a signal.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "util/fd.h"
#include "util/status.h"

namespace gpuq {

struct PlainFileCheck {
  std::optional<uint64_t> size;  // it must hold exactly this many bytes
  bool single_link = false;      // it must have no other name (no hard link)
};

// Opens `path` read-only (O_NOFOLLOW | O_NONBLOCK) and checks that it is a
// regular file passing `check`. kInvalid saying what is wrong (not found, a
// link, not a regular file, another size), naming `path`.
StatusOr<UniqueFd> OpenPlainFile(const std::string& path, const PlainFileCheck& check = {});

// Reads exactly `size` bytes from `fd` at offset 0 into `out`. kIoError
// naming `what` if the file ends first (it shrank) or a read fails.
Status ReadExactly(int fd, void* out, uint64_t size, const std::string& what);

}  // namespace gpuq
