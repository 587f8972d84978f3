#include "worker/cuda_session_device.h"

#include <atomic>
#include <cstring>
#include <functional>
#include <map>
#include <vector>

#include "util/cpu_relax.h"
#include "util/mutex.h"
#include "worker/gpu_worker.h"

namespace gpuq::worker {
namespace {

using schema::LaunchSpec;

class CudaKernel : public SessionKernel {
 public:
  CudaKernel(std::shared_ptr<const CudaDriver> cu, CUmodule m, CUfunction f)
      : cu_(std::move(cu)), module_(m), fn_(f) {
    if (cu_->cuFuncGetAttribute(&max_threads_, CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK, fn_) !=
        CUDA_SUCCESS) {
      max_threads_ = -1;
    }
    params_ = ParamSizes(*cu_, fn_);
  }
  ~CudaKernel() override { (void)cu_->cuModuleUnload(module_); }
  CUfunction fn() const { return fn_; }
  int max_threads() const { return max_threads_; }  // per block (registers), once
  // Its parameters' sizes, asked once; null where the driver cannot say.
  const std::vector<size_t>* params() const { return params_ ? &*params_ : nullptr; }

 private:
  std::shared_ptr<const CudaDriver> cu_;
  CUmodule module_;
  CUfunction fn_;
  int max_threads_ = -1;
  std::optional<std::vector<size_t>> params_;
};

class CudaDevice;

// An event of a stream's pool (creating one costs a few µs), back to the
// pool when its last holder lets it go: a launch's end event is also the
// start of the launch after it when they run back to back.
using Event = std::shared_ptr<CUevent>;

class CudaMark : public SessionMark {
 public:
  CudaMark(Event end, Event start) : end_(std::move(end)), start_(std::move(start)) {}
  CUevent end() const { return *end_; }
  CUevent start() const { return start_ ? *start_ : nullptr; }

 private:
  Event end_, start_;
};

// A write's or a read's bytes in page-locked memory from its stream's pool,
// back to the pool when it goes.
class PinnedStaging : public SessionStaging {
 public:
  using Release = std::function<void(char*, uint64_t)>;
  PinnedStaging(char* block, uint64_t block_bytes, uint64_t size, Release release)
      : block_bytes_(block_bytes), release_(std::move(release)) {
    data_ = block;
    size_ = size;
  }
  ~PinnedStaging() override { release_(data_, block_bytes_); }

 private:
  uint64_t block_bytes_;
  Release release_;
};

class CudaStream : public SessionStream {
 public:
  CudaStream(const CudaDriver& cu, CUcontext ctx, CUstream s, std::chrono::microseconds spin)
      : cu_(cu), ctx_(ctx), stream_(s), spin_(spin) {}
  ~CudaStream() override {
    Current();
    (void)cu_.cuStreamSynchronize(stream_);
    last_end_.reset();
    {
      MutexLock lock(&mu_);
      for (auto* pool : {&timed_, &waited_}) {
        for (CUevent e : *pool) (void)cu_.cuEventDestroy(e);
      }
    }
    if (registered_) (void)cu_.cuMemHostUnregister(registered_);
    if (own_word_) (void)cu_.cuMemFreeHost(own_word_);
    {
      MutexLock lock(&mu_);
      for (auto& [bytes, blocks] : staging_free_) {
        for (char* b : blocks) (void)cu_.cuMemFreeHost(b);
      }
    }
    (void)cu_.cuStreamDestroy(stream_);
  }

  // Blocks of 4 KiB to 1 MiB (powers of two) kept for reuse, up to
  // kStagingCap bytes of page-locked host memory per session in all (they
  // go with the session); none for larger sizes or past the cap (the
  // driver stages those, as it always did).
  std::unique_ptr<SessionStaging> Staging(uint64_t size) override {
    static constexpr uint64_t kLargest = 1u << 20, kStagingCap = 8u << 20;
    if (size == 0 || size > kLargest) return nullptr;
    uint64_t bytes = 4096;
    while (bytes < size) bytes <<= 1;
    char* block = nullptr;
    {
      MutexLock lock(&mu_);
      auto& free = staging_free_[bytes];
      if (!free.empty()) {
        block = free.back();
        free.pop_back();
      } else if (staging_held_ + bytes <= kStagingCap) {
        Current();
        void* p = nullptr;
        if (cu_.cuMemHostAlloc(&p, bytes, CU_MEMHOSTALLOC_PORTABLE) == CUDA_SUCCESS) {
          block = static_cast<char*>(p);
          staging_held_ += bytes;
        }
      }
    }
    if (!block) return nullptr;
    return std::make_unique<PinnedStaging>(block, bytes, size, [this](char* b, uint64_t n) {
      MutexLock lock(&mu_);
      staging_free_[n].push_back(b);
    });
  }

