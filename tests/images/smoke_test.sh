#!/usr/bin/env bash
# Smoke test of the gpuq container images. Builds them with docker/build-images.sh (or takes
# images already built), then runs them with their own entrypoints, without a GPU, each
# container in a private network namespace: the broker has none but its own loopback
# (--network none), and the client containers join it (--network container:BROKER). Nothing
# is published on the host's interfaces. Runs as root; installs podman, runc and
# docker-compose (no engine) with apt-get where missing.
#
#   tests/images/smoke_test.sh [--workdir DIR] [--tag TAG] [--images BROKER_IMAGE WORKER_IMAGE]
#
# --workdir and --tag are passed to docker/build-images.sh (defaults: $GPUQ_IMAGE_WORKDIR or
# /tmp/gpuq-images, and dev). With --images, nothing is built: the images must be in the
# work directory's storage.
#
# Checks, each reported as PASS or FAIL (the exit status is 1 when any failed):
#   docker/compose.yaml is valid (docker-compose config);
#   both images run as uid and gid 7450;
#   CURVE keys made with `gpuq keygen` in the broker image;
#   the broker starts with its entrypoint and default command (CURVE, keys in /etc/gpuq),
#   with no network but its loopback and no port published;
#   `gpuq submit --wait` over tcp://127.0.0.1:7450 with CURVE is accepted and waits (no GPU:
#   the job cannot run), submitting again with its idempotency key names the same job,
#   `gpuq status` shows it queued, `gpuq stats` counts one queued job;
#   a client whose key is not listed gets no answer;
#   `gpuq compile` inside the broker's container compiles a kernel for sm_90 in the sandbox,
#   and refuses a kernel that includes /etc/passwd (sandbox_violation);
#   GET /metrics on 127.0.0.1:9450 from the broker's network namespace;
#   the broker stops with exit status 0 on SIGTERM, and the queued job is still queued after
#   it starts again on its volume;
#   the worker image, without a GPU, exits 10 saying there is no CUDA driver.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
work=${GPUQ_IMAGE_WORKDIR:-/tmp/gpuq-images}
tag=${GPUQ_IMAGE_TAG:-dev}
broker_image=
worker_image=
while (($#)); do
  case $1 in
    --workdir) work=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --images) broker_image=$2; worker_image=$3; shift 3 ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) echo "smoke_test.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

