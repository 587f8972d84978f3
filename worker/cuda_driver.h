// The CUDA driver API, loaded at run time (dlopen of libcuda.so.1), so that
// every gpuq program starts on a machine without a driver and the worker
// can say plainly that there is none. cuda.h is used for its types only.
#pragma once

#include <cuda.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "util/status.h"
#include "worker/module_image.h"

namespace gpuq::worker {

// Function pointers into libcuda, named after the API (versioned names such
// as cuMemGetInfo_v2 are resolved through cuda.h's macros). Immutable once
// loaded: safe to share between threads.
struct CudaDriver {
#define GPUQ_CUDA_FUNCTIONS(X)                                                           \
  X(cuInit) X(cuDriverGetVersion) X(cuGetErrorName) X(cuGetErrorString)                   \
  X(cuDeviceGetCount) X(cuDeviceGet) X(cuDeviceGetName) X(cuDeviceGetUuid)                \
  X(cuDeviceGetAttribute) X(cuDeviceTotalMem) X(cuDevicePrimaryCtxRetain)                 \
  X(cuDevicePrimaryCtxRelease) X(cuCtxSetCurrent) X(cuCtxSynchronize) X(cuMemGetInfo)     \
  X(cuModuleLoadData) X(cuModuleUnload) X(cuModuleGetFunction) X(cuFuncSetAttribute)      \
  X(cuFuncGetAttribute) X(cuLaunchKernel) X(cuStreamCreate) X(cuStreamDestroy)            \
  X(cuStreamSynchronize) X(cuEventCreate) X(cuEventDestroy) X(cuEventRecord)              \
  X(cuEventSynchronize) X(cuEventElapsedTime) X(cuMemAllocAsync) X(cuMemFreeAsync)        \
  X(cuMemcpyHtoDAsync) X(cuMemcpyDtoHAsync) X(cuMemsetD8Async) X(cuMemHostRegister)       \
  X(cuMemHostUnregister) X(cuDeviceGetDefaultMemPool) X(cuMemPoolSetAttribute)           \
  X(cuMemHostAlloc) X(cuMemFreeHost) X(cuMemHostGetDevicePointer) X(cuStreamWriteValue32)   \
  X(cuGraphCreate) X(cuGraphDestroy) X(cuGraphAddKernelNode) X(cuGraphAddEventRecordNode) \
  X(cuGraphInstantiate) X(cuGraphExecDestroy) X(cuGraphExecKernelNodeSetParams)           \
  X(cuGraphLaunch) X(cuEventQuery) X(cuMemcpyDtoDAsync) X(cuStreamQuery)                  \
  X(cuStreamBatchMemOp) X(cuLinkCreate) X(cuLinkAddData) X(cuLinkComplete) X(cuLinkDestroy)
#define GPUQ_CUDA_MEMBER(fn) decltype(&::fn) fn = nullptr;
  GPUQ_CUDA_FUNCTIONS(GPUQ_CUDA_MEMBER)
#undef GPUQ_CUDA_MEMBER
  // Optional (drivers of CUDA 12.4 on): null where the driver lacks it.
  decltype(&::cuFuncGetParamInfo) cuFuncGetParamInfo = nullptr;

  // "CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access was encountered"
  std::string Describe(CUresult r) const;
  std::string Name(CUresult r) const;
};

// The size of each of `fn`'s parameters, in order; nullopt where the
// driver cannot say (a driver before CUDA 12.4).
std::optional<std::vector<size_t>> ParamSizes(const CudaDriver& cu, CUfunction fn);


// The threads `dev` holds at once: its multiprocessors × threads each.
uint64_t ResidentThreads(const CudaDriver& cu, CUdevice dev);

// A module loaded into the current context, or why not: `error` from the
// driver (possibly sticky: IsSticky), or `refused` (kResourceExhausted)
// where the module would take more device memory than `bounds` allow, in
// which case nothing was loaded. PTX is compiled for the context's device
// first (cuLink), so that its variables are counted as a CUBIN's are.
struct LoadedModule {
  CUmodule module = nullptr;
  CUresult error = CUDA_SUCCESS;
  Status refused;
  uint64_t device_bytes = 0;  // what it takes loaded (ModuleDeviceBytes)
};
LoadedModule LoadModule(const CudaDriver& cu, const std::string& image,
                        const ModuleBounds& bounds);

// kResourceExhausted where the local memory `fn` needs, for every thread
// the device holds, is over `bounds.local_bytes`.
Status CheckLocalMemory(const CudaDriver& cu, CUfunction fn, const ModuleBounds& bounds);

// Loads the driver and calls cuInit. kUnavailable with a plain message when
// there is no driver (libcuda.so.1 missing) or it cannot initialize.
StatusOr<std::shared_ptr<const CudaDriver>> LoadCudaDriver();

// True for errors after which the process's CUDA context is unusable
// (docs/DESIGN.md, "Processes": a new context in the same process fails
// too): the worker must exit and be restarted.
bool IsSticky(CUresult r);

// Makes the device's default stream-ordered memory pool keep what is freed
// instead of returning it to the driver at each synchronization (its
// release threshold is 0 by default): each allocation then reuses memory
// rather than mapping it anew.
Status KeepPoolMemory(const CudaDriver& cu, CUdevice dev);

}  // namespace gpuq::worker

// Checks a driver call; on failure returns a Status with `code`, the call
// and the CUDA error's name and text.
#define GPUQ_CU_CHECK(drv, call, code)                                       \
  do {                                                                        \
    CUresult _gpuq_cu = (drv).call;                                           \
    if (_gpuq_cu != CUDA_SUCCESS)                                             \
      return ::gpuq::Status((code), std::string(#call).substr(0, 40) + ": " + \
                                        (drv).Describe(_gpuq_cu));            \
  } while (0)
