#!/usr/bin/env bash
# Installs what gpuq needs from Debian's packages, skipping what is there.
# The CUDA toolkit (nvcc, NVRTC, headers) is expected in /usr/local/cuda.
set -euo pipefail
packages=(build-essential cmake ninja-build pkg-config python3
  libzmq3-dev cppzmq-dev libmsgpack-cxx-dev libsqlite3-dev libspdlog-dev libfmt-dev
  libssl-dev libsodium-dev libcli11-dev nlohmann-json3-dev libgtest-dev libgmock-dev libbenchmark-dev
  libcpp-httplib-dev prometheus tmux python3-zmq python3-msgpack python3-numpy python3-pytest clang libclang-rt-14-dev sqlite3 "$@")
missing=()
for p in "${packages[@]}"; do
  grep -q "install ok installed" <<<"$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi
if [ ! -e /usr/local/cuda/include/nvrtc.h ] && ! command -v nvcc >/dev/null; then
  echo "the CUDA toolkit (with NVRTC) is needed in /usr/local/cuda" >&2
  exit 1
fi