  // The stream's own end word, until UseEndWord moves it; the reached
  // word and the watch word, which never move.
  Status Init(CUdevice dev) {
    Current();
    int wide = 0;
    if (cu_.cuDeviceGetAttribute(&wide, CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS,
                                 dev) != CUDA_SUCCESS ||
        !wide) {
      return Status(Code::kUnavailable,
                    "the GPU cannot write 64-bit words from a stream "
                    "(CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS), which sessions need");
    }
    GPUQ_CU_CHECK(cu_, cuMemHostAlloc(&own_word_, 64, CU_MEMHOSTALLOC_DEVICEMAP),
                  Code::kResourceExhausted);
    std::memset(own_word_, 0, 64);
    word_ = static_cast<uint32_t*>(own_word_);
    GPUQ_CU_CHECK(cu_, cuMemHostGetDevicePointer(&word_dev_, own_word_, 0),
                  Code::kResourceExhausted);
    reached_ = reinterpret_cast<uint64_t*>(static_cast<char*>(own_word_) + kReachedOffset);
    reached_dev_ = word_dev_ + kReachedOffset;
    watch_ = word_ + kWatchOffset / sizeof(uint32_t);
    watch_dev_ = word_dev_ + kWatchOffset;
    return Status::Ok();
  }

  StatusOr<uint64_t> Alloc(uint64_t size, bool zeroed) override {
    Other();
    CUdeviceptr p = 0;
    GPUQ_CU_CHECK(cu_, cuMemAllocAsync(&p, size, stream_), Code::kResourceExhausted);
    if (!zeroed) return static_cast<uint64_t>(p);
    if (CUresult e = cu_.cuMemsetD8Async(p, 0, size, stream_); e != CUDA_SUCCESS) {
      (void)cu_.cuMemFreeAsync(p, stream_);
      return Status(Code::kResourceExhausted, "zeroing a buffer: " + cu_.Describe(e));
    }
    return static_cast<uint64_t>(p);
  }
  void Free(uint64_t ptr) override {
    Other();
    (void)cu_.cuMemFreeAsync(ptr, stream_);
  }
  Status Copy(uint64_t dst, uint64_t src, uint64_t size) override {
    Other();
    GPUQ_CU_CHECK(cu_, cuMemcpyDtoDAsync(dst, src, size, stream_), Code::kLaunchError);
    return Status::Ok();
  }
  Status Fill(uint64_t dst, uint8_t value, uint64_t size) override {
    Other();
    GPUQ_CU_CHECK(cu_, cuMemsetD8Async(dst, value, size, stream_), Code::kLaunchError);
    return Status::Ok();
  }
  StatusOr<std::unique_ptr<SessionMark>> Launch(const SessionKernel& k, const LaunchSpec& l,
                                                std::vector<void*>& params,
                                                bool timed) override {
    Current();
    const auto& fn = static_cast<const CudaKernel&>(k).fn();
    if (!timed) {
      last_end_.reset();
      GPUQ_CU_CHECK(cu_,
                    cuLaunchKernel(fn, l.grid.x, l.grid.y, l.grid.z, l.block.x, l.block.y,
                                   l.block.z, l.shared_bytes, stream_, params.data(), nullptr),
                    Code::kLaunchError);
      return std::unique_ptr<SessionMark>();
    }
    // A launch behind one that has not ended starts when that one ends: the
    // end event before it is its start. Otherwise it gets a start event.
    Event start;
    if (last_end_ && cu_.cuEventQuery(*last_end_) == CUDA_ERROR_NOT_READY) {
      start = last_end_;
    } else {
      GPUQ_ASSIGN_OR_RETURN(start, NewEvent(kTimed));
      GPUQ_CU_CHECK(cu_, cuEventRecord(*start, stream_), Code::kLaunchError);
    }
    last_end_.reset();
    GPUQ_ASSIGN_OR_RETURN(Event end, NewEvent(kTimed));
    GPUQ_CU_CHECK(cu_,
                  cuLaunchKernel(fn, l.grid.x, l.grid.y, l.grid.z, l.block.x, l.block.y,
                                 l.block.z, l.shared_bytes, stream_, params.data(), nullptr),
                  Code::kLaunchError);
    GPUQ_CU_CHECK(cu_, cuEventRecord(*end, stream_), Code::kLaunchError);
    last_end_ = end;
    return std::unique_ptr<SessionMark>(std::make_unique<CudaMark>(end, start));
  }
  Status UseEndWord(void* page) override {
    Current();
    GPUQ_CU_CHECK(cu_, cuMemHostRegister(page, 4096, CU_MEMHOSTREGISTER_DEVICEMAP),
                  Code::kResourceExhausted);
    CUdeviceptr dev = 0;
    if (CUresult e = cu_.cuMemHostGetDevicePointer(&dev, page, 0); e != CUDA_SUCCESS) {
      (void)cu_.cuMemHostUnregister(page);
      return Status(Code::kResourceExhausted, "mapping the end word: " + cu_.Describe(e));
    }
    registered_ = page;
    word_ = static_cast<uint32_t*>(page);
    word_dev_ = dev;
    return Status::Ok();
  }
  Status Announce(uint64_t seq, bool end_word) override { return Write(seq, end_word, nullptr); }
  // Enqueues, as one command after everything before it: `seq` into the
  // reached word, with `end_word` its low 32 bits into the end word (the
  // client's, once moved), and `watch` into the watch word when given.
  Status Write(uint64_t seq, bool end_word, const uint32_t* watch) {
    Current();
    CUstreamBatchMemOpParams ops[3] = {};
    ops[0].writeValue.operation = CU_STREAM_MEM_OP_WRITE_VALUE_64;
    ops[0].writeValue.address = reached_dev_;
    ops[0].writeValue.value64 = seq;
    unsigned n = 1;
    if (end_word) {
      ops[n].writeValue.operation = CU_STREAM_MEM_OP_WRITE_VALUE_32;
      ops[n].writeValue.address = word_dev_;
      ops[n].writeValue.value = static_cast<uint32_t>(seq);
      ++n;
    }
    if (watch) {
      ops[n].writeValue.operation = CU_STREAM_MEM_OP_WRITE_VALUE_32;
      ops[n].writeValue.address = watch_dev_;
      ops[n].writeValue.value = *watch;
      ++n;
    }
    GPUQ_CU_CHECK(cu_, cuStreamBatchMemOp(stream_, n, ops, 0), Code::kLaunchError);
    return Status::Ok();
  }
  Status Watch(uint32_t value) override {
    Current();
    GPUQ_CU_CHECK(cu_, cuStreamWriteValue32(stream_, watch_dev_, value, 0), Code::kLaunchError);
    return Status::Ok();
  }
  Status AnnounceAndWatch(uint64_t seq, bool end_word, uint32_t value) override {
    return Write(seq, end_word, &value);
  }
  const uint32_t* WatchWord() const override { return watch_; }
  bool Reached(uint64_t seq) override {
    // The process's own word, which only the device writes (the client's
    // end word, which the client may write too, is never read here).
    return std::atomic_ref<const uint64_t>(*reached_).load(std::memory_order_acquire) >= seq;
  }
  Status Wait(uint64_t seq) override {
    Current();
    // Polled for a while before sleeping, as the runtime's default
    // schedule does (a short kernel ends before a sleep would): the
    // configured spin, or 50 µs.
    const auto until = std::chrono::steady_clock::now() +
                       std::max<std::chrono::microseconds>(spin_, std::chrono::microseconds(50));
    for (int i = 0; !Reached(seq); ++i) {
      CpuRelax();
      if ((i & 63) == 63 && std::chrono::steady_clock::now() > until) {
        // Then asleep (a blocking-sync event, without a spin) on an event
        // after everything enqueued so far; a fault shows here.
        GPUQ_ASSIGN_OR_RETURN(Event e, NewEvent(kWaited));
        CUresult r = cu_.cuEventRecord(*e, stream_);
        if (r == CUDA_SUCCESS) r = cu_.cuEventSynchronize(*e);
        if (r != CUDA_SUCCESS) return Status(Code::kKernelFault, cu_.Describe(r));
        return Status::Ok();
      }
    }
    return Status::Ok();
  }
  Status CopyIn(uint64_t dst, const void* src, uint64_t size) override {
    Other();
    if (size == 0) return Status::Ok();
    GPUQ_CU_CHECK(cu_, cuMemcpyHtoDAsync(dst, src, size, stream_), Code::kLaunchError);
    return Status::Ok();
  }
  Status CopyOut(void* dst, uint64_t src, uint64_t size) override {
    Other();
    if (size == 0) return Status::Ok();
    GPUQ_CU_CHECK(cu_, cuMemcpyDtoHAsync(dst, src, size, stream_), Code::kLaunchError);
    return Status::Ok();
  }
  uint64_t Elapsed(SessionMark& m) override {
    Current();
    auto& cm = static_cast<CudaMark&>(m);
    float ms = 0;
    CUresult r = cu_.cuEventElapsedTime(&ms, cm.start(), cm.end());
    if (r == CUDA_ERROR_NOT_READY && cu_.cuEventSynchronize(cm.end()) == CUDA_SUCCESS) {
      r = cu_.cuEventElapsedTime(&ms, cm.start(), cm.end());
    }
    if (r != CUDA_SUCCESS) return 0;
    return static_cast<uint64_t>(static_cast<double>(ms) * 1e6);
  }

