#!/usr/bin/env bash
# Builds the gpuq images from docker/Dockerfile with buildah, without a Docker
# engine and without a registry. Runs as root.
#
#   docker/build-images.sh [--workdir DIR] [--tag TAG] [--context DIR] [--configure-only] [--verbose]
#
# Makes, when absent, the local base images:
#   localhost/gpuq-base/debian:bookworm     debootstrap --variant=minbase of Debian 12
#   localhost/gpuq-base/cuda:VERSION-devel  stand-ins for nvidia/cuda:...-devel-ubuntu24.04 and
#   localhost/gpuq-base/cuda:VERSION-base   ...-base-ubuntu24.04, with this machine's
#                                           /usr/local/cuda (VERSION is its nvcc's)
# then builds the targets `broker` and `worker` with the stand-ins as CUDA_DEVEL_IMAGE and
# CUDA_BASE_IMAGE, tagged localhost/gpuq-broker:TAG and localhost/gpuq-worker:TAG (and the
# build stage as localhost/gpuq-build:TAG, so that its cached layers are kept). The build
# context is this checkout, or DIR with --context. --configure-only writes the configuration
# and builds nothing; --verbose shows the build's output as well as writing it to WORKDIR/logs.
#
# Everything lives in the work directory (default $GPUQ_IMAGE_WORKDIR, else
# /tmp/gpuq-images): the image storage, and private configuration for buildah and podman that
# leaves /etc/containers alone. Keep the directory between runs: base images and cached layers
# are reused. `source WORKDIR/env.sh` points podman and buildah at it.
#
# Environment: GPUQ_IMAGE_WORKDIR, GPUQ_IMAGE_TAG (default dev), GPUQ_DEBIAN_MIRROR (default: the
# mirror of /etc/apt/sources.list.d/debian.sources), GPUQ_STORAGE_DRIVER (overlay or vfs; default:
# overlay where the work directory's file system can hold it), GPUQ_CUDA_DEVEL_IMAGE and
# GPUQ_CUDA_BASE_IMAGE (local images to build on instead of the stand-ins).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${GPUQ_IMAGE_WORKDIR:-/tmp/gpuq-images}
tag=${GPUQ_IMAGE_TAG:-dev}
context=$repo
configure_only=0
verbose=0
while (($#)); do
  case $1 in
    --workdir) work=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --context) context=$2; shift 2 ;;
    --configure-only) configure_only=1; shift ;;
    --verbose) verbose=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) echo "build-images.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

say() { printf '[build-images] %s\n' "$*"; }
die() { printf '[build-images] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (buildah here stores images under the work directory as root)"

# shellcheck source=scripts/need-packages.sh
source "$repo/scripts/need-packages.sh"

mkdir -p "$work"
work=$(cd "$work" && pwd)
mkdir -p "$work/tmp" "$work/logs" "$work/networks"

# One build or smoke test at a time per work directory. A caller that holds the
# lock already (tests/images/smoke_test.sh) says so with GPUQ_IMAGE_LOCK_HELD=1.
if [ "${GPUQ_IMAGE_LOCK_HELD:-0}" != 1 ]; then
  exec 9>"$work/lock"
  flock -w 3600 9 || die "another build holds $work/lock"
fi

need_packages buildah runc

# --- private configuration ----------------------------------------------------

# Native overlayfs, where the work directory's file system can be an upper
# layer (not on overlayfs itself, for one); vfs (full copies) otherwise.
overlay_works() {
  local d ok=1
  d=$(mktemp -d "$work/tmp/overlay-probe.XXXXXX")
  mkdir "$d/lower" "$d/upper" "$d/work" "$d/merged"
  touch "$d/lower/file"
  if mount -t overlay overlay -o "lowerdir=$d/lower,upperdir=$d/upper,workdir=$d/work" \
    "$d/merged" 2>/dev/null; then
    rm -f "$d/merged/file" && [ ! -e "$d/merged/file" ] && ok=0
    umount "$d/merged"
  fi
  rm -rf "$d"
  return $ok
}

# The storage driver is chosen once per work directory: containers/storage
# refuses a graph root made by another driver.
if [ -f "$work/storage.conf" ]; then
  driver=$(sed -n 's/^driver = "\(.*\)"/\1/p' "$work/storage.conf")
else
  driver=${GPUQ_STORAGE_DRIVER:-}
  if [ -z "$driver" ]; then
    if overlay_works; then driver=overlay; else driver=vfs; fi
  fi
fi
case $driver in
  overlay) driver_options=$'[storage.options.overlay]\nmountopt = "nodev"' ;;
  vfs) driver_options= ;;
  *) die "storage driver '$driver' is neither overlay nor vfs" ;;
esac

