// In-process floors on the GPU, with the same driver gpuq-worker uses
// (loaded at run time): what a job costs with no service in between.
//   gpuq-bench-floor [--iterations N] [--release]
// --release leaves the memory pool's release threshold at the driver's 0.
// Prints p50/p99 of an empty kernel launch + stream sync, the launch rate
// on one stream, and a 4 KB saxpy job (2 H2D, launch, D2H, sync).
#include <nvrtc.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "worker/cuda_driver.h"

using gpuq::worker::CudaDriver;
using Clock = std::chrono::steady_clock;

namespace {

constexpr char kSource[] = R"(
extern "C" __global__ void empty() {}
extern "C" __global__ void saxpy(float a, const float* x, float* y, unsigned n) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + y[i];
})";

std::string Cubin(const char* arch) {
  nvrtcProgram p;
  nvrtcCreateProgram(&p, kSource, "floor.cu", 0, nullptr, nullptr);
  std::string opt = std::string("--gpu-architecture=") + arch;
  const char* opts[] = {opt.c_str()};
  if (nvrtcCompileProgram(p, 1, opts) != NVRTC_SUCCESS) return "";
  size_t n = 0;
  nvrtcGetCUBINSize(p, &n);
  std::string cubin(n, '\0');
  nvrtcGetCUBIN(p, cubin.data());
  nvrtcDestroyProgram(&p);
  return cubin;
}

struct Stats {
  double p50, p99;
};
Stats Summarize(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return {v[v.size() / 2], v[v.size() * 99 / 100]};
}
double Us(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::micro>(b - a).count();
}

}  // namespace

int main(int argc, char** argv) {
  int iterations = 20000;
  if (argc >= 3 && std::strcmp(argv[1], "--iterations") == 0) iterations = std::atoi(argv[2]);
  auto loaded = gpuq::worker::LoadCudaDriver();
  if (!loaded.ok()) {
    std::fprintf(stderr, "%s\n", loaded.status().ToString().c_str());
    return 1;
  }
  const CudaDriver& cu = **loaded;
  CUdevice dev;
  CUcontext ctx;
  cu.cuDeviceGet(&dev, 0);
  cu.cuDevicePrimaryCtxRetain(&ctx, dev);
  cu.cuCtxSetCurrent(ctx);
  int major = 0, minor = 0;
  cu.cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev);
  cu.cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev);
  const std::string arch = "sm_" + std::to_string(major) + std::to_string(minor);
  const std::string cubin = Cubin(arch.c_str());
  CUmodule mod;
  CUfunction empty, saxpy;
  if (cubin.empty() || cu.cuModuleLoadData(&mod, cubin.data()) != CUDA_SUCCESS ||
      cu.cuModuleGetFunction(&empty, mod, "empty") != CUDA_SUCCESS ||
      cu.cuModuleGetFunction(&saxpy, mod, "saxpy") != CUDA_SUCCESS) {
    std::fprintf(stderr, "cannot build the floor kernels\n");
    return 1;
  }
  CUstream s;
  cu.cuStreamCreate(&s, CU_STREAM_NON_BLOCKING);
  const bool keep = !(argc >= 2 && std::strcmp(argv[argc - 1], "--release") == 0);
  if (keep) (void)gpuq::worker::KeepPoolMemory(cu, dev);  // as gpuq-worker does

  // Empty kernel: launch + sync.
  std::vector<double> launch;
  for (int i = 0; i < iterations + 1000; ++i) {
    auto t0 = Clock::now();
    cu.cuLaunchKernel(empty, 1, 1, 1, 1, 1, 1, 0, s, nullptr, nullptr);
    cu.cuStreamSynchronize(s);
    if (i >= 1000) launch.push_back(Us(t0, Clock::now()));
  }
  // Launch rate, one stream, sync at the end.
  const int n_rate = 200000;
  auto t0 = Clock::now();
  for (int i = 0; i < n_rate; ++i) cu.cuLaunchKernel(empty, 1, 1, 1, 1, 1, 1, 0, s, nullptr, nullptr);
  cu.cuStreamSynchronize(s);
  const double rate = n_rate / (Us(t0, Clock::now()) / 1e6);

  // 4 KB saxpy job: device buffers from the stream-ordered pool, as the worker.
  const unsigned n = 1024;
  std::vector<float> x(n, 1.0f), y(n, 2.0f), out(n);
  std::vector<double> job;
  for (int i = 0; i < iterations / 2 + 1000; ++i) {
    auto j0 = Clock::now();
    CUdeviceptr dx, dy;
    cu.cuMemAllocAsync(&dx, n * 4, s);
    cu.cuMemAllocAsync(&dy, n * 4, s);
    cu.cuMemcpyHtoDAsync(dx, x.data(), n * 4, s);
    cu.cuMemcpyHtoDAsync(dy, y.data(), n * 4, s);
    float a = 2.0f;
    unsigned nn = n;
    void* params[] = {&a, &dx, &dy, &nn};
    cu.cuLaunchKernel(saxpy, 4, 1, 1, 256, 1, 1, 0, s, params, nullptr);
    cu.cuMemcpyDtoHAsync(out.data(), dy, n * 4, s);
    cu.cuMemFreeAsync(dx, s);
    cu.cuMemFreeAsync(dy, s);
    cu.cuStreamSynchronize(s);
    if (i >= 1000) job.push_back(Us(j0, Clock::now()));
  }
  const Stats l = Summarize(launch), j = Summarize(job);
  std::printf("| in-process floor (driver API, %s, pool %s) | p50 | p99 |\n|---|---|---|\n",
              arch.c_str(), keep ? "keeps memory" : "releases at sync");
  std::printf("| empty kernel launch + stream sync | %.1f us | %.1f us |\n", l.p50, l.p99);
  std::printf("| 4 KB saxpy job (alloc, 2 H2D, launch, D2H, free, sync) | %.1f us | %.1f us |\n",
              j.p50, j.p99);
  std::printf("\nlaunch rate, one stream: %.0f launches/s\n", rate);
  std::printf("check: out[0] = %.1f (want 4.0)\n", out[0]);
  cu.cuStreamDestroy(s);
  cu.cuModuleUnload(mod);
  cu.cuDevicePrimaryCtxRelease(dev);
  return out[0] == 4.0f ? 0 : 1;
}
