#!/usr/bin/env python3
"""The peer gpuq is compared with: CuPy doing the same jobs in-process.

Prints p50/p99 of an empty kernel launch + sync, a 4 KB saxpy job
(cp.asarray x and y, kernel, .get()), and compile times: cold (a source
never seen, with CuPy's disk cache in a fresh folder) and cached.
Run on the GPU machine (its python3 has CuPy).
"""

import os
import statistics
import sys
import tempfile
import time

os.environ["CUPY_CACHE_DIR"] = tempfile.mkdtemp(prefix="cupy-cache-")
import cupy as cp  # noqa: E402
import numpy as np  # noqa: E402

SAXPY = r'''
extern "C" __global__ void saxpy(float a, const float* x, float* y, unsigned n) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + y[i];
}'''
EMPTY = 'extern "C" __global__ void empty() {}'
AXPB = r'''
extern "C" __global__ void axpb(float* y, float a, float b, unsigned n) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * y[i] + b;
}'''


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(len(v) * q))]


def timed(fn, n, warm=200):
    for _ in range(warm):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e6)
    return pct(out, 0.5), pct(out, 0.99)


def main():
    n_iter = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    stream = cp.cuda.Stream(non_blocking=True)
    empty = cp.RawKernel(EMPTY, "empty")
    saxpy = cp.RawKernel(SAXPY, "saxpy")

    def launch():
        with stream:
            empty((1,), (1,), ())
        stream.synchronize()

    x = np.ones(1024, dtype=np.float32)
    y = np.full(1024, 2.0, dtype=np.float32)

    def job():
        with stream:
            xd = cp.asarray(x)
            yd = cp.asarray(y)
            saxpy((4,), (256,), (np.float32(2.0), xd, yd, np.uint32(1024)))
            out = yd.get(stream=stream)
        stream.synchronize()
        return out

    def hundred():
        with stream:
            for _ in range(100):
                empty((1,), (1,), ())
        stream.synchronize()

    axpb = cp.RawKernel(AXPB, "axpb")

    def chain():
        # The 10-step chain of the several-launches benchmark: 4 KB in,
        # ten kernels, 4 KB out.
        with stream:
            yd = cp.asarray(y)
            for k in range(10):
                axpb((4,), (256,), (yd, np.float32(1.0 + 0.01 * k), np.float32(0.5),
                                    np.uint32(1024)))
            out = yd.get(stream=stream)
        stream.synchronize()
        return out

    lp = timed(launch, n_iter)
    jp = timed(job, n_iter // 2)
    hp = timed(hundred, 300, warm=20)
    cp_chain = timed(chain, 1000)
    assert job()[0] == 4.0

    cold = []
    for i in range(5):
        t0 = time.perf_counter()
        cp.RawKernel(SAXPY + "\n// unique %d %f\n" % (i, time.time()), "saxpy").compile()
        cold.append((time.perf_counter() - t0) * 1e3)
    src = SAXPY + "\n// cached\n"
    cp.RawKernel(src, "saxpy").compile()
    warm = []
    for _ in range(200):
        t0 = time.perf_counter()
        cp.RawKernel(src, "saxpy").compile()
        warm.append((time.perf_counter() - t0) * 1e6)

    print("| CuPy %s, in process | p50 | p99 |" % cp.__version__)
    print("|---|---|---|")
    print("| empty kernel launch + stream sync | %.1f us | %.1f us |" % lp)
    print("| 4 KB saxpy job (asarray x2, kernel, get) | %.1f us | %.1f us |" % jp)
    print("| 100 empty launches + sync, per launch | %.2f us | %.2f us |" % (hp[0] / 100, hp[1] / 100))
    print("| 10-step chain over 4 KB (asarray, 10 kernels, get) | %.1f us | %.1f us |" % cp_chain)
    print("| compile, cold (new source) | %.1f ms | |" % statistics.median(cold))
    print("| compile, cached (same source, new RawKernel) | %.1f us | |" % statistics.median(warm))


if __name__ == "__main__":
    main()