 private:
  // Timed events time launches; a waited one is slept on (blocking sync,
  // without a spin) and never timed.
  enum Kind { kTimed, kWaited };

  void Current() {
    thread_local CUcontext current = nullptr;
    if (current != ctx_) {
      (void)cu_.cuCtxSetCurrent(ctx_);
      current = ctx_;
    }
  }
  // Work other than a launch: the next launch is not back to back.
  void Other() {
    Current();
    last_end_.reset();
  }
  StatusOr<Event> NewEvent(Kind kind) {
    CUevent e = nullptr;
    {
      MutexLock lock(&mu_);
      auto& pool = kind == kWaited ? waited_ : timed_;
      if (!pool.empty()) {
        e = pool.back();
        pool.pop_back();
      }
    }
    if (!e) {
      unsigned flags = CU_EVENT_DEFAULT;
      if (kind == kWaited) {
        flags |= CU_EVENT_DISABLE_TIMING;
        if (spin_.count() == 0) flags |= CU_EVENT_BLOCKING_SYNC;
      }
      GPUQ_CU_CHECK(cu_, cuEventCreate(&e, flags), Code::kResourceExhausted);
    }
    return Event(new CUevent(e), [this, kind](CUevent* ev) {
      MutexLock lock(&mu_);
      (kind == kWaited ? waited_ : timed_).push_back(*ev);
      delete ev;
    });
  }

