// gpuq-fake-session: a session process (worker/session_host.h) whose device
// is this test double's memory, for tests without a GPU. The session logic
// is gpuq-session's own; only the device differs. Kernels are known by
// their symbol:
//   inc(buf, n, v)   adds v (a byte) to each of n bytes at buf
//   fault(...)       a fault: the wait for it fails, as a sticky CUDA error
//   sleep_ms(ms)     takes ms milliseconds
//   endless(...)     never ends: nothing after it runs, and a wait for it
//                    never returns (as a kernel's endless loop); as the
//                    driver's module loads do, a Load waits while one runs
// any other symbol runs as a kernel that does nothing.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

#include "tests/fake_device.h"
#include "worker/module_image.h"
#include "worker/session_host.h"

namespace {

using namespace gpuq;
using namespace gpuq::worker;

// Kernels loaded and not yet unloaded, in the whole process.
std::atomic<int> kernels_loaded{0};

class FakeKernel : public SessionKernel {
 public:
  explicit FakeKernel(std::string symbol) : symbol(std::move(symbol)) { ++kernels_loaded; }
  ~FakeKernel() override { --kernels_loaded; }
  std::string symbol;
};

class FakeMark : public SessionMark {
 public:
  uint64_t ns = 0;
};

uint8_t* At(uint64_t p) { return reinterpret_cast<uint8_t*>(p); }

std::atomic<bool> endless_running{false};  // in any stream of the process

class FakeStream : public SessionStream {
 public:
  StatusOr<uint64_t> Alloc(uint64_t size, bool) override {
    auto* p = static_cast<uint8_t*>(calloc(1, size));
    if (!p) return Status(Code::kResourceExhausted, "out of memory");
    return reinterpret_cast<uint64_t>(p);
  }
  void Free(uint64_t ptr) override { free(At(ptr)); }
  Status Copy(uint64_t dst, uint64_t src, uint64_t size) override {
    memmove(At(dst), At(src), size);
    return Status::Ok();
  }
  Status Fill(uint64_t dst, uint8_t value, uint64_t size) override {
    memset(At(dst), value, size);
    return Status::Ok();
  }
  StatusOr<std::unique_ptr<SessionMark>> Launch(const SessionKernel& k,
                                                const schema::LaunchSpec&,
                                                std::vector<void*>& params,
                                                bool timed) override {
    const std::string& sym = static_cast<const FakeKernel&>(k).symbol;
    auto arg = [&](size_t i) { return i < params.size() ? *static_cast<uint64_t*>(params[i]) : 0; };
    const auto start = std::chrono::steady_clock::now();
    if (sym == "inc") {
      uint8_t* p = At(arg(0));
      const uint64_t n = arg(1);
      const uint8_t v = static_cast<uint8_t>(arg(2));
      for (uint64_t i = 0; i < n; ++i) p[i] = static_cast<uint8_t>(p[i] + v);
    } else if (sym == "fault") {
      faulted_ = true;  // sticky, as a CUDA context's: nothing after it runs
    } else if (sym == "endless") {
      endless_ = true;
      endless_running = true;
    } else if (sym == "sleep_ms") {
      std::this_thread::sleep_for(std::chrono::milliseconds(arg(0)));
    }
    if (!timed) return std::unique_ptr<SessionMark>();
    auto mark = std::make_unique<FakeMark>();
    mark->ns = static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                         std::chrono::steady_clock::now() - start)
                                         .count()) + 1;
    return std::unique_ptr<SessionMark>(std::move(mark));
  }
  Status UseEndWord(void* page) override {
    word_ = static_cast<uint32_t*>(page);
    return Status::Ok();
  }
  // The work is done by now (this device runs it at once): the word is
  // written at once, unless a fault stopped the stream.
  Status Announce(uint64_t seq, bool end_word) override {
    if (!faulted_ && !endless_) {
      if (end_word) {
        std::atomic_ref<uint32_t>(*word_).store(static_cast<uint32_t>(seq),
                                                std::memory_order_release);
      }
      reached_ = seq;
    }
    return Status::Ok();
  }
  // Written when the work before it has run: at once, but after an endless
  // kernel or a fault, never.
  Status Watch(uint32_t value) override {
    if (!faulted_ && !endless_) std::atomic_ref<uint32_t>(watch_).store(value, std::memory_order_release);
    return Status::Ok();
  }
  const uint32_t* WatchWord() const override { return &watch_; }
  Status AnnounceAndWatch(uint64_t seq, bool end_word, uint32_t value) override {
    (void)Watch(value);
    return Announce(seq, end_word);
  }
  // The process's own word, as the device's: the client's end word is
  // never read.
  bool Reached(uint64_t seq) override { return reached_ >= seq; }
  Status Wait(uint64_t) override {
    if (faulted_) return Status(Code::kKernelFault, "CUDA_ERROR_ILLEGAL_ADDRESS (test double)");
    // An endless kernel's wait ends with its process.
    while (endless_) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    return Status::Ok();
  }
  uint64_t Elapsed(SessionMark& m) override { return static_cast<FakeMark&>(m).ns; }
  Status CopyIn(uint64_t dst, const void* src, uint64_t size) override {
    memcpy(At(dst), src, size);
    return Status::Ok();
  }
  Status CopyOut(void* dst, uint64_t src, uint64_t size) override {
    memcpy(dst, At(src), size);
    return Status::Ok();
  }

 private:
  bool faulted_ = false;
  bool endless_ = false;  // sticky too: an endless kernel holds the stream
  alignas(4) uint32_t watch_ = 0;
  alignas(64) uint32_t own_word_ = 0;
  uint64_t reached_ = 0;  // written and read on the session's thread
  uint32_t* word_ = &own_word_;
};

