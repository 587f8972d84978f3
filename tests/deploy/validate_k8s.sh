#!/usr/bin/env bash
# Validates the Kubernetes manifests of deploy/k8s without a cluster:
#  1. renders each kustomization (deploy/k8s/base, deploy/k8s/overlays/*) with
#     `kubectl kustomize` of Debian's kubernetes-client (kubectl 1.20, whose
#     kustomize is v2.0.3), and, where another kubectl is on PATH, with that
#     one too;
#  2. checks every rendered object with validate_k8s.py: against the models of
#     the Kubernetes API in Debian's python3-kubernetes, against a schema
#     written there for the ServiceMonitor (a kind those models lack), for the
#     references between objects and for this project's rules;
#  3. self-test: validate_k8s.py must reject tests/deploy/broken.yaml with the
#     errors it names, and each breakage (validate_k8s.py's SELF_TEST) of the
#     rendered GPU overlay with its own error.
# Installs what is missing with apt-get (as root): python3-kubernetes, and
# kubernetes-client. Where /usr/bin/kubectl belongs to another package,
# Debian's kubernetes-client is fetched with `apt-get download` and unpacked
# under ${XDG_CACHE_HOME:-$HOME/.cache}/gpuq rather than installed over it.
# $KUBECTL, if set, names the kubectl 1.20 to use instead.
#
# Usage: tests/deploy/validate_k8s.sh     (exit status 0: every check passed)
set -euo pipefail

start_ms=$(($(date +%s%N) / 1000000))
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
py=/usr/bin/python3
validate=("$py" "$here/validate_k8s.py")
dashboard=$root/deploy/k8s/base/gpuq-dashboard.json
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

say() { printf 'validate_k8s: %s\n' "$*"; }
die() { say "$*" >&2; exit 1; }

as_root() {
  [ "$(id -u)" = 0 ] || die "needs $* (run as root, or install it)"
}

candidate() {  # the version of kubernetes-client that apt would install, or nothing
  apt-cache policy kubernetes-client 2>/dev/null | sed -n 's/^ *Candidate: \([0-9]\)/\1/p'
}

apt_lists() {  # fetches the package lists if they do not know kubernetes-client
  [ -n "$(candidate)" ] || apt-get update -qq
}

apt_install() {  # apt_install PACKAGE: installs it; fetches the lists again once if that fails
  as_root "$1"
  apt_lists
  say "installing $1" >&2
  local i
  for i in 1 2; do
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$1" \
        >"$work/apt.log" 2>&1; then
      return 0
    fi
    [ "$i" = 1 ] && apt-get update -qq
  done
  cat "$work/apt.log" >&2
  die "cannot install $1"
}

# python3-kubernetes (and python3-yaml, which it depends on).
if ! "$py" -c 'import kubernetes, yaml' 2>/dev/null; then
  apt_install python3-kubernetes
fi

# kubectl 1.20 from Debian's kubernetes-client.
kubectl_120() {
  if [ -n "${KUBECTL:-}" ]; then
    echo "$KUBECTL"
  elif grep -q 'ok installed' <<<"$(dpkg-query -W -f='${Status}' kubernetes-client 2>/dev/null)"; then
    echo /usr/bin/kubectl
  elif [ ! -e /usr/bin/kubectl ]; then
    apt_install kubernetes-client
    echo /usr/bin/kubectl
  else
    # /usr/bin/kubectl is another package's: unpack Debian's beside it.
    local version cache deb
    version=$(candidate)
    if [ -z "$version" ]; then
      apt-get update -qq
      version=$(candidate)
    fi
    [ -n "$version" ] || die "apt knows no kubernetes-client"
    cache=${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/gpuq/kubernetes-client_$version
    if [ ! -x "$cache/usr/bin/kubectl" ]; then
      say "unpacking kubernetes-client $version into $cache" >&2
      # apt-get download fetches as the user _apt where it can write.
      mkdir -p "$work/deb"
      chmod 755 "$work"
      chown _apt "$work/deb" 2>/dev/null || true
      (cd "$work/deb" && apt-get download -qq "kubernetes-client=$version") >/dev/null
      deb=$(ls "$work"/deb/kubernetes-client_*.deb)
      rm -rf "$cache.tmp"
      mkdir -p "$cache.tmp"
      dpkg-deb -x "$deb" "$cache.tmp"
      rm -rf "$cache"
      mv "$cache.tmp" "$cache"
    fi
    echo "$cache/usr/bin/kubectl"
  fi
}
kubectl=$(kubectl_120)
kversion=$("$kubectl" version --client --short 2>/dev/null || "$kubectl" version --client)
case "$kversion" in
  *v1.20.*) ;;
  *) die "$kubectl is not kubectl 1.20: $kversion" ;;
esac
kubectls=("$kubectl")
other=$(command -v kubectl || true)
if [ -n "$other" ] && [ "$(readlink -f "$other")" != "$(readlink -f "$kubectl")" ]; then
  kubectls+=("$other")
fi

passed=0
failed=0
tally() {  # tally LOGFILE: adds its RESULT line to the counts, prints the rest
  local line
  line=$(grep '^RESULT ' "$1" | tail -n 1)
  grep -v '^RESULT ' "$1" | sed 's/^/  /'
  if [ -z "$line" ]; then
    failed=$((failed + 1))
    say "validate_k8s.py ended without a result"
    return
  fi
  line=${line#RESULT passed=}
  passed=$((passed + ${line%% *}))
  failed=$((failed + ${line##*failed=}))
}

kinds_base=ConfigMap,Service,ServiceMonitor,StatefulSet
for k in "${kubectls[@]}"; do
  say "rendering with $k ($("$k" version --client --short 2>/dev/null || "$k" version --client 2>&1 | head -n 1))"
  for dir in "$root"/deploy/k8s/base "$root"/deploy/k8s/overlays/*; do
    [ -f "$dir/kustomization.yaml" ] || continue
    name=${dir#"$root"/}
    out=$work/$(echo "$name" | tr / _)$([ "$k" = "$kubectl" ] && echo "" || echo ".other").yaml
    kinds=$kinds_base
    [ "$name" = deploy/k8s/overlays/gpu ] && kinds=$kinds_base,DaemonSet
    if ! "$k" kustomize "$dir" >"$out" 2>"$work/stderr"; then
      failed=$((failed + 1))
      say "FAIL: kubectl kustomize $name:"
      sed 's/^/  /' "$work/stderr"
      continue
    fi
    grep -v "'bases' is deprecated" "$work/stderr" | sed 's/^/  kustomize: /' || true
    args=(--dashboard "$dashboard" --expect-kinds "$kinds")
    # The self-test breaks the GPU overlay as kubectl 1.20 renders it.
    [ "$name" = deploy/k8s/overlays/gpu ] && [ "$k" = "$kubectl" ] && args+=(--self-test)
    say "$name"
    "${validate[@]}" "${args[@]}" "$out" >"$work/log" 2>&1 || true
    tally "$work/log"
  done
done

say "self-test: tests/deploy/broken.yaml must be rejected"
"${validate[@]}" --expect-reject "$here/broken.yaml" >"$work/log" 2>&1 || true
tally "$work/log"

ms=$(($(date +%s%N) / 1000000 - start_ms))
say "took $((ms / 1000)).$((ms % 1000 / 100)) s"
echo "validate_k8s: $passed passed, $failed failed"
[ "$failed" = 0 ]