  const CudaDriver& cu_;
  CUcontext ctx_;
  CUstream stream_;
  const std::chrono::microseconds spin_;
  Event last_end_;  // the latest launch's end, while nothing else follows it
  // cuMemHostAlloc'd: the default end word (the first 4 bytes), the
  // reached word at kReachedOffset and the watch word at kWatchOffset
  static constexpr size_t kWatchOffset = 32;
  static constexpr size_t kReachedOffset = 8;
  void* own_word_ = nullptr;
  void* registered_ = nullptr;  // the client's page, while it holds the word
  uint32_t* word_ = nullptr;
  CUdeviceptr word_dev_ = 0;
  uint64_t* reached_ = nullptr;     // in own_word_ at kReachedOffset
  CUdeviceptr reached_dev_ = 0;
  uint32_t* watch_ = nullptr;
  CUdeviceptr watch_dev_ = 0;
  Mutex mu_;
  std::vector<CUevent> timed_ GUARDED_BY(mu_), waited_ GUARDED_BY(mu_);
  std::map<uint64_t, std::vector<char*>> staging_free_ GUARDED_BY(mu_);  // by block size
  uint64_t staging_held_ GUARDED_BY(mu_) = 0;
};

// A mapping page-locked for the device (cuMemHostRegister), unlocked when it
// goes (after the streams that copied with it have ended).
class CudaPinned : public SessionPinned {
 public:
  CudaPinned(std::shared_ptr<const CudaDriver> cu, CUcontext ctx, void* p)
      : cu_(std::move(cu)), ctx_(ctx), p_(p) {}
  ~CudaPinned() override {
    (void)cu_->cuCtxSetCurrent(ctx_);
    (void)cu_->cuMemHostUnregister(p_);
  }

 private:
  std::shared_ptr<const CudaDriver> cu_;
  CUcontext ctx_;
  void* p_;
};

class CudaDevice : public SessionDevice {
 public:
  CudaDevice(std::shared_ptr<const CudaDriver> cu, CUdevice dev, CUcontext ctx,
             schema::DeviceInfo info, std::chrono::microseconds spin, const ModuleBounds& bounds)
      : cu_(std::move(cu)), dev_(dev), ctx_(ctx), info_(std::move(info)), spin_(spin),
        bounds_(bounds) {
    bounds_.resident_threads = ResidentThreads(*cu_, dev_);
  }
  ~CudaDevice() override { (void)cu_->cuDevicePrimaryCtxRelease(dev_); }

  const schema::DeviceInfo& info() const override { return info_; }

