#!/usr/bin/env bash
# Runs every benchmark on the GPU machine in one go (docs/BENCHMARKS.md).
# There: source .gpu/env.sh && bench/run_gpu.sh
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
echo "== $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1); $(date -u +%F)"
echo; echo "== floors: raw driver API in process"; gpuq-bench-floor
echo; echo "== peer: CuPy in process"; python3 "$here/cupy_bench.py"
echo; echo "== a, c: empty kernel through gpuq"; gpuq-bench-broker --gpu --seconds 3 | tail -n +3
echo; echo "== b: 4 KB saxpy through gpuq"; gpuq-bench-broker --gpu --job saxpy4k --seconds 3 | tail -n +3
echo; echo "== d: compile, cold vs SQLite hit vs memory hit"; gpuq-bench-compile 2>/dev/null | tail -7
echo; echo "== e: large buffers through gpuq"
for mib in 64 256; do gpuq-bench-broker --gpu --buffer-mib $mib; done
