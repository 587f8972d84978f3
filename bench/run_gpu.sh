#!/usr/bin/env bash
# Runs every benchmark on the GPU machine in one go (docs/BENCHMARKS.md).
# There: source .gpu/env.sh && bench/run_gpu.sh
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
echo "== $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1); $(date -u +%F)"
echo; echo "== floors: raw driver API in process"; gpuq-bench-floor
echo; echo "== peer: CuPy in process"; python3 "$here/cupy_bench.py"
# Each through gpuq twice: threads that block between messages (the
# default), and --spin-us 500 (poll awake for 0.5 ms after each message).
for spin in 0 500; do
  echo; echo "== a, c: empty kernel through gpuq, --spin-us $spin"
  gpuq-bench-broker --gpu --seconds 3 --spin-us $spin | tail -n +3
  echo; echo "== b: 4 KB saxpy through gpuq, --spin-us $spin"
  gpuq-bench-broker --gpu --job saxpy4k --seconds 3 --spin-us $spin | tail -n +3
done
echo; echo "== sessions: a client of the GPU's host and its session's process"
for spin in 0 500; do gpuq-bench-session --spin-us $spin | tail -n +3; done
echo; echo "== jobs of several launches (100 empty launches; a 10-step chain vs 10 jobs)"
gpuq-bench-broker --gpu --job launches | tail -n +3
echo; echo "== the job store's SQLite work per job (c's share of the broker loop)"
gpuq-bench-store 2>/dev/null | tail -4
echo; echo "== d: compile, cold vs SQLite hit vs memory hit"; gpuq-bench-compile 2>/dev/null | tail -7
echo; echo "== e: large buffers through gpuq"
for mib in 64 256; do gpuq-bench-broker --gpu --buffer-mib $mib; done