# A run of a previous boot, or one that was killed, may have left state in
# run/: with nothing of the work directory mounted, it is cleared (as a reboot would).
if ! awk -v w="$work/" 'index($5, w) == 1 {found = 1} END {exit !found}' /proc/self/mountinfo; then
  rm -rf "$work/run"
fi
mkdir -p "$work/run"

nofile=$(ulimit -Hn)
[ "$nofile" = unlimited ] && nofile=1048576
nproc=$(ulimit -Hu)
{ [ "$nproc" = unlimited ] || ((nproc > 4096)); } && nproc=4096

cat >"$work/storage.conf" <<EOF
# Written by docker/build-images.sh: image storage private to $work.
[storage]
driver = "$driver"
graphroot = "$work/storage"
runroot = "$work/run/storage"
$driver_options
EOF

cat >"$work/containers.conf" <<EOF
# Written by docker/build-images.sh: used instead of /etc/containers/containers.conf.
[containers]
# No network unless a container is given one (--network container:NAME).
netns = "none"
# Within this host's hard limits (podman's defaults exceed them).
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$work/run/events.log"
tmp_dir = "$work/run/libpod"
image_copy_tmp_dir = "$work/tmp"

[network]
network_config_dir = "$work/networks"
EOF

# Images are only ever taken from local storage (--pull=never): no registry is named.
cat >"$work/registries.conf" <<EOF
unqualified-search-registries = []
EOF
cat >"$work/policy.json" <<EOF
{"default": [{"type": "insecureAcceptAnything"}]}
EOF

cat >"$work/env.sh" <<EOF
# Points buildah and podman at the storage and configuration of $work.
export CONTAINERS_CONF="$work/containers.conf"
export CONTAINERS_STORAGE_CONF="$work/storage.conf"
export CONTAINERS_REGISTRIES_CONF="$work/registries.conf"
export BUILDAH_ISOLATION=chroot
export TMPDIR="$work/tmp"
EOF
# shellcheck source=/dev/null
. "$work/env.sh"
policy=(--signature-policy "$work/policy.json")

say "work directory $work (storage driver $driver)"
((configure_only)) && exit 0

# --- base images ----------------------------------------------------------------

have_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }

