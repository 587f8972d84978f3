#!/usr/bin/env bash
# The run command of README.md: installs what is missing, builds, and shows
# gpuq at work on its embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DGPUQ_BUILD_TESTS=OFF \
  -DGPUQ_BUILD_BENCH=OFF >/dev/null
cmake --build build -j "$(nproc)"
export GPUQ_CACHE=${GPUQ_CACHE:-$(mktemp -d)/kernels.db}
demo=$(mktemp -d)
trap 'rm -rf "$demo"' EXIT
cat >"$demo/saxpy.cu" <<'CU'
extern "C" __global__ void saxpy(float a, const float* x, float* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + y[i];
}
template <typename T> __global__ void scale(T* x, T s, unsigned n) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] *= s;
}
CU
echo "== compile (a miss: NVRTC runs in its sandbox)"
build/bin/gpuq compile "$demo/saxpy.cu" --arch sm_90 --kernel saxpy --name-expression 'scale<float>'
echo "== the same again (a hit from the SQLite kernel cache)"
build/bin/gpuq compile "$demo/saxpy.cu" --arch sm_90 --kernel saxpy --name-expression 'scale<float>'
echo "== a source that tries to read a host file is refused"
printf '#include "/etc/passwd"\n' >"$demo/leak.cu"
build/bin/gpuq compile "$demo/leak.cu" || true
echo "== cache"
build/bin/gpuq cache stats
