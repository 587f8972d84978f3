#!/usr/bin/env bash
# Under `set -o pipefail`, `cmd | grep -q X` fails at random: grep exits at its
# first match, the writer then dies of SIGPIPE, and the pipeline's status is
# the writer's. Scripts that set pipefail feed grep -q a here-string instead.
set -euo pipefail
src=$1
status=0
while IFS= read -r -d '' f; do
  grep -q 'pipefail' "$f" || continue
  if hits=$(grep -nE '^[^#]*\|[[:space:]]*grep[[:space:]]+(-[a-zA-Z]*q|--quiet)' "$f"); then
    printf 'FAIL: %s pipes into grep -q under pipefail:\n%s\n' "${f#"$src"/}" "$hits" >&2
    status=1
  fi
done < <(find "$src" -path "$src/build*" -prune -o -path "$src/.git" -prune -o \
           \( -name '*.sh' -o -path "$src/.ci/run" \) -type f -print0)
[ $status -eq 0 ] && echo "no script pipes into grep -q under pipefail"
exit $status
