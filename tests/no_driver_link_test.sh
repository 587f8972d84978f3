#!/usr/bin/env bash
# Every gpuq program must start where there is no CUDA driver: none may have
# libcuda in its dynamic dependencies (the worker dlopens it).
set -euo pipefail
bin_dir=$1
status=0
for f in "$bin_dir"/*; do
  [ -x "$f" ] && [ -f "$f" ] || continue
  if grep -q 'NEEDED.*libcuda\.so' <<<"$(readelf -d "$f" 2>/dev/null)"; then
    echo "FAIL: $(basename "$f") links libcuda" >&2
    status=1
  fi
done
[ $status -eq 0 ] && echo "no program links libcuda"
exit $status
