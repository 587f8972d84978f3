#!/usr/bin/env bash
# The run command of README.md: installs what is missing, builds, and starts
# gpuqd on its embedded default: a local ipc endpoint, SQLite job store and
# kernel cache, and one supervised gpuq-worker per visible GPU. It then runs a
# demo job (on the GPU where there is one; without a GPU it shows the queue,
# the compile service and stats), and keeps serving until Ctrl-C.
#   scripts/demo.sh [--once]     --once: stop after the demo
set -euo pipefail
cd "$(dirname "$0")/.."
once=0
[ "${1:-}" = "--once" ] && once=1
scripts/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j "$(nproc)" --target gpuqd gpuq gpuq-worker gpuq-nvrtc
bin=build/bin
demo=$(mktemp -d)
cleanup() {
  [ -n "${broker_pid:-}" ] && kill "$broker_pid" 2>/dev/null && wait "$broker_pid" 2>/dev/null
  rm -rf "$demo"
}
trap cleanup EXIT

echo "== starting gpuqd (embedded default)"
"$bin/gpuqd" --ready-file "$demo/ready" &
broker_pid=$!
for _ in $(seq 100); do [ -f "$demo/ready" ] && break; sleep 0.1; done
[ -f "$demo/ready" ] || { echo "gpuqd did not start" >&2; exit 1; }
sleep 1  # workers register

cat >"$demo/saxpy.cu" <<'CU'
extern "C" __global__ void saxpy(float a, const float* x, float* y, unsigned n) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + y[i];
}
CU
python3 -c "import struct; open('$demo/x.bin','wb').write(struct.pack('<1024f', *range(1024)))"
python3 -c "import struct; open('$demo/y.bin','wb').write(struct.pack('<1024f', *([1.0]*1024)))"
"$bin/gpuq" devices
if grep -q '"uuid"' <<<"$("$bin/gpuq" devices --json)"; then
  echo "== a saxpy job on the GPU: y = 2 x + y"
  "$bin/gpuq" submit "$demo/saxpy.cu" --kernel saxpy --grid 4 --block 256 \
    --arg f32:2 --in "$demo/x.bin" --inout "$demo/y.bin" --arg u32:1024 \
    --wait --output "$demo/result"
  python3 -c "import struct; y = struct.unpack('<1024f', open('$demo/result.arg2.bin','rb').read()); print('y[0:4] =', y[0:4], '... y[1023] =', y[1023])"
else
  echo "== no GPU here: a job waits in the queue, and is canceled"
  id=$("$bin/gpuq" submit "$demo/saxpy.cu" --kernel saxpy --grid 4 --block 256 \
    --arg f32:2 --in "$demo/x.bin" --inout "$demo/y.bin" --arg u32:1024)
  "$bin/gpuq" status "$id"
  "$bin/gpuq" cancel "$id"
  echo "== the compile service works without a GPU"
  "$bin/gpuq" compile "$demo/saxpy.cu" --arch sm_90 --kernel saxpy
fi
echo "== gpuq stats"
"$bin/gpuq" stats
if [ $once -eq 0 ]; then
  echo "== gpuqd is serving on its default endpoint; Ctrl-C stops it"
  wait "$broker_pid"
fi
