// A session process: the sessions of one tenant on one GPU (PROTOCOL.md,
// "Sessions"; docs/DESIGN.md, "Sessions"). The broker starts it with a
// control channel (a stream socket pair) and the path of the socket on which
// the tenant's clients reach it directly; nothing of another tenant ever
// runs in it, so a kernel can reach only its own tenant's buffers, and a
// fault or a kill ends only this tenant's sessions on this GPU.
//
// Threads: one serves the sockets (the control channel, the listener, every
// client connection) and enqueues each request's work on its session's
// stream; each session has a thread that waits for that work in order and
// answers its client, so that a client hears of its requests in the order it
// made them.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "worker/module_image.h"
#include "worker/session_device.h"

namespace gpuq::worker {

struct SessionHostOptions {
  int control_fd = -1;      // the broker's end is the other of the pair
  std::string socket_path;  // where clients connect (created here, 0600)
  std::string tenant;
  size_t max_data = 256u << 20;       // a write's or a read's bytes
  uint64_t max_attach = 4ull << 30;   // host memory attached to a session, in all
  std::chrono::microseconds spin{0};  // completion threads poll this long before sleeping
  size_t max_modules = 256;           // kernels kept loaded that no session holds, oldest dropped
  // Device memory the loaded kernels' modules take in all (their
  // variables and code), held or not; 0: no bound. Past it the oldest
  // unheld are dropped, and a kernel that still does not fit is refused.
  uint64_t module_budget = 1ull << 30;
  size_t max_buffers = 65536;         // buffers a session holds at once
};

class SessionHost {
 public:
  SessionHost(SessionHostOptions options, std::unique_ptr<SessionDevice> device);
  ~SessionHost();
  // Serves until the broker closes the control channel. Returns the
  // process's exit code (kExitFault after a fault).
  int Run();

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

// A session process's main: its command line (--control-fd, --socket,
// --tenant, --device, --spin-us, --max-data-mb, --max-attach-mb, --max-kernels,
// --module-memory-mib, --local-memory-mib, as the broker starts it), its device
// from `open`, and Run(). Returns the exit code.
using OpenSessionDevice = std::function<StatusOr<std::unique_ptr<SessionDevice>>(
    const std::string& uuid, std::chrono::microseconds spin, const ModuleBounds& bounds)>;
int SessionProcessMain(int argc, char** argv, const OpenSessionDevice& open);

}  // namespace gpuq::worker
