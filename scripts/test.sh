#!/usr/bin/env bash
# The test command of README.md (and of .ci/run): installs what is missing,
# then, with warnings as errors:
#   - a Release build (-O3), every test;
#   - an AddressSanitizer + UndefinedBehaviorSanitizer build, every test;
#   - a ThreadSanitizer build, the unit and broker process tests;
#   - a clang build that checks the thread-safety annotations
#     (-Wthread-safety) of every target;
#   - the protocol decoders fuzzed for a bounded time;
#   - the Kubernetes manifests rendered and checked against the API's models;
#   - both container images built (buildah, no engine) and smoke-tested in
#     private network namespaces (podman).
# GPU tests report themselves skipped where there is no GPU.
#   scripts/test.sh            FUZZ_SECONDS=60 by default
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
jobs=$(nproc)
fuzz_seconds=${FUZZ_SECONDS:-60}

configure() {  # DIR, then cmake options
  local dir=$1
  shift
  cmake -S . -B "$dir" -G Ninja -DGPUQ_WERROR=ON "$@" >/dev/null
}

echo "== Release build"
configure build-release -DCMAKE_BUILD_TYPE=Release
cmake --build build-release -j "$jobs"
echo "== AddressSanitizer + UndefinedBehaviorSanitizer build"
configure build-asan -DCMAKE_BUILD_TYPE=Debug -DGPUQ_SANITIZE=ON -DGPUQ_BUILD_BENCH=OFF
cmake --build build-asan -j "$jobs"
echo "== ThreadSanitizer build"
configure build-tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DGPUQ_TSAN=ON -DGPUQ_BUILD_BENCH=OFF
cmake --build build-tsan -j "$jobs" --target gpuq-tests gpuq-broker-tests
echo "== clang thread-safety analysis"
CC=clang CXX=clang++ configure build-clang -DCMAKE_BUILD_TYPE=Debug -DGPUQ_THREAD_SAFETY=ON
cmake --build build-clang -j "$jobs"

echo "== fuzzing the protocol decoders for ${fuzz_seconds}s"
.ci/fuzz.sh "$fuzz_seconds"

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$PWD/tests/tsan.supp"
echo "== tests, AddressSanitizer + UndefinedBehaviorSanitizer build"
ctest --test-dir build-asan -j "$jobs" --output-on-failure --timeout 600
echo "== tests, ThreadSanitizer build (unit and broker)"
# Heartbeats of 300 ms where a test names none (tests/test_util.h): the
# sanitizer slows every process several times over, and on a small machine
# a worker held up past 3 x 100 ms was taken for a silent one.
GPUQ_TEST_HEARTBEAT_MS=300 \
  ctest --test-dir build-tsan -j "$jobs" --output-on-failure --timeout 900 -L "unit|broker"
echo "== tests, Release build"
ctest --test-dir build-release -j "$jobs" --output-on-failure --timeout 600
echo "== Kubernetes manifests"
tests/deploy/validate_k8s.sh
echo "== container images"
tests/images/smoke_test.sh
