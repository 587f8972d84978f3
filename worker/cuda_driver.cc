#include "worker/cuda_driver.h"

#include <dlfcn.h>

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
