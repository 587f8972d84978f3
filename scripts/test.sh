#!/usr/bin/env bash
# The test command of README.md (and of .ci/run): installs what is missing,
# builds gpuq twice (plain, and with AddressSanitizer + UBSan), fuzzes the
# protocol decoders for a bounded time, and runs every test in both builds.
# GPU tests report themselves skipped where there is no GPU.
#   scripts/test.sh            FUZZ_SECONDS=60 by default
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
jobs=$(nproc)
fuzz_seconds=${FUZZ_SECONDS:-60}

cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j "$jobs"
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DGPUQ_SANITIZE=ON \
  -DGPUQ_BUILD_BENCH=OFF >/dev/null
cmake --build build-asan -j "$jobs"

echo "== fuzzing the protocol decoders for ${fuzz_seconds}s"
.ci/fuzz.sh "$fuzz_seconds"

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
echo "== tests, AddressSanitizer + UndefinedBehaviorSanitizer build"
ctest --test-dir build-asan -j "$jobs" --output-on-failure --timeout 600
echo "== tests, release build"
ctest --test-dir build -j "$jobs" --output-on-failure --timeout 600