container=
mountpoint=
rootfs=
cleanup() {
  if [ -n "$rootfs" ] && [ "$rootfs" != / ]; then
    umount -R "$rootfs/proc" "$rootfs/sys" 2>/dev/null || true
    rm -rf --one-file-system "$rootfs"
  fi
  [ -z "$container" ] || buildah rm "$container" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# Mounts a working container and prints where; never an empty path or /.
mount_container() {
  local m
  m=$(buildah mount "$1")
  if [ -z "$m" ] || [ "$m" = / ] || [ ! -d "$m" ]; then die "buildah mount gave '$m'"; fi
  echo "$m"
}

debian_image=localhost/gpuq-base/debian:bookworm

debian_mirror() {
  if [ -n "${GPUQ_DEBIAN_MIRROR:-}" ]; then
    echo "$GPUQ_DEBIAN_MIRROR"
    return
  fi
  local sources=/etc/apt/sources.list.d/debian.sources uri=
  # The URIs of the stanza whose suites include plain "bookworm".
  [ -f "$sources" ] && uri=$(awk 'BEGIN {RS = ""} /(^|\n)Suites:([^\n]* )?bookworm( |\n|$)/ {
      if (match($0, /(^|\n)URIs: *[^ \n]+/)) { s = substr($0, RSTART, RLENGTH); sub(/^\n?URIs: */, "", s); print s; exit }
    }' "$sources")
  echo "${uri:-http://deb.debian.org/debian}"
}

make_debian_image() {
  local mirror start=$SECONDS
  mirror=$(debian_mirror)
  need_packages debootstrap
  say "making $debian_image: debootstrap --variant=minbase bookworm from $mirror"
  # Into a plain directory: image storage is mounted nodev, which debootstrap refuses.
  rootfs=$work/tmp/rootfs
  rm -rf --one-file-system "${rootfs:?}"
  if ! debootstrap --variant=minbase bookworm "$rootfs" "$mirror" \
    >"$work/logs/debootstrap.log" 2>&1; then
    tail -n 30 "$work/logs/debootstrap.log" >&2
    die "debootstrap failed (log: $work/logs/debootstrap.log)"
  fi
  # The host's apt sources (with updates and security) where it is Debian 12 too.
  if [ -z "${GPUQ_DEBIAN_MIRROR:-}" ] && [ -f /etc/apt/sources.list.d/debian.sources ] &&
    grep -q '^Suites:.*bookworm' /etc/apt/sources.list.d/debian.sources; then
    cp /etc/apt/sources.list.d/debian.sources "${rootfs:?}/etc/apt/sources.list.d/"
    rm -f "${rootfs:?}/etc/apt/sources.list"
  fi
  # As in Debian's and Ubuntu's own images: apt keeps no downloaded packages.
  printf '%s\n' \
    'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };' \
    'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };' \
    'Dir::Cache::pkgcache "";' 'Dir::Cache::srcpkgcache "";' \
    >"${rootfs:?}/etc/apt/apt.conf.d/docker-clean"
  # No package lists, downloaded packages, logs or device nodes in the image.
  rm -rf "${rootfs:?}"/var/lib/apt/lists/* "${rootfs:?}"/var/cache/apt/archives/*.deb \
    "${rootfs:?}"/var/cache/apt/*.bin "${rootfs:?}"/tmp/* "${rootfs:?}"/dev/*
  find "${rootfs:?}/var/log" -type f -delete
  container=$(buildah from "${policy[@]}" scratch)
  mountpoint=$(mount_container "$container")
  tar -C "$rootfs" --numeric-owner -cf - . | tar -C "$mountpoint" --numeric-owner -xpf -
  rm -rf --one-file-system "${rootfs:?}"
  rootfs=
  buildah umount "$container" >/dev/null
  mountpoint=
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd bash --label org.opencontainers.image.description="Debian 12 (debootstrap minbase)" \
    "$container"
  buildah commit --quiet "${policy[@]}" --rm "$container" "$debian_image" >/dev/null
  container=
  say "made $debian_image in $((SECONDS - start)) s"
}

# A stand-in for nvidia/cuda's images: the Debian base and the parts of this
# machine's CUDA toolkit each needs, laid out as there (/usr/local/cuda-X.Y,
# /usr/local/cuda linked to it, the libraries known to ld.so), with their environment.
make_cuda_image() {
  local name=$1 flavour=$2 start=$SECONDS
  shift 2
  local parts=("$@") dest conf_dir
  say "making $name from $cuda_root"
  container=$(buildah from "${policy[@]}" --pull=never "$debian_image")
  mountpoint=$(mount_container "$container")
  dest=$mountpoint$cuda_root
  mkdir -p "$dest"
  # The parts are patterns relative to the toolkit's root; symbolic links are copied as links.
  (
    cd "$cuda_root"
    shopt -s nullglob
    files=()
    # shellcheck disable=SC2206 # the patterns are meant to be expanded
    for p in "${parts[@]}"; do files+=($p); done
    cp -a --parents "${files[@]}" "$dest/"
  )
  [ "$cuda_root" = /usr/local/cuda ] || ln -sfn "$(basename "$cuda_root")" "$mountpoint/usr/local/cuda"
  conf_dir=$mountpoint/etc/ld.so.conf.d
  mkdir -p "$conf_dir"
  if [ -d "$dest/targets/x86_64-linux/lib" ]; then
    echo /usr/local/cuda/targets/x86_64-linux/lib >"$conf_dir/000_cuda.conf"
  else
    echo /usr/local/cuda/lib64 >"$conf_dir/000_cuda.conf"
  fi
  printf '/usr/local/nvidia/lib\n/usr/local/nvidia/lib64\n' >"$conf_dir/nvidia.conf"
  ldconfig -r "$mountpoint"
  buildah umount "$container" >/dev/null
  mountpoint=
  # shellcheck disable=SC2054 # commas within values
  local env=(--env PATH=/usr/local/nvidia/bin:/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    --env LD_LIBRARY_PATH=/usr/local/nvidia/lib:/usr/local/nvidia/lib64
    --env NVIDIA_VISIBLE_DEVICES=all --env NVIDIA_DRIVER_CAPABILITIES=compute,utility
    --env CUDA_VERSION="$cuda_version")
  [ "$flavour" = devel ] && env+=(--env LIBRARY_PATH=/usr/local/cuda/lib64/stubs)
  buildah config "${env[@]}" --cmd bash \
    --label org.opencontainers.image.description="stand-in for nvidia/cuda $flavour: Debian 12 and CUDA $cuda_version from the build host" \
    "$container"
  buildah commit --quiet "${policy[@]}" --rm "$container" "$name" >/dev/null
  container=
  say "made $name in $((SECONDS - start)) s"
}

devel_image=${GPUQ_CUDA_DEVEL_IMAGE:-}
base_image=${GPUQ_CUDA_BASE_IMAGE:-}
if [ -z "$devel_image" ] || [ -z "$base_image" ]; then
  have_image "$debian_image" || make_debian_image
  cuda_root=$(readlink -f /usr/local/cuda 2>/dev/null) || true
  if [ -z "$cuda_root" ] || [ ! -e "$cuda_root/include/nvrtc.h" ]; then
    die "the stand-in images need the CUDA toolkit (with NVRTC) in /usr/local/cuda"
  fi
  cuda_version=
  [ -x "$cuda_root/bin/nvcc" ] &&
    cuda_version=$("$cuda_root/bin/nvcc" --version | sed -n 's/.*release [0-9.]*, V\([0-9.]*\).*/\1/p')
  [ -n "$cuda_version" ] || cuda_version=$(basename "$cuda_root" | sed 's/^cuda-//')
  # Where the libraries and headers really are (lib64 and include may be links
  # into targets/, or the other way round); the links themselves are copied too.
  libdir=$(realpath --relative-to="$cuda_root" "$cuda_root/lib64")
  incdir=$(realpath --relative-to="$cuda_root" "$cuda_root/include")
  links=()
  for l in lib lib64 include targets/x86_64-linux/lib targets/x86_64-linux/include; do
    [ -L "$cuda_root/$l" ] && links+=("$l")
  done
  if [ -z "$devel_image" ]; then
    devel_image=localhost/gpuq-base/cuda:$cuda_version-devel
    # The compiler and NVVM (nvcc; CMake's FindCUDAToolkit runs it), the headers,
    # the runtime and NVRTC libraries, the driver stub to link against, CMake packages.
    have_image "$devel_image" || make_cuda_image "$devel_image" devel bin nvvm "$incdir" \
      "$libdir/libcudart.so*" "$libdir/libcudart_static.a" "$libdir/libcudadevrt.a" \
      "$libdir/libculibos.a" "$libdir/libnvrtc.so*" "$libdir/libnvrtc-builtins.so*" \
      "$libdir/stubs" "$libdir/cmake" "${links[@]}"
  fi
  if [ -z "$base_image" ]; then
    base_image=localhost/gpuq-base/cuda:$cuda_version-base
    # The runtime library only, as in nvidia/cuda's base images.
    have_image "$base_image" || make_cuda_image "$base_image" base \
      "$libdir/libcudart.so*" "${links[@]}"
  fi
fi
have_image "$devel_image" || die "no local image $devel_image"
have_image "$base_image" || die "no local image $base_image"

# --- the images -----------------------------------------------------------------

# The build context is copied once, so that all targets are built from the
# same files (and share the build stage's layers) even while the tree is being
# edited: the files git tracks or would track, or for a tree outside git all
# but .git and build*. Their times are set to one fixed time, so that a cached
# layer serves any copy of the same contents (a fresh clone too).
snapshot=$work/context
rm -rf --one-file-system "${snapshot:?}"
mkdir -p "$snapshot"
if git -C "$context" rev-parse --git-dir >/dev/null 2>&1; then
  (
    cd "$context"
    git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do
        if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
      done |
      tar --null -T - -cf -
  ) | tar -C "$snapshot" -xf -
else
  tar -C "$context" --exclude=./.git --exclude='./build*' -cf - . | tar -C "$snapshot" -xf -
fi
find "$snapshot" -exec touch -h -d @946684800 {} +

build_target() {
  local target=$1 image=$2 start=$SECONDS log=$work/logs/build-$1.log
  say "building target $target as $image"
  local args=(bud --isolation chroot --pull=never --layers --force-rm "${policy[@]}"
    --build-arg CUDA_DEVEL_IMAGE="$devel_image" --build-arg CUDA_BASE_IMAGE="$base_image"
    -f "$snapshot/docker/Dockerfile" --target "$target" -t "$image" "$snapshot")
  if ((verbose)); then
    buildah "${args[@]}" 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
  else
    status=0
    buildah "${args[@]}" >"$log" 2>&1 || status=$?
  fi
  if ((status != 0)); then
    ((verbose)) || tail -n 60 "$log" >&2
    die "building target $target failed (log: $log)"
  fi
  say "built $image in $((SECONDS - start)) s"
}

build_target build "localhost/gpuq-build:$tag"
build_target broker "localhost/gpuq-broker:$tag"
build_target worker "localhost/gpuq-worker:$tag"

# Images no tag names any more (those of earlier builds) are removed, a layer
# at a time; the cached layers of this build have tagged descendants and stay.
for _ in $(seq 1 50); do
  [ -n "$(buildah images --quiet --filter dangling=true 2>/dev/null)" ] || break
  buildah rmi --prune >/dev/null 2>&1 || break
done

buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' |
  grep -E '/gpuq-(broker|worker|base/)' | sed 's/^/[build-images]   /'
say "storage: $(du -sh "$work/storage" 2>/dev/null | cut -f1) in $work/storage"
say "images: localhost/gpuq-broker:$tag localhost/gpuq-worker:$tag (source $work/env.sh to use podman)"