say() { printf '[smoke] %s\n' "$*"; }
die() { printf '[smoke] error: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root"

# shellcheck source=scripts/need-packages.sh
source "$repo/scripts/need-packages.sh"
need_packages podman runc docker-compose

mkdir -p "$work"
work=$(cd "$work" && pwd)
# The work directory's lock is held for the whole test (build-images.sh is told so).
exec 9>"$work/lock"
flock -w 3600 9 || die "another build or smoke test holds $work/lock"
export GPUQ_IMAGE_LOCK_HELD=1

start=$SECONDS
if [ -z "$broker_image" ]; then
  "$repo/docker/build-images.sh" --workdir "$work" --tag "$tag"
  broker_image=localhost/gpuq-broker:$tag
  worker_image=localhost/gpuq-worker:$tag
else
  "$repo/docker/build-images.sh" --workdir "$work" --configure-only
fi
# shellcheck source=/dev/null
. "$work/env.sh"
say "images built or found in $((SECONDS - start)) s; testing $broker_image and $worker_image"

# What a killed run left behind (no other run is under way: this one holds the lock).
podman ps --all --quiet --filter name=gpuq-smoke- | xargs -r podman rm --force --volumes >/dev/null
rm -rf --one-file-system "$work"/tmp/smoke.*

passed=0
failed=0
pass() {
  passed=$((passed + 1))
  printf 'PASS  %s\n' "$1"
}
fail() {
  failed=$((failed + 1))
  printf 'FAIL  %s\n' "$1"
  if [ -n "${2:-}" ]; then printf '%s\n' "$2" | tail -n 20 | sed 's/^/      | /'; fi
}

broker=gpuq-smoke-broker-$$
tmp=$(mktemp -d "$work/tmp/smoke.XXXXXX")
cleanup() {
  podman rm --force --volumes --time 2 "$broker" >/dev/null 2>&1 || true
  rm -rf --one-file-system "${tmp:?}"
}
trap cleanup EXIT

# Runs a command, with its output in $out and its exit status in $rc.
run() {
  rc=0
  out=$(timeout 120 "$@" 2>&1) || rc=$?
}
# A client in the broker's network namespace, with the client's CURVE keys.
client() {
  local key=$1
  shift
  run podman run --rm --network "container:$broker" -v "$tmp/keys:/etc/gpuq:ro" \
    -v "$tmp/kernels:/kernels:ro" -e GPUQ_BROKER=tcp://127.0.0.1:7450 \
    -e GPUQ_SERVER_KEY=/etc/gpuq/broker.pub -e GPUQ_KEY="/etc/gpuq/$key.key" \
    --entrypoint gpuq "$broker_image" "$@"
}
# Waits until the broker's log says it serves for the COUNT-th time.
wait_serving() {
  local count=$1
  for _ in $(seq 1 150); do
    if [ "$(podman logs "$broker" 2>&1 | grep -c 'broker serving clients')" -ge "$count" ]; then
      return 0
    fi
    [ "$(podman inspect --format '{{.State.Running}}' "$broker" 2>/dev/null)" = true ] || return 1
    sleep 0.2
  done
  return 1
}

# --- docker/compose.yaml -----------------------------------------------------------

run docker-compose -f "$repo/docker/compose.yaml" config --quiet
if ((rc == 0)); then
  pass "docker/compose.yaml is valid (docker-compose config)"
else
  fail "docker/compose.yaml is valid (docker-compose config)" "$out"
fi

# --- the service user ------------------------------------------------------------------

for image in "$broker_image" "$worker_image"; do
  run podman run --rm --network none --entrypoint id "$image"
  if ((rc == 0)) && [[ $out == "uid=7450(gpuq) gid=7450(gpuq) groups=7450(gpuq)" ]]; then
    pass "$image runs as uid and gid 7450 (gpuq)"
  else
    fail "$image runs as uid and gid 7450 (gpuq)" "$out"
  fi
done

# --- sessions' processes ---------------------------------------------------------------

# gpuqd starts gpuq-session beside itself for sessions; without a driver it
# says so rather than failing to load.
run podman run --rm --network none --entrypoint /usr/local/bin/gpuq-session "$broker_image" \
  --control-fd 0 --socket /tmp/s.sock --device GPU-none
if ((rc == 11)) && [[ $out == *"no CUDA driver"* ]]; then
  pass "the broker image has gpuq-session beside gpuqd, and it starts (exit 11: no driver)"
else
  fail "the broker image has gpuq-session beside gpuqd, and it starts" "rc $rc: $out"
fi

# --- keys and kernels ------------------------------------------------------------------

mkdir -p "$tmp/keys" "$tmp/kernels"
chown 7450:7450 "$tmp/keys"
chmod 0700 "$tmp/keys"
keys_ok=1
for name in broker tenant worker stranger; do
  run podman run --rm --network none -v "$tmp/keys:/keys" --entrypoint gpuq "$broker_image" \
    keygen "/keys/$name"
  if ((rc != 0)); then
    keys_ok=0
    break
  fi
done
if ((keys_ok)); then
  echo "$(cat "$tmp/keys/tenant.pub") smoke" >"$tmp/keys/clients.keys"
  echo "$(cat "$tmp/keys/worker.pub") smoke-gpu-host" >"$tmp/keys/workers.keys"
  pass "CURVE keys made with gpuq keygen in the broker image, readable by uid 7450"
else
  fail "CURVE keys made with gpuq keygen in the broker image, readable by uid 7450" "$out"
fi

cat >"$tmp/kernels/fill.cu" <<'CU'
extern "C" __global__ void fill(unsigned* out, unsigned n) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = i;
}
CU
cat >"$tmp/kernels/escape.cu" <<'CU'
#include "/etc/passwd"
extern "C" __global__ void escape() {}
CU
chmod 0755 "$tmp/kernels"
chmod 0644 "$tmp/kernels"/*.cu

# --- the broker ------------------------------------------------------------------------

run podman run --detach --name "$broker" --network none -v "$tmp/keys:/etc/gpuq:ro" \
  -v "$tmp/kernels:/kernels:ro" "$broker_image"
if ((rc == 0)) && wait_serving 1; then
  pass "broker started with its entrypoint and CURVE keys from /etc/gpuq"
else
  fail "broker started with its entrypoint and CURVE keys from /etc/gpuq" \
    "$out$(podman logs "$broker" 2>&1 || true)"
  say "$passed passed, $failed failed before the broker could start: stopping here"
  printf 'images: %d passed, %d failed\n' "$passed" "$failed"
  exit 1
fi

network=$(podman inspect --format '{{.HostConfig.NetworkMode}} {{len .HostConfig.PortBindings}}' "$broker")
if [ "$network" = "none 0" ]; then
  pass "broker has no network but its own loopback, and no port published"
else
  fail "broker has no network but its own loopback, and no port published" "$network"
fi

# --- jobs over tcp with CURVE -----------------------------------------------------------

submit=(submit /kernels/fill.cu --kernel fill --grid 1 --block 32 --out 128 --arg u32:32
  --key smoke-job-1)
client tenant "${submit[@]}" --wait --timeout-ms 3000
if ((rc == 3)) && [[ $out == *timeout* ]]; then
  pass "gpuq submit --wait over tcp://127.0.0.1:7450 with CURVE: accepted, waits (no GPU)"
else
  fail "gpuq submit --wait over tcp://127.0.0.1:7450 with CURVE: accepted, waits (no GPU)" \
    "exit status $rc (3, a timeout, expected): $out"
fi

client tenant "${submit[@]}" --json
job=$(printf '%s\n' "$out" | sed -n 's/^ *"id": *\([0-9][0-9]*\).*/\1/p')
if ((rc == 0)) && [ -n "$job" ]; then
  pass "gpuq submit again with the same idempotency key: job $job"
