#!/usr/bin/env bash
# gpuq as a package, as a program outside the source tree sees it:
#   1. `cmake --install` of this build into a fresh prefix;
#   2. a consumer project (C++ and C) configured against that prefix with
#      find_package(gpuq), built, and run against a live gpuqd (with the
#      worker test double); the C program through libgpuq.so and statically;
#   3. the same programs built with pkg-config (gpuq-client.pc, gpuq.pc);
#   4. libgpuq.so exports gpuq_* only, under its SONAME;
#   5. the Python client: `pip install` of clients/python and of a built
#      wheel into fresh venvs; the client's tests run against the installed
#      package;
#   6. a client-only build where the CUDA toolkit (and SQLite, spdlog, CLI11,
#      nlohmann-json) cannot be found, installed, and the consumer built
#      against it.
#   package_test.sh SOURCE_DIR BUILD_DIR
set -euo pipefail
src=$(cd "$1" && pwd)
build=$(cd "$2" && pwd)
tmp=$(mktemp -d /tmp/gpuq-package-XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
step() { echo "== $*"; }
fail() { echo "FAILED: $*" >&2; exit 1; }

step "install into $tmp/prefix"
cmake --install "$build" --prefix "$tmp/prefix" >/dev/null
prefix=$tmp/prefix
libdir=$(ls -d "$prefix"/lib*/cmake/gpuq | head -1 | xargs dirname | xargs dirname)
for f in include/gpuq/client.h include/gpuq/gpuq.h include/gpuq/status.h include/gpuq/types.h \
         include/gpuq/version.h bin/gpuqd bin/gpuq-worker bin/gpuq-nvrtc bin/gpuq \
         lib/systemd/system/gpuqd.service; do
  [ -e "$prefix/$f" ] || fail "$f was not installed"
done
grep -q "$prefix/bin/gpuqd" "$prefix/lib/systemd/system/gpuqd.service" ||
  fail "the installed unit does not name the installed gpuqd"
# The public headers include nothing but each other and the standard library.
if grep -hn '#include "' "$prefix"/include/gpuq/*.h | grep -v '#include "gpuq/'; then
  fail "a public header includes an internal one"
fi

step "a live gpuqd with a worker test double"
run=$tmp/run
mkdir -p "$run"
"$build/bin/gpuqd" --listen "ipc://$run/c.sock" --worker-listen "ipc://$run/w.sock" \
  --store "$run/jobs.db" --cache "$run/kernels.db" --workers 0 --heartbeat-ms 100 \
  --ready-file "$run/ready.json" >"$run/gpuqd.log" 2>&1 &
pids+=($!)
for _ in $(seq 200); do [ -e "$run/ready.json" ] && break; sleep 0.05; done
[ -e "$run/ready.json" ] || { cat "$run/gpuqd.log"; fail "gpuqd did not start"; }
"$build/bin/gpuq-fake-worker" --broker "ipc://$run/w.sock" --heartbeat-ms 100 \
  >"$run/worker.log" 2>&1 &
pids+=($!)
endpoint=ipc://$run/c.sock

consumer() {  # PREFIX BUILD_DIR: configure, build and run the consumer project
  cmake -S "$src/tests/package/consumer" -B "$2" -DCMAKE_PREFIX_PATH="$1" \
    -DCMAKE_BUILD_TYPE=Release >"$2.log" 2>&1 || { cat "$2.log"; fail "configure against $1"; }
  cmake --build "$2" -j 2 >>"$2.log" 2>&1 || { cat "$2.log"; fail "build against $1"; }
  "$2/cxx_consumer" "$endpoint"
  "$2/c_consumer" "$endpoint"
  "$2/c_consumer_static" "$endpoint"
  grep -q 'NEEDED.*\[libgpuq\.so\.0\]' <<<"$(readelf -d "$2/c_consumer")" ||
    fail "c_consumer does not load libgpuq.so.0"
  if grep -q 'libgpuq\.so' <<<"$(readelf -d "$2/c_consumer_static")"; then
    fail "c_consumer_static loads libgpuq.so"
  fi
}

step "find_package(gpuq): C++, C shared, C static"
consumer "$prefix" "$tmp/consumer"

step "pkg-config"
export PKG_CONFIG_PATH=$libdir/pkgconfig
[ "$(pkg-config --modversion gpuq)" = "$(cat "$src/VERSION")" ] || fail "gpuq.pc version"
# shellcheck disable=SC2046
c++ -std=c++20 -o "$tmp/pc_cxx" "$src/tests/package/consumer/consumer.cc" \
  $(pkg-config --cflags --libs gpuq-client)
# shellcheck disable=SC2046
cc -std=c11 -o "$tmp/pc_c" "$src/tests/package/consumer/consumer.c" "$src/tests/c_api_scenario.c" \
  $(pkg-config --cflags --libs gpuq) -Wl,-rpath,"$libdir"
"$tmp/pc_cxx" "$endpoint"
"$tmp/pc_c" "$endpoint"

step "libgpuq.so exports gpuq_* only"
so=$(readlink -f "$libdir/libgpuq.so")
grep -q 'SONAME.*\[libgpuq\.so\.0\]' <<<"$(readelf -d "$so")" || fail "SONAME is not libgpuq.so.0"
# Defined dynamic symbols, less the version node (GPUQ_0, an absolute symbol).
others=$(nm -D --defined-only "$so" | awk '$2 != "A" {print $3}' | grep -v '^gpuq_' || true)
[ -z "$others" ] || fail "libgpuq.so exports more than gpuq_*: $(echo "$others" | head -5)"
exported=$(nm -D --defined-only "$so" | awk '$2 == "T" {print $3}' | sed 's/@.*//' | sort)
declared=$(grep -o 'gpuq_[a-z_]*(' "$prefix/include/gpuq/gpuq.h" | tr -d '(' | sort -u)
[ "$exported" = "$declared" ] ||
  fail "exported and declared functions differ: $(diff <(echo "$exported") <(echo "$declared") || true)"
echo "$(echo "$exported" | wc -l) functions, all declared in gpuq/gpuq.h"

step "Python: pip install of the folder and of a wheel, into fresh venvs"
py=/usr/bin/python3
cp -rL "$src/clients/python" "$tmp/python-src"
rm -rf "$tmp/python-src/build" "$tmp/python-src"/*.egg-info
pipq=(--no-deps --no-build-isolation --no-index -q)
$py -m venv --system-site-packages "$tmp/venv-dir"
"$tmp/venv-dir/bin/pip" install "${pipq[@]}" "$tmp/python-src"
(cd "$tmp" && "$tmp/venv-dir/bin/python" -c \
  'import gpuq, sys; print("installed", gpuq.__version__, "at", gpuq.__file__)')
$py -m pip wheel "${pipq[@]}" -w "$tmp/dist" "$tmp/python-src"
wheel=$(ls "$tmp"/dist/gpuq-*.whl)
grep -q 'gpuq/py.typed' <<<"$($py -m zipfile -l "$wheel")" || fail "the wheel has no py.typed"
$py -m venv --system-site-packages "$tmp/venv-wheel"
"$tmp/venv-wheel/bin/pip" install "${pipq[@]}" "$wheel"
cp -r "$src/clients/python/tests" "$tmp/python-tests"
(cd "$tmp/python-tests" && GPUQ_TEST_INSTALLED=1 GPUQ_BIN="$build/bin" \
  GPUQ_VERSION_FILE="$src/VERSION" GPUQ_GOLDEN_DIR="$src/schema/golden" \
  "$tmp/venv-wheel/bin/python" -m pytest -q -p no:cacheprovider .)

step "client-only build, with no CUDA toolkit to be found"
no_cuda_path=$(echo "$PATH" | tr ':' '\n' | grep -v cuda | paste -sd:)
disabled=()
for p in CUDAToolkit SQLite3 spdlog CLI11 nlohmann_json GTest benchmark; do
  disabled+=("-DCMAKE_DISABLE_FIND_PACKAGE_$p=ON")
done
PATH=$no_cuda_path CUDAToolkit_ROOT=/nonexistent CUDA_PATH=/nonexistent \
  cmake -S "$src" -B "$tmp/client-only" -G Ninja -DGPUQ_CLIENT_ONLY=ON \
  -DCMAKE_BUILD_TYPE=Release "${disabled[@]}" >"$tmp/client-only.log" 2>&1 ||
  { cat "$tmp/client-only.log"; fail "client-only configure"; }
if grep -E '^(CUDAToolkit_|CUDA_|GPUQ_NVRTC)' "$tmp/client-only/CMakeCache.txt"; then
  fail "the client-only configure looked for CUDA"
fi
cmake --build "$tmp/client-only" -j 2 >>"$tmp/client-only.log" 2>&1 ||
  { cat "$tmp/client-only.log"; fail "client-only build"; }
cmake --install "$tmp/client-only" --prefix "$tmp/client-prefix" >/dev/null
[ ! -e "$tmp/client-prefix/bin/gpuqd" ] || fail "a client-only build installed gpuqd"
consumer "$tmp/client-prefix" "$tmp/consumer-client-only"

echo "package test passed"
