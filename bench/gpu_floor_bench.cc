// In-process floors on the GPU, with the same driver gpuq-worker uses
// (loaded at run time): what a job costs with no service in between.
//   gpuq-bench-floor [--iterations N] [--release]
// --release leaves the memory pool's release threshold at the driver's 0.
// Prints p50/p99 of an empty kernel launch + stream sync, the launch rate
// on one stream, and a 4 KB saxpy job (2 H2D, launch, D2H, sync).
#include <nvrtc.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "util/sealed_memfd.h"
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
  // Empty jobs as gpuq-worker's executors run them (4 timing events, launch,
  // sync, 3 elapsed-time reads), T threads each with its own stream: the
  // worker's own ceiling on jobs/s.
  auto worker_rate = [&](int threads) {
    std::atomic<uint64_t> jobs{0};
    std::atomic<bool> stop{false};
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t) {
      ts.emplace_back([&] {
        cu.cuCtxSetCurrent(ctx);
        CUstream st;
        CUevent ev[4];
        cu.cuStreamCreate(&st, CU_STREAM_NON_BLOCKING);
        for (auto& e : ev) cu.cuEventCreate(&e, CU_EVENT_DEFAULT);
        while (!stop.load(std::memory_order_relaxed)) {
          cu.cuEventRecord(ev[0], st);
          cu.cuEventRecord(ev[1], st);
          cu.cuLaunchKernel(empty, 1, 1, 1, 1, 1, 1, 0, st, nullptr, nullptr);
          cu.cuEventRecord(ev[2], st);
          cu.cuEventRecord(ev[3], st);
          cu.cuStreamSynchronize(st);
          float ms[3];
          for (int k = 0; k < 3; ++k) cu.cuEventElapsedTime(&ms[k], ev[k], ev[k + 1]);
          jobs.fetch_add(1, std::memory_order_relaxed);
        }
        for (auto& e : ev) cu.cuEventDestroy(e);
        cu.cuStreamDestroy(st);
      });
    }
    const auto w0 = Clock::now();
    std::this_thread::sleep_for(std::chrono::seconds(1));
    const double r = jobs.load() / (Us(w0, Clock::now()) / 1e6);
    stop = true;
    for (auto& th : ts) th.join();
    return r;
  };
  const double w1 = worker_rate(1), w4 = worker_rate(4), w8 = worker_rate(8);

  // The floor of a job of several launches: 100 empty launches in a row and
  // one sync, per launch; and the same 100 as an instantiated CUDA graph.
  std::vector<double> burst, graph_burst;
  for (int i = 0; i < 1200; ++i) {
    auto b0 = Clock::now();
    for (int k = 0; k < 100; ++k) cu.cuLaunchKernel(empty, 1, 1, 1, 1, 1, 1, 0, s, nullptr, nullptr);
    cu.cuStreamSynchronize(s);
    if (i >= 200) burst.push_back(Us(b0, Clock::now()) / 100.0);
  }
  // What a job of several launches adds per launch: an event recorded
  // after each (per-launch timing), and a 4-byte progress word the GPU
  // writes after each (cuStreamWriteValue32 to mapped host memory).
  void* word = nullptr;
  CUdeviceptr word_dev = 0;
  cu.cuMemHostAlloc(&word, 4, CU_MEMHOSTALLOC_DEVICEMAP);
  cu.cuMemHostGetDevicePointer(&word_dev, word, 0);
  std::vector<CUevent> marks(101);
  for (auto& e : marks) cu.cuEventCreate(&e, CU_EVENT_DEFAULT);
  auto per_launch = [&](bool events, bool memop, unsigned flags) {
    std::vector<double> v;
    for (int i = 0; i < 700; ++i) {
      auto b0 = Clock::now();
      if (events) cu.cuEventRecord(marks[0], s);
      for (int k = 0; k < 100; ++k) {
        cu.cuLaunchKernel(empty, 1, 1, 1, 1, 1, 1, 0, s, nullptr, nullptr);
        if (events) cu.cuEventRecord(marks[k + 1], s);
        if (memop) cu.cuStreamWriteValue32(s, word_dev, k + 1, flags);
      }
      cu.cuStreamSynchronize(s);
      if (i >= 200) v.push_back(Us(b0, Clock::now()) / 100.0);
    }
    return Summarize(v).p50;
  };
  const double with_events = per_launch(true, false, 0),
               with_memop = per_launch(false, true, 0),
               with_both = per_launch(true, true, 0),
               with_both_nb = per_launch(true, true, CU_STREAM_WRITE_VALUE_NO_MEMORY_BARRIER);
  std::vector<double> elapsed;
  for (int i = 0; i < 200; ++i) {
    auto e0 = Clock::now();
    float ms = 0;
    for (int k = 0; k < 100; ++k) cu.cuEventElapsedTime(&ms, marks[k], marks[k + 1]);
    elapsed.push_back(Us(e0, Clock::now()) / 100.0);
  }
  CUgraph g = nullptr;
  CUgraphExec gx = nullptr;
  cu.cuGraphCreate(&g, 0);
  CUgraphNode prev = nullptr;
  for (int k = 0; k < 100; ++k) {
    CUDA_KERNEL_NODE_PARAMS p = {};
    p.func = empty;
    p.gridDimX = p.gridDimY = p.gridDimZ = 1;
    p.blockDimX = p.blockDimY = p.blockDimZ = 1;
    CUgraphNode node = nullptr;
    cu.cuGraphAddKernelNode(&node, g, prev ? &prev : nullptr, prev ? 1 : 0, &p);
    prev = node;
  }
  const bool graph_ok = cu.cuGraphInstantiate(&gx, g, 0) == CUDA_SUCCESS;
  for (int i = 0; graph_ok && i < 1200; ++i) {
    auto b0 = Clock::now();
    cu.cuGraphLaunch(gx, s);
    cu.cuStreamSynchronize(s);
    if (i >= 200) graph_burst.push_back(Us(b0, Clock::now()) / 100.0);
  }
  if (gx) cu.cuGraphExecDestroy(gx);
  if (g) cu.cuGraphDestroy(g);
  // The same graph with an event record node after each kernel, and the
  // cost of setting a kernel node's parameters in the instantiated graph.
  std::vector<double> graph_events, set_params;
  cu.cuGraphCreate(&g, 0);
  prev = nullptr;
  std::vector<CUgraphNode> kernels;
  for (int k = 0; k < 100; ++k) {
    CUDA_KERNEL_NODE_PARAMS p = {};
    p.func = empty;
    p.gridDimX = p.gridDimY = p.gridDimZ = 1;
    p.blockDimX = p.blockDimY = p.blockDimZ = 1;
    CUgraphNode node = nullptr;
    cu.cuGraphAddKernelNode(&node, g, prev ? &prev : nullptr, prev ? 1 : 0, &p);
    kernels.push_back(node);
    cu.cuGraphAddEventRecordNode(&prev, g, &node, 1, marks[k + 1]);
  }
  if (cu.cuGraphInstantiate(&gx, g, 0) == CUDA_SUCCESS) {
    for (int i = 0; i < 700; ++i) {
      auto b0 = Clock::now();
      cu.cuGraphLaunch(gx, s);
      cu.cuStreamSynchronize(s);
      if (i >= 200) graph_events.push_back(Us(b0, Clock::now()) / 100.0);
    }
    for (int i = 0; i < 200; ++i) {
      auto b0 = Clock::now();
      for (CUgraphNode n : kernels) {
        CUDA_KERNEL_NODE_PARAMS p = {};
        p.func = empty;
        p.gridDimX = p.gridDimY = p.gridDimZ = 1;
        p.blockDimX = p.blockDimY = p.blockDimZ = 1;
        cu.cuGraphExecKernelNodeSetParams(gx, n, &p);
      }
      set_params.push_back(Us(b0, Clock::now()) / 100.0);
    }
    cu.cuGraphExecDestroy(gx);
  }
  cu.cuGraphDestroy(g);

  // Ways to learn that one launch has ended (a session's answer to a launch,
  // PROTOCOL.md "Sessions"), each launch on an idle stream: a sync; polling
  // the stream; polling an event recorded after it; a word the GPU writes
  // after it into mapped host memory, polled; and the last two with the
  // launch's time from a start and an end event.
  volatile uint32_t* const seen = static_cast<volatile uint32_t*>(word);
  uint32_t seq = 0;
  *seen = 0;
  auto ended = [&](int how) {
    std::vector<double> v;
    for (int i = 0; i < iterations / 2 + 500; ++i) {
      auto e0 = Clock::now();
      const bool timed = how >= 4;
      if (timed) cu.cuEventRecord(marks[0], s);
      cu.cuLaunchKernel(empty, 1, 1, 1, 1, 1, 1, 0, s, nullptr, nullptr);
      if (timed || how == 2) cu.cuEventRecord(marks[1], s);
      if (how == 3 || how == 5) cu.cuStreamWriteValue32(s, word_dev, ++seq, 0);
      switch (how) {
        case 0: cu.cuStreamSynchronize(s); break;
        case 1: while (cu.cuStreamQuery(s) == CUDA_ERROR_NOT_READY) {} break;
        case 2: case 4: while (cu.cuEventQuery(marks[1]) == CUDA_ERROR_NOT_READY) {} break;
        case 3: case 5: while (*seen != seq) {} break;
      }
      if (timed) {
        float ms = 0;
        cu.cuEventElapsedTime(&ms, marks[0], marks[1]);
      }
      if (i >= 500) v.push_back(Us(e0, Clock::now()));
    }
    return Summarize(v);
  };
  Stats ways[6];
  for (int how = 0; how < 6; ++how) ways[how] = ended(how);
  // 1000 launches in flight, and each one's end learnt in turn: with an
  // event after each; with a word written after each; with neither, the end
  // of the last standing for all.
  auto in_flight = [&](int how) {
    constexpr int kN = 1000;
    std::vector<CUevent> ev(how == 1 ? kN : 0);
    for (auto& e : ev) cu.cuEventCreate(&e, CU_EVENT_DEFAULT);
    std::vector<double> r;
    for (int round = 0; round < 12; ++round) {
      auto f0 = Clock::now();
      for (int k = 0; k < kN; ++k) {
        cu.cuLaunchKernel(empty, 1, 1, 1, 1, 1, 1, 0, s, nullptr, nullptr);
        if (how == 1) cu.cuEventRecord(ev[k], s);
        if (how == 2) cu.cuStreamWriteValue32(s, word_dev, ++seq, 0);
      }
      if (how == 1) {
        for (int k = 0; k < kN; ++k) {
          while (cu.cuEventQuery(ev[k]) == CUDA_ERROR_NOT_READY) {}
        }
      } else if (how == 2) {
        while (*seen != seq) {}
      } else {
        cu.cuStreamSynchronize(s);
      }
      if (round >= 2) r.push_back(kN / (Us(f0, Clock::now()) / 1e6));
    }
    for (auto& e : ev) cu.cuEventDestroy(e);
    return Summarize(r).p50;
  };
  const double fl_plain = in_flight(0), fl_events = in_flight(1), fl_words = in_flight(2);
  for (auto& e : marks) cu.cuEventDestroy(e);
  cu.cuMemFreeHost(word);

  const Stats l = Summarize(launch), j = Summarize(job);
  std::printf("| in-process floor (driver API, %s, pool %s) | p50 | p99 |\n|---|---|---|\n",
              arch.c_str(), keep ? "keeps memory" : "releases at sync");
  std::printf("| empty kernel launch + stream sync | %.1f us | %.1f us |\n", l.p50, l.p99);
  std::printf("| 4 KB saxpy job (alloc, 2 H2D, launch, D2H, free, sync) | %.1f us | %.1f us |\n",
              j.p50, j.p99);
  std::printf("\nlaunch rate, one stream: %.0f launches/s\n", rate);
  std::printf("empty jobs as the worker runs them (events, launch, sync), 1 / 4 / 8 threads: "
              "%.0f / %.0f / %.0f jobs/s\n", w1, w4, w8);
  const Stats bs = Summarize(burst), gs = Summarize(graph_burst);
  std::printf("100 empty launches and one sync, per launch: %.2f us p50 (%.2f p99); as one "
              "CUDA graph: %.2f us p50 (%.2f p99)\n",
              bs.p50, bs.p99, gs.p50, gs.p99);
  std::printf("per launch of 100 with an event after each %.2f us, a progress write %.2f us, "
              "both %.2f us (write without a barrier: %.2f us); reading an elapsed time "
              "%.2f us; a graph with an event node after each kernel %.2f us; setting one "
              "kernel node's parameters %.2f us\n",
              with_events, with_memop, with_both, with_both_nb, Summarize(elapsed).p50,
              Summarize(graph_events).p50, Summarize(set_params).p50);
  std::printf("check: out[0] = %.1f (want 4.0)\n", out[0]);
  std::printf("\n| one empty launch on an idle stream, its end learnt by | p50 | p99 |\n"
              "|---|---|---|\n");
  const char* way_names[] = {
      "a stream sync", "polling the stream", "polling an event after it",
      "polling a word the GPU writes after it", "polling an end event; time from two events",
      "polling a word; time from two events"};
  for (int how = 0; how < 6; ++how) {
    std::printf("| %s | %.1f us | %.1f us |\n", way_names[how], ways[how].p50, ways[how].p99);
  }
  std::printf("\n1000 launches in flight, each end learnt: %.0f launches/s with an event after "
              "each, %.0f/s with a word written after each; %.0f/s learning only the last\n",
              fl_events, fl_words, fl_plain);

  // The floor of regions (PROTOCOL.md, "Regions"): copies between the GPU and
  // a mapped sealed memfd, page-locked once, against the same mapping
  // pageable; and what the locking costs by size.
  std::printf("\n| copy between the GPU and a mapped memfd | H2D GB/s | D2H GB/s |\n"
              "|---|---|---|\n");
  for (uint64_t mib : {64, 256}) {
    const uint64_t bytes = mib << 20;
    auto fd = gpuq::CreateSealedMemfd(bytes, "floor");
    if (!fd.ok()) break;
    auto map = gpuq::Mapping::Map(fd->get(), bytes);
    CUdeviceptr dbuf = 0;
    if (!map.ok() || cu.cuMemAllocAsync(&dbuf, bytes, s) != CUDA_SUCCESS) break;
    std::memset(map->data(), 0x5a, bytes);
    auto rate = [&](bool h2d) {
      std::vector<double> t;
      for (int i = 0; i < 6; ++i) {
        auto c0 = Clock::now();
        if (h2d) {
          cu.cuMemcpyHtoDAsync(dbuf, map->data(), bytes, s);
        } else {
          cu.cuMemcpyDtoHAsync(map->data(), dbuf, bytes, s);
        }
        cu.cuStreamSynchronize(s);
        if (i > 0) t.push_back(Us(c0, Clock::now()));
      }
      return bytes / 1e3 / Summarize(t).p50;  // GB/s
    };
    const double ph = rate(true), pd = rate(false);
    const bool pinned =
        cu.cuMemHostRegister(map->data(), bytes, CU_MEMHOSTREGISTER_PORTABLE) == CUDA_SUCCESS;
    const double rh = rate(true), rd = rate(false);
    if (pinned) cu.cuMemHostUnregister(map->data());
    cu.cuMemFreeAsync(dbuf, s);
    cu.cuStreamSynchronize(s);
    std::printf("| %llu MiB, pageable | %.1f | %.1f |\n", (unsigned long long)mib, ph, pd);
    std::printf("| %llu MiB, page-locked once%s | %.1f | %.1f |\n", (unsigned long long)mib,
                pinned ? "" : " (FAILED)", rh, rd);
  }
  std::printf("\nlocking a mapped memfd (cuMemHostRegister, first touch included):");
  for (uint64_t mib : {64, 1024, 8192}) {
    const uint64_t bytes = mib << 20;
    auto fd = gpuq::CreateSealedMemfd(bytes, "floor");
    if (!fd.ok()) break;
    auto map = gpuq::Mapping::Map(fd->get(), bytes);
    if (!map.ok()) break;
    auto r0 = Clock::now();
    const bool ok =
        cu.cuMemHostRegister(map->data(), bytes, CU_MEMHOSTREGISTER_PORTABLE) == CUDA_SUCCESS;
    const double ms = Us(r0, Clock::now()) / 1e3;
    if (ok) cu.cuMemHostUnregister(map->data());
    std::printf(" %llu MiB %.1f ms%s;", (unsigned long long)mib, ms, ok ? "" : " (FAILED)");
  }
  std::printf("\n");
  cu.cuStreamDestroy(s);
  cu.cuModuleUnload(mod);
  cu.cuDevicePrimaryCtxRelease(dev);
  return out[0] == 4.0f ? 0 : 1;
}