else
  fail "gpuq submit again with the same idempotency key" "exit status $rc: $out"
fi

client tenant status "${job:-1}" --json
if ((rc == 0)) && [[ $out == *'"state": "queued"'* ]]; then
  pass "gpuq status: job ${job:-?} is queued"
else
  fail "gpuq status: job ${job:-?} is queued" "exit status $rc: $out"
fi

client tenant stats --json
if ((rc == 0)) && [[ $out == *'"queued": 1,'* ]]; then
  pass "gpuq stats: one job queued (the --wait submit and its resubmit are one job)"
else
  fail "gpuq stats: one job queued (the --wait submit and its resubmit are one job)" \
    "exit status $rc: $out"
fi

client stranger stats --timeout-ms 1500
if ((rc != 0)); then
  pass "a client whose key is not in clients.keys gets no answer"
else
  fail "a client whose key is not in clients.keys gets no answer" "$out"
fi

# --- the compile sandbox in the broker's container ---------------------------------------

run podman exec "$broker" gpuq compile /kernels/fill.cu --arch sm_90 --kernel fill
if ((rc == 0)) && [[ $out == *sm_90*cubin* ]]; then
  pass "gpuq compile in the broker's container: fill for sm_90"
else
  fail "gpuq compile in the broker's container: fill for sm_90" "exit status $rc: $out"
fi

run podman exec "$broker" gpuq compile /kernels/escape.cu --arch sm_90 --kernel escape
if ((rc == 1)) && [[ $out == *sandbox_violation* ]]; then
  pass "gpuq compile refuses a kernel that includes /etc/passwd (sandbox_violation)"
else
  fail "gpuq compile refuses a kernel that includes /etc/passwd (sandbox_violation)" \
    "exit status $rc: $out"
fi

# --- metrics ---------------------------------------------------------------------------

run podman run --rm --network "container:$broker" --entrypoint bash "$broker_image" -c \
  'exec 3<>/dev/tcp/127.0.0.1/9450 &&
   printf "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" >&3 && cat <&3'
if ((rc == 0)) && [[ $out == "HTTP/1.1 200"* ]] &&
  [[ $out == *'gpuq_jobs_queued{priority="5"} 1'* ]]; then
  pass "GET http://127.0.0.1:9450/metrics from the broker's network namespace"
else
  fail "GET http://127.0.0.1:9450/metrics from the broker's network namespace" \
    "exit status $rc: $(printf '%s\n' "$out" | head -n 20)"
fi

# --- stop and start again ------------------------------------------------------------------

run podman stop --time 10 "$broker"
status=$(podman inspect --format '{{.State.ExitCode}}' "$broker" 2>&1)
if ((rc == 0)) && [ "$status" = 0 ]; then
  pass "broker stops on SIGTERM with exit status 0"
else
  fail "broker stops on SIGTERM with exit status 0" "exit status $status: $out"
fi

run podman start "$broker"
if ((rc == 0)) && wait_serving 2; then
  client tenant status "${job:-1}" --json
  if ((rc == 0)) && [[ $out == *'"state": "queued"'* ]]; then
    pass "after a restart on the same volume, job ${job:-?} is still queued"
  else
    fail "after a restart on the same volume, job ${job:-?} is still queued" "exit status $rc: $out"
  fi
else
  fail "after a restart on the same volume, job ${job:-?} is still queued" \
    "$out$(podman logs "$broker" 2>&1 | tail -n 20 || true)"
fi

# --- the worker without a GPU --------------------------------------------------------------

run podman run --rm --network none -v "$tmp/keys:/etc/gpuq:ro" "$worker_image"
if ((rc == 10)) && [[ $out == *"no CUDA driver"* ]]; then
  pass "the worker without a GPU exits 10: no CUDA driver"
else
  fail "the worker without a GPU exits 10: no CUDA driver" "exit status $rc: $out"
fi

if ((failed)); then
  say "broker log:"
  podman logs "$broker" 2>&1 | tail -n 40 | sed 's/^/      | /'
fi
say "done in $((SECONDS - start)) s"
printf 'images: %d passed, %d failed\n' "$passed" "$failed"
((failed == 0))
