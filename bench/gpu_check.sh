#!/usr/bin/env bash
# One-shot GPU check (no network needed): build, GPU tests, memcheck, benchmarks. Budget: under 8 minutes.
#   bash bench/gpu_check.sh OUT_DIR
# Writes logs and JSON under OUT_DIR and prints a short table last.
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
: > "$OUT/steps.txt"

step() {  # step NAME TIMEOUT_S CMD...: run with a time limit, log to OUT/NAME.log, record rc and seconds
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/steps.txt"
  tail -n 4 "$OUT/$name.log"
}

{ nvidia-smi; $PY -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } \
  > "$OUT/environment.txt" 2>&1
# Extensions built in place first: an old pip's legacy "develop" path would skip them.
step install 150 bash -c "$PY setup.py -q build_ext --inplace && $PY -m pip install -q --no-build-isolation --no-deps -e . && $PY -c 'import fastpref; print(fastpref.available_backends(\"cuda\"))'"
step tests 130 $PY -m pytest -q -x tests/test_token_stats.py tests/test_token_kl.py tests/test_inputs.py -p no:cacheprovider
step memcheck 45 compute-sanitizer --tool memcheck --error-exitcode 1 $PY bench/sanitize_smoke.py
# The benchmark runner's GPU mode: every implementation, D=4096, V=128256,
# N=4096/16384, bf16. It starts no new measurement after 100 s, so it ends inside its 140 s limit.
# Results land in bench/results/cuda/ (commit them, then `python -m bench.readme`) and are copied to OUT.
step bench 140 $PY -m bench --device cuda --quick --budget-s 100 --timeout-s 90
cp bench/results/cuda/bench.json bench/results/cuda/bench.md "$OUT/" 2>/dev/null

echo
echo "== summary"
cat "$OUT/environment.txt" | tail -n 1
cat "$OUT/steps.txt"
[ -f "$OUT/bench.md" ] && head -n 80 "$OUT/bench.md"
