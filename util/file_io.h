// The one loop that writes a buffer whole to a file descriptor.
#pragma once

#include <string>
#include <string_view>

#include "util/status.h"

namespace gpuq {

// Writes all of `data` to `fd`, retrying short writes and EINTR.
// kIoError naming `what` (a path) and errno's text on failure.
Status WriteAll(int fd, std::string_view data, const std::string& what);

}  // namespace gpuq
