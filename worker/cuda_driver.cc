#include "worker/cuda_driver.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstring>

#include "worker/module_image.h"

namespace gpuq::worker {

#define GPUQ_STR2(x) #x
#define GPUQ_STR(x) GPUQ_STR2(x)

std::string CudaDriver::Name(CUresult r) const {
  const char* name = nullptr;
  if (cuGetErrorName && cuGetErrorName(r, &name) == CUDA_SUCCESS && name) return name;
  return "CUDA error " + std::to_string(static_cast<int>(r));
}

std::string CudaDriver::Describe(CUresult r) const {
  std::string s = Name(r);
  const char* text = nullptr;
  if (cuGetErrorString && cuGetErrorString(r, &text) == CUDA_SUCCESS && text) {
    s += ": ";
    s += text;
  }
  return s;
}

StatusOr<std::shared_ptr<const CudaDriver>> LoadCudaDriver() {
  // Never unloaded: the driver lives as long as the process.
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    return Error(Code::kUnavailable,
                 "no CUDA driver on this machine (libcuda.so.1 cannot be loaded)");
  }
  auto d = std::make_shared<CudaDriver>();
#define GPUQ_CUDA_LOAD(fn)                                                        \
  d->fn = reinterpret_cast<decltype(&::fn)>(dlsym(lib, GPUQ_STR(fn)));            \
  if (!d->fn) {                                                                   \
    return Error(Code::kUnavailable,                                              \
                 std::string("the CUDA driver lacks ") + GPUQ_STR(fn) +           \
                     " (driver too old for CUDA 12 features?)");                  \
  }
  GPUQ_CUDA_FUNCTIONS(GPUQ_CUDA_LOAD)
#undef GPUQ_CUDA_LOAD
  d->cuFuncGetParamInfo =
      reinterpret_cast<decltype(&::cuFuncGetParamInfo)>(dlsym(lib, "cuFuncGetParamInfo"));
  CUresult r = d->cuInit(0);
  if (r == CUDA_ERROR_NO_DEVICE) {
    return Error(Code::kNotFound, "the CUDA driver sees no GPU");
  }
  if (r != CUDA_SUCCESS) {
    return Error(Code::kUnavailable, "cuInit: " + d->Describe(r));
  }
  return std::shared_ptr<const CudaDriver>(std::move(d));
}

std::optional<std::vector<size_t>> ParamSizes(const CudaDriver& cu, CUfunction fn) {
  if (!cu.cuFuncGetParamInfo) return std::nullopt;
  std::vector<size_t> sizes;
  // A kernel takes at most 32 KiB of parameters: 4096 of 8 bytes, or
  // fewer than that of any size.
  for (size_t i = 0; i <= 32768; ++i) {
    size_t offset = 0, size = 0;
    const CUresult r = cu.cuFuncGetParamInfo(fn, i, &offset, &size);
    if (r == CUDA_ERROR_INVALID_VALUE) return sizes;  // past the last
    if (r != CUDA_SUCCESS) return std::nullopt;
    sizes.push_back(size);
  }
  return std::nullopt;
}

Status KeepPoolMemory(const CudaDriver& cu, CUdevice dev) {
  CUmemoryPool pool;
  GPUQ_CU_CHECK(cu, cuDeviceGetDefaultMemPool(&pool, dev), Code::kUnavailable);
  cuuint64_t keep = ~cuuint64_t{0};
  GPUQ_CU_CHECK(cu, cuMemPoolSetAttribute(pool, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &keep),
                Code::kUnavailable);
  return Status::Ok();
}

uint64_t ResidentThreads(const CudaDriver& cu, CUdevice dev) {
  int sms = 0, per_sm = 0;
  if (cu.cuDeviceGetAttribute(&sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev) !=
          CUDA_SUCCESS ||
      cu.cuDeviceGetAttribute(&per_sm, CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR, dev) !=
          CUDA_SUCCESS) {
    return 0;
  }
  return static_cast<uint64_t>(std::max(sms, 0)) * static_cast<uint64_t>(std::max(per_sm, 0));
}

