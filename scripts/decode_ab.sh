#!/usr/bin/env bash
# Decode steps side by side across commits: `scripts/decode_ab.sh REV [REV ...]` (HEAD's working tree is "now").
# Each REV is checked out in a temporary worktree; `rotary.lab.bench.decode.per_call` (the per-call part of
# `rotary bench decode`) runs for each, alternating, ROUNDS times (default 3), in this checkout's environment.
# Prints the medians (us) and the ratios the decode targets judge. Run it alone: other processes move the numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ROUNDS=${ROUNDS:-3}
tmp=$(mktemp -d)
trap 'for d in "$tmp"/*/; do git worktree remove --force "$d" >/dev/null 2>&1 || true; done; rm -rf "$tmp"' EXIT
trees=()
for rev in "$@"; do
  git worktree add --detach "$tmp/$rev" "$rev" >/dev/null 2>&1
  trees+=("$rev=$tmp/$rev/src")
done
trees+=("now=$PWD/src")
code='
import json, statistics, sys
from rotary.lab.bench.decode import BARE, GIVENS, INT, TENSOR, per_call
out = {}
for B, t in per_call(repeats=15).items():
    m = {k: statistics.median(v) / 200 * 1e6 for k, v in t.items()}
    out[B] = {"bare us": round(m[BARE], 2), "int/bare": round(m[INT] / m[BARE], 3),
              "tensor/int": round(m[TENSOR] / m[INT], 3), "givens/bare": round(m[GIVENS] / m[BARE], 3)}
print(sys.argv[1], json.dumps(out))
'
for _ in $(seq "$ROUNDS"); do
  for pair in "${trees[@]}"; do
    PYTHONPATH="${pair#*=}" "$PY" -c "$code" "${pair%%=*}"
  done
done
