// The clients' and workers' end of the region channel (PROTOCOL.md,
// "Regions"): a connection to the broker's region socket, opened with its
// hello, and its messages read with the descriptors they carry.
#pragma once

#include <string>

#include "gpuq/status.h"
#include "schema/messages.h"
#include "util/fd.h"

namespace gpuq::schema {

// Connects to the region socket of the broker whose local directory is
// `local_dir`, and says hello: as a worker with `token`, or as a client when
// `token` is empty.
StatusOr<UniqueFd> ConnectRegionChannel(const std::string& local_dir, const std::string& token);

// Sends `m`, with descriptor `pass` unless it is -1.
Status SendRegionMessage(int sock, const RegionMessage& m, int pass = -1);

// One message: false when `dontwait` and none is waiting; kUnavailable when
// the broker closed the channel. `fd` gets the descriptor it carried.
StatusOr<bool> ReadRegionMessage(int sock, bool dontwait, RegionMessage* m, UniqueFd* fd);

}  // namespace gpuq::schema