  StatusOr<std::unique_ptr<SessionStream>> NewStream() override {
    (void)cu_->cuCtxSetCurrent(ctx_);
    CUstream s = nullptr;
    GPUQ_CU_CHECK(*cu_, cuStreamCreate(&s, CU_STREAM_NON_BLOCKING), Code::kResourceExhausted);
    auto stream = std::make_unique<CudaStream>(*cu_, ctx_, s, spin_);
    GPUQ_RETURN_IF_ERROR(stream->Init(dev_));
    return std::unique_ptr<SessionStream>(std::move(stream));
  }

  StatusOr<std::shared_ptr<SessionKernel>> Load(const std::string& image, schema::ImageKind,
                                                const std::string& symbol) override {
    (void)cu_->cuCtxSetCurrent(ctx_);
    // The module's variables and the kernel's local memory are bounded as
    // in a worker (ModuleBounds, at their defaults): they are device memory
    // outside the session's buffers and its limit.
    LoadedModule load = LoadModule(*cu_, image, bounds_);
    if (load.error != CUDA_SUCCESS) {
      return Status(Code::kLaunchError, "loading the module: " + cu_->Describe(load.error));
    }
    if (!load.refused.ok()) return load.refused;
    CUmodule m = load.module;
    CUfunction f = nullptr;
    if (CUresult e = cu_->cuModuleGetFunction(&f, m, symbol.c_str()); e != CUDA_SUCCESS) {
      (void)cu_->cuModuleUnload(m);
      return Status(Code::kNotFound, "no kernel '" + symbol + "' in the module: " + cu_->Describe(e));
    }
    if (Status local = CheckLocalMemory(*cu_, f, bounds_); !local.ok()) {
      (void)cu_->cuModuleUnload(m);
      return local;
    }
    auto kernel = std::make_shared<CudaKernel>(cu_, m, f);
    kernel->device_bytes = load.device_bytes;
    return std::shared_ptr<SessionKernel>(std::move(kernel));
  }

  StatusOr<std::unique_ptr<SessionPinned>> Pin(void* p, uint64_t size) override {
    (void)cu_->cuCtxSetCurrent(ctx_);
    GPUQ_CU_CHECK(*cu_, cuMemHostRegister(p, size, CU_MEMHOSTREGISTER_PORTABLE),
                  Code::kResourceExhausted);
    return std::unique_ptr<SessionPinned>(std::make_unique<CudaPinned>(cu_, ctx_, p));
  }

  Status CheckLaunch(const SessionKernel& k, const LaunchSpec& launch,
                     const std::vector<schema::Arg>& args) override {
    thread_local CUcontext current = nullptr;
    if (current != ctx_) {
      (void)cu_->cuCtxSetCurrent(ctx_);
      current = ctx_;
    }
    const auto& kernel = static_cast<const CudaKernel&>(k);
    GPUQ_RETURN_IF_ERROR(
        CheckLaunchLimits(*cu_, info_, launch, kernel.fn(), kernel.max_threads()));
    return CheckArgs(kernel.params(), args);
  }

 private:
  std::shared_ptr<const CudaDriver> cu_;
  CUdevice dev_;
  CUcontext ctx_;
  schema::DeviceInfo info_;
  const std::chrono::microseconds spin_;
  ModuleBounds bounds_;  // set once, at construction
};

}  // namespace

StatusOr<std::unique_ptr<SessionDevice>> OpenCudaSessionDevice(
    std::shared_ptr<const CudaDriver> cu, const std::string& uuid,
    std::chrono::microseconds spin, const ModuleBounds& bounds) {
  int count = 0;
  GPUQ_CU_CHECK(*cu, cuDeviceGetCount(&count), Code::kUnavailable);
  for (int i = 0; i < count; ++i) {
    auto info = QueryDevice(*cu, i);
    if (!info.ok() || info->uuid != uuid) continue;
    CUdevice dev;
    GPUQ_CU_CHECK(*cu, cuDeviceGet(&dev, i), Code::kUnavailable);
    CUcontext ctx = nullptr;
    GPUQ_CU_CHECK(*cu, cuDevicePrimaryCtxRetain(&ctx, dev), Code::kUnavailable);
    (void)cu->cuCtxSetCurrent(ctx);
    (void)KeepPoolMemory(*cu, dev);
    return std::unique_ptr<SessionDevice>(
        std::make_unique<CudaDevice>(std::move(cu), dev, ctx, std::move(*info), spin, bounds));
  }
  return Status(Code::kNotFound, "no GPU " + uuid + " on this host");
}

}  // namespace gpuq::worker