namespace {

std::string Mib(uint64_t bytes) {
  if (bytes % (1 << 20) == 0) return std::to_string(bytes >> 20) + " MiB";
  return std::to_string(bytes) + " bytes";
}

// PTX compiled for the current context's device, as the loader would.
LoadedModule JitPtx(const CudaDriver& cu, const std::string& ptx, std::string* cubin) {
  LoadedModule out;
  CUlinkState link = nullptr;
  if ((out.error = cu.cuLinkCreate(0, nullptr, nullptr, &link)) != CUDA_SUCCESS) return out;
  const size_t size = std::strlen(ptx.c_str()) + 1;  // with its NUL
  void* image = nullptr;
  size_t image_size = 0;
  out.error = cu.cuLinkAddData(link, CU_JIT_INPUT_PTX, const_cast<char*>(ptx.c_str()), size,
                               "module.ptx", 0, nullptr, nullptr);
  if (out.error == CUDA_SUCCESS) out.error = cu.cuLinkComplete(link, &image, &image_size);
  if (out.error == CUDA_SUCCESS) cubin->assign(static_cast<const char*>(image), image_size);
  (void)cu.cuLinkDestroy(link);  // owns `image`
  return out;
}

}  // namespace

LoadedModule LoadModule(const CudaDriver& cu, const std::string& image,
                        const ModuleBounds& bounds) {
  LoadedModule out;
  std::string jitted;
  const std::string* cubin = &image;
  if (!IsElfImage(image)) {
    out = JitPtx(cu, image, &jitted);
    if (out.error != CUDA_SUCCESS) return out;
    cubin = &jitted;
  }
  auto bytes = ModuleDeviceBytes(*cubin);
  if (bytes.ok()) out.device_bytes = *bytes;
  if (bounds.module_bytes) {
    if (!bytes.ok()) {
      out.refused = bytes.status();
      return out;
    }
    if (*bytes > bounds.module_bytes) {
      out.refused = Status(
          Code::kResourceExhausted,
          "the module's variables and code take " + Mib(*bytes) +
              " of device memory when loaded, over the limit of " + Mib(bounds.module_bytes) +
              " per module (__device__ arrays of that size belong in buffers)");
      return out;
    }
  }
  out.error = cu.cuModuleLoadData(&out.module, cubin->c_str());
  if (out.error != CUDA_SUCCESS) out.module = nullptr;
  return out;
}

Status CheckLocalMemory(const CudaDriver& cu, CUfunction fn, const ModuleBounds& bounds) {
  if (!bounds.local_bytes || !bounds.resident_threads) return Status::Ok();
  int local = 0;
  if (cu.cuFuncGetAttribute(&local, CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, fn) != CUDA_SUCCESS ||
      local <= 0) {
    return Status::Ok();
  }
  const uint64_t per_thread = static_cast<uint64_t>(local);
  if (per_thread > bounds.local_bytes / bounds.resident_threads) {
    return Status(Code::kResourceExhausted,
                  "the kernel needs " + std::to_string(per_thread) +
                      " bytes of local memory per thread, which the driver reserves for each "
                      "of the device's " + std::to_string(bounds.resident_threads) +
                      " resident threads: over the limit of " + Mib(bounds.local_bytes) +
                      " (at most " + std::to_string(bounds.local_bytes / bounds.resident_threads) +
                      " bytes per thread)");
  }
  return Status::Ok();
}

bool IsSticky(CUresult r) {
  switch (r) {
    case CUDA_ERROR_ILLEGAL_ADDRESS:
    case CUDA_ERROR_ILLEGAL_INSTRUCTION:
    case CUDA_ERROR_MISALIGNED_ADDRESS:
    case CUDA_ERROR_INVALID_ADDRESS_SPACE:
    case CUDA_ERROR_INVALID_PC:
    case CUDA_ERROR_HARDWARE_STACK_ERROR:
    case CUDA_ERROR_LAUNCH_FAILED:
    case CUDA_ERROR_ASSERT:
    case CUDA_ERROR_LAUNCH_TIMEOUT:
    case CUDA_ERROR_ECC_UNCORRECTABLE:
    case CUDA_ERROR_CONTEXT_IS_DESTROYED:
      return true;
    default:
      return false;
  }
}

}  // namespace gpuq::worker
