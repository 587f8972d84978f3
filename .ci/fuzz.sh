#!/usr/bin/env bash
# Builds the protocol decoders with clang and libFuzzer and fuzzes them for a
# bounded time, seeded with the golden messages. Fails on any crash, leak,
# sanitizer report or round-trip mismatch.
#   .ci/fuzz.sh [SECONDS]   (default 120)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-120}
build=build-fuzz
CC=clang CXX=clang++ cmake -S . -B "$build" -G Ninja -DGPUQ_FUZZ=ON \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS="-fsanitize=fuzzer-no-link,address,undefined" >/dev/null
cmake --build "$build" --target gpuq-decode-fuzzer
corpus=$(mktemp -d)
trap 'rm -rf "$corpus"' EXIT
# Seeds: each golden header, prefixed with the selector byte of its decoder.
python3 - "$corpus" <<'PY'
import os, struct, sys, glob
out = sys.argv[1]
for path in glob.glob("schema/golden/*.bin"):
    data = open(path, "rb").read()
    frames, off = [], 0
    while off < len(data):
        (n,) = struct.unpack_from("<I", data, off); off += 4
        frames.append(data[off:off + n]); off += n
    name = os.path.basename(path)
    # Bit 5: the region channel's decoder, bit 6 the session channel's (any
    # selector may carry them).
    sel = {"client": 0, "reply": 1, "worker": 2, "broker": 3, "region": 0x20,
           "session": 0x40}[name.split("_")[0]]
    sel |= min(len(frames) - 2, 7) << 2
    open(os.path.join(out, name), "wb").write(bytes([sel]) + frames[1])
# Module images (bit 7): a CUBIN with initialized and uninitialized variables.
for path in glob.glob("tests/fuzz/*.cubin"):
    data = open(path, "rb").read()
    open(os.path.join(out, os.path.basename(path)), "wb").write(bytes([0x80]) + data)
PY
"$build/bin/gpuq-decode-fuzzer" "$corpus" -max_total_time="$seconds" -max_len=65536 \
  -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 2>&1 | tail -n 20