class FakeSessionDevice : public SessionDevice {
 public:
  explicit FakeSessionDevice(const std::string& uuid)
      : info_(gpuq::testing::FakeDevice("Test Double", uuid, "sm_90")) {}
  const schema::DeviceInfo& info() const override { return info_; }
  StatusOr<std::unique_ptr<SessionStream>> NewStream() override {
    return std::unique_ptr<SessionStream>(std::make_unique<FakeStream>());
  }
  StatusOr<std::shared_ptr<SessionKernel>> Load(const std::string& image, schema::ImageKind,
                                                const std::string& symbol) override {
    while (endless_running.load()) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    // The image is the broker's real compile: the kernel must be in it.
    if (image.find(symbol) == std::string::npos) {
      return Status(Code::kNotFound, "no kernel '" + symbol + "' in the module");
    }
    auto k = std::make_shared<FakeKernel>(symbol);
    // What the module would take loaded, as the real device counts it.
    if (IsElfImage(image)) {
      if (auto bytes = ModuleDeviceBytes(image); bytes.ok()) k->device_bytes = *bytes;
    }
    // For the tests that count what the process keeps loaded.
    fprintf(stderr, "fake session: loaded %s, %d kernels loaded\n", symbol.c_str(),
            kernels_loaded.load());
    return std::shared_ptr<SessionKernel>(std::move(k));
  }
  StatusOr<std::unique_ptr<SessionPinned>> Pin(void*, uint64_t) override {
    return std::make_unique<SessionPinned>();
  }
  Status CheckLaunch(const SessionKernel&, const schema::LaunchSpec& l,
                     const std::vector<schema::Arg>&) override {
    if (l.block.Count() > info_.max_threads_per_block) {
      return Status(Code::kInvalid, "block is over the device's limits");
    }
    return Status::Ok();
  }

 private:
  schema::DeviceInfo info_;
};

}  // namespace

int main(int argc, char** argv) {
  return SessionProcessMain(
      argc, argv,
      [](const std::string& uuid, std::chrono::microseconds,
         const ModuleBounds&) -> StatusOr<std::unique_ptr<SessionDevice>> {
        return std::unique_ptr<SessionDevice>(std::make_unique<FakeSessionDevice>(uuid));
      });
}
