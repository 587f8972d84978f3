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

// A timed launch's two events (its time on the device, once it ended).
class SessionMark {
 public:
  virtual ~SessionMark() = default;
};

// A kernel of a loaded module.
class SessionKernel {
 public:
  virtual ~SessionKernel() = default;
  // What its module took of the device when loaded (its variables and
  // code: ModuleDeviceBytes), outside every buffer.
  uint64_t device_bytes = 0;
};

// Host memory for the bytes of one write or read, until this goes: from
// SessionStream::Staging.
class SessionStaging {
 public:
  virtual ~SessionStaging() = default;
  char* data() { return data_; }
  uint64_t size() const { return size_; }

 protected:
  char* data_ = nullptr;
  uint64_t size_ = 0;
};

class SessionStream {
 public:
  virtual ~SessionStream() = default;
  // Each enqueues in stream order; an error is immediate and leaves the
  // stream as it was. Pointers are the device's.
  // `size` bytes, zero-filled before anything after it runs (unless not
  // `zeroed`: for memory a copy fills whole next).
  virtual StatusOr<uint64_t> Alloc(uint64_t size, bool zeroed) = 0;
  // After what was enqueued before it.
  virtual void Free(uint64_t ptr) = 0;
  virtual Status Copy(uint64_t dst, uint64_t src, uint64_t size) = 0;
  virtual Status Fill(uint64_t dst, uint8_t value, uint64_t size) = 0;
  // `params` as cuLaunchKernel takes them. With `timed`, a mark that times
  // the launch (Elapsed); otherwise null.
  virtual StatusOr<std::unique_ptr<SessionMark>> Launch(const SessionKernel& k,
                                                        const schema::LaunchSpec& launch,
                                                        std::vector<void*>& params,
                                                        bool timed) = 0;
  // The stream's end word: a 32-bit word in host memory that the device
  // writes (Announce). By default the stream's own; UseEndWord moves it to
  // the start of `page` (4096 bytes, page-aligned, mapped until the stream
  // ends): memory its client maps too, which then learns of ends without
  // asking (PROTOCOL.md, "Sessions").
  virtual Status UseEndWord(void* page) = 0;
  // Enqueues, after everything enqueued before it, the write of `seq` into
  // the stream's reached word and, with `end_word`, of its low 32 bits into
  // the end word.
  virtual Status Announce(uint64_t seq, bool end_word) = 0;
  // Whether the reached word has reached `seq`. The reached word is the
  // process's own, a whole u64, which only the device writes: neither a
  // client that writes its end word nor a rid far past another (a u32
  // compare wraps) can make work that has not run look ended.
  virtual bool Reached(uint64_t seq) = 0;
  // Waits for `seq` to be reached, polling a while, then for everything
  // enqueued so far to end (which covers a seq never announced). An error
  // is a fault that ends the process: the context is unusable.
  virtual Status Wait(uint64_t seq) = 0;
  // The stream's watch word, which only its process sees (never its
  // client): Watch enqueues the write of `value` into it, after everything
  // enqueued before it. WatchWord is its address, which any thread may read
  // (atomically) while the stream lives. The run-time limit's watchdog
  // writes an odd value before each launch and an even one after it, and
  // times how long the word stays odd.
  virtual Status Watch(uint32_t value) = 0;
  virtual const uint32_t* WatchWord() const = 0;
  // Announce(seq) and Watch(value) as one command (cheaper than two).
  virtual Status AnnounceAndWatch(uint64_t seq, bool end_word, uint32_t value) = 0;
  // A timed launch's nanoseconds on the device, once it has ended.
  virtual uint64_t Elapsed(SessionMark& m) = 0;
  // Copies between host memory and the device, enqueued. Host memory the
  // device has pinned (SessionDevice::Pin) must stay as it is (CopyIn), and
  // holds the bytes (CopyOut), once a later Wait or Reached covers the copy;
  // other host memory is copied through staging before the call returns.
  virtual Status CopyIn(uint64_t dst, const void* src, uint64_t size) = 0;
  virtual Status CopyOut(void* dst, uint64_t src, uint64_t size) = 0;
  // `size` bytes of host memory pinned for the device, for a write's or a
  // read's bytes (so that CopyIn and CopyOut of them are DMAs the stream
  // runs in order, not staged copies the call waits for); null where the
  // stream has none to give (its bytes are staged as other memory's are).
  // Destroyed on the stream's thread, before the stream.
  virtual std::unique_ptr<SessionStaging> Staging(uint64_t) { return nullptr; }
};

// Host memory pinned (page-locked) for the device, until this goes.
class SessionPinned {
 public:
  virtual ~SessionPinned() = default;
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
  virtual Status CheckLaunch(const SessionKernel& k, const schema::LaunchSpec& launch,
                             const std::vector<schema::Arg>& args) = 0;
  // Pins [p, p + size) of a mapping for copies at the bus's speed.
  virtual StatusOr<std::unique_ptr<SessionPinned>> Pin(void* p, uint64_t size) = 0;
};

}  // namespace gpuq::worker
