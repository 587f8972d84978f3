// What a session process (worker/session_host.h) asks of its device: memory,
// copies, launches and marks on one stream per session. The GPU's is
// cuda_session_device.cc; the tests' double (tests/, no GPU) keeps memory
// of its own. A stream is used by one thread (its session's); Load and
// CheckLaunch by any.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "gpuq/status.h"
#include "schema/messages.h"

namespace gpuq::worker {

// A point in a stream, after what was enqueued before it.
class SessionMark {
 public:
  virtual ~SessionMark() = default;
};

// A kernel of a loaded module.
class SessionKernel {
 public:
  virtual ~SessionKernel() = default;
};

class SessionStream {
 public:
  virtual ~SessionStream() = default;
  // Each enqueues in stream order; an error is immediate and leaves the
  // stream as it was. Pointers are the device's.
  // `size` bytes, zero-filled before anything after it runs.
  virtual StatusOr<uint64_t> Alloc(uint64_t size) = 0;
  // After what was enqueued before it.
  virtual void Free(uint64_t ptr) = 0;
  // `src` must stay as it is until the mark after it is reached.
  virtual Status Write(uint64_t dst, const std::string& src) = 0;
  // `dst` (sized by the caller) is filled once the mark after it is reached.
  virtual Status Read(uint64_t src, std::string* dst) = 0;
  virtual Status Copy(uint64_t dst, uint64_t src, uint64_t size) = 0;
  virtual Status Fill(uint64_t dst, uint8_t value, uint64_t size) = 0;
  // `params` as cuLaunchKernel takes them. Returns a mark after the launch
  // that times it (Wait gives its nanoseconds on the device).
  virtual StatusOr<std::unique_ptr<SessionMark>> Launch(const SessionKernel& k,
                                                        const schema::LaunchSpec& launch,
                                                        std::vector<void*>& params) = 0;
  virtual StatusOr<std::unique_ptr<SessionMark>> Mark() = 0;
  // Whether `m` is reached, without waiting.
  virtual StatusOr<bool> Ready(SessionMark& m) = 0;
  // Waits for `m`; the nanoseconds a launch's mark took. An error here (or
  // from Ready) is a fault that ends the process: the context is unusable.
  virtual StatusOr<uint64_t> Wait(SessionMark& m) = 0;
};

class SessionDevice {
 public:
  virtual ~SessionDevice() = default;
  virtual const schema::DeviceInfo& info() const = 0;
  virtual StatusOr<std::unique_ptr<SessionStream>> NewStream() = 0;
  // A module's image (cubin or PTX) and the kernel `symbol` in it.
  virtual StatusOr<std::shared_ptr<SessionKernel>> Load(const std::string& image,
                                                        schema::ImageKind kind,
                                                        const std::string& symbol) = 0;
  // Checks a launch against the device's and the kernel's limits.
  virtual Status CheckLaunch(const SessionKernel& k, const schema::LaunchSpec& launch) = 0;
};

}  // namespace gpuq::worker
