// The one loop that writes a buffer whole to a file descriptor, and the one
// conversion of a file operation's errno into a Status.
#pragma once

#include <string>
#include <string_view>

#include "util/status.h"

namespace gpuq {

// The Status of a file operation on `what` (a path) that failed with errno
// `err`: kResourceExhausted when the file system has no room for it (ENOSPC,
// EDQUOT, or EFBIG: over the file size limit), its message then saying
// "no space"; kIoError otherwise. The message names `what` and errno's text.
Status FileError(const std::string& what, int err);

// Writes all of `data` to `fd`, retrying short writes and EINTR. On failure,
// FileError("writing " + what, errno): part of `data` may have been written.
Status WriteAll(int fd, std::string_view data, const std::string& what);

}  // namespace gpuq
