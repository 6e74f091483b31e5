#!/usr/bin/env bash
# The GPU check: one call that builds fastpref, tests it on the GPU, runs it under compute-sanitizer and
# benchmarks it, made so that it cannot pass silently. Needs a CUDA GPU, torch, triton, pytest, ninja and
# nvcc; no network (optional benchmark libraries come as wheels from bench/wheels/, see bench/fetch_wheels.sh).
#
#   bash bench/gpu_check.sh [--dry] [--bundle FILE] OUT_DIR
#
# Every step runs under its own time limit, logs to OUT_DIR/logs/STEP.log, is recorded in OUT_DIR/steps.tsv
# (name, status, seconds, limit, note), and the next step starts whatever happened to it. The last lines
# printed are the table of steps, the test counts and the benchmark table (bench/check_summary.py).
# Exit status 0 only when every step that ran passed.
#
# Budget on a GPU machine with a cold Triton cache: the limits below (seconds) sum to 540 = 9 minutes.
#   env 10 | wheels 10 | build 140 | import 15 | tests 130 | warmup 20 | large 40 | sanitizer 10 | memcheck 50
#   | racecheck 20 | bench 80 | latency 15
# When short of time the check drops, first, latency, then racecheck (each runs only when it and every later
# step that is not dropped still fit in the budget); the others always run, each cut at its own limit.
# large: bench/large_case.py, one bf16 problem with N·V = 2^31 (int32 offsets), sampled rows and columns against
#   float64. sanitizer: one probe of compute-sanitizer on a one-kernel program; where the sanitizer refuses the
#   device (some lent machines), the probe is recorded as "unsupported" (not a failure of the kernels) and
#   memcheck and racecheck are skipped with that note.
# --dry: every step's plumbing on a CPU (the Triton interpreter, tiny shapes, no CUDA build; the sanitizer is a
#   stand-in that refuses the device, so the "unsupported" path runs; limits times DRY_SLOWDOWN, default 8);
#   tests/test_gpu_check.py runs it, so that a broken script fails CI instead of a GPU window.
# --bundle FILE: after every step, OUT_DIR packed into FILE (.tar.gz), for transports that return few files.
#
# Outputs: steps.tsv, tests.xml (JUnit), logs/, env/ (nvidia-smi -q, pip freeze, versions), bench/ and
# latency/ (bench.json, bench.md; bench.partial.json while running or when cut). A finished GPU benchmark is
# also copied to bench/results/cuda/ (commit it, then python -m bench.readme).
set -uo pipefail

DRY=0
BUNDLE=
while [ $# -gt 0 ]; do
  case $1 in
    --dry) DRY=1; shift ;;
    --bundle) BUNDLE=$2; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    -*) echo "unknown option $1 (see: bash bench/gpu_check.sh --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
[ $# -eq 1 ] || { echo "usage: bash bench/gpu_check.sh [--dry] [--bundle FILE] OUT_DIR" >&2; exit 2; }
mkdir -p "$1/logs" "$1/env" || exit 2
OUT=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
[ -z "$BUNDLE" ] || BUNDLE=$(cd "$(dirname "$BUNDLE")" && pwd)/$(basename "$BUNDLE")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastpref-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
SITE=$WORK/site              # fastpref, built and installed once (not editable)
WHEELS_SITE=$WORK/wheels     # the benchmark libraries from bench/wheels/
RUN=$WORK/run                # working directory of every Python step: the checkout's fastpref/ must not shadow $SITE
mkdir -p "$RUN"
: > "$OUT/steps.tsv"

# Each step's limit in seconds (the budget above; tests/test_gpu_check.py checks the sum).
declare -A LIMIT=([env]=10 [wheels]=10 [build]=140 [import]=15 [tests]=130 [warmup]=20 [large]=40 [sanitizer]=10
                  [memcheck]=50 [racecheck]=20 [bench]=80 [latency]=15)
BUDGET=540
ORDER=(env wheels build import tests warmup large sanitizer memcheck racecheck bench latency)
DROPPABLE=" latency racecheck "  # dropped when short of time, latency first (see fits)

if [ $DRY = 1 ]; then
  DEVICE=cpu
  REQUIRED=torch,triton          # no C++ extension is built in a dry run
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=
  TEST_K="test_interpreter_preset_and_splits or test_logp_only or (confident_tokens and temp0.7 and fp16)"
  BENCH_SIZE=--tiny BENCH_WORKLOADS=logprobs,token_kl
  # The limits are a GPU machine's; a CPU (a shared CI runner, the interpreter) gets DRY_SLOWDOWN times them.
  for s in "${ORDER[@]}"; do LIMIT[$s]=$((LIMIT[$s] * ${DRY_SLOWDOWN:-8})); done
  BUDGET=$((BUDGET * ${DRY_SLOWDOWN:-8}))
else
  DEVICE=cuda
  REQUIRED=torch,triton,native   # FASTPREF_REQUIRE_BACKENDS: a GPU test of a missing backend fails, never skips
  TEST_K=
  BENCH_SIZE= BENCH_WORKLOADS=logprobs,token_kl,sweep_N,dpo
fi
# A cold Triton cache, the same for every step (so later steps reuse what the tests compiled).
export TRITON_CACHE_DIR=$WORK/triton-cache PYTHONUNBUFFERED=1
export PYTHONPATH=$SITE:$WHEELS_SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}
export OUT ROOT PY SITE WHEELS_SITE RUN DEVICE REQUIRED DRY

FAILED=0
NOTE=
bundle() {
  [ -z "$BUNDLE" ] || tar -czf "$BUNDLE.tmp" -C "$(dirname "$OUT")" "$(basename "$OUT")" 2>/dev/null \
    && mv "$BUNDLE.tmp" "$BUNDLE"
}
record() {  # record NAME STATUS SECONDS NOTE
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${LIMIT[$1]}" "$4" >> "$OUT/steps.tsv"
  echo "-- $1: $2 (${3}s of ${LIMIT[$1]}s)${4:+ $4}"
  bundle
}
skip() { record "$1" skipped 0 "$2"; }
step() {  # step NAME FUNCTION: run under the step's limit (SIGINT first, so pytest and the runner write their files)
  local name=$1 t0=$SECONDS rc status
  echo "== $name (limit ${LIMIT[$name]}s)"
  (cd "$RUN" && timeout -s INT -k 15 "${LIMIT[$name]}" bash -c "$2") > "$OUT/logs/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=TIMEOUT ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  if [ "$name" = sanitizer ] && [ $rc = 3 ]; then  # the device, not the kernels: recorded, not counted
    status=unsupported
    NOTE="compute-sanitizer refuses this device: $(grep -m 1 -i 'error' "$OUT/logs/$name.log" | cut -c 1-150)"
  elif [ $rc != 0 ]; then
    FAILED=$((FAILED + 1))
  fi
  tail -n 6 "$OUT/logs/$name.log" | sed 's/^/   /'
  record "$name" "$status" $((SECONDS - t0)) "${NOTE:-}"
  NOTE=
}
fits() {  # fits NAME: is there time for this step and every later one that is not droppable, within the budget?
  local rest=${LIMIT[$1]} after=0 s
  for s in "${ORDER[@]}"; do
    [ $after = 1 ] && case "$DROPPABLE" in *" $s "*) ;; *) rest=$((rest + LIMIT[$s])) ;; esac
    [ "$s" = "$1" ] && after=1
  done
  [ $((SECONDS + rest)) -le $BUDGET ]
}
sanitizer() {  # compute-sanitizer, or in a dry run a stand-in that refuses the device as some lent machines do
  if [ "$DRY" = 1 ]; then echo "========= Error: Device not supported (dry run: stand-in for compute-sanitizer)"; return 1; fi
  compute-sanitizer "$@"
}

# ------------------------------------------------------------------------------------------ steps
step_env() {
  { date -u; echo "git $(git -C "$ROOT" rev-parse HEAD 2>/dev/null)"; echo "cpus $(nproc)"
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda)
try:
    import triton; print('triton', triton.__version__)
except ImportError as e: print('triton missing:', e)"
    nvcc --version 2>&1 | tail -n 2; compute-sanitizer --version 2>&1 | head -n 2; } > "$OUT/env/versions.txt" 2>&1
  "$PY" -m pip freeze > "$OUT/env/pip-freeze.txt" 2>&1
  if [ "$DRY" = 1 ]; then echo "dry run: no nvidia-smi" > "$OUT/env/nvidia-smi.txt"
  else nvidia-smi -q > "$OUT/env/nvidia-smi.txt" 2>&1 || return 1; fi
  cat "$OUT/env/versions.txt"
}
step_wheels() {
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WHEELS_SITE" \
    "$ROOT"/bench/wheels/*.whl && ls "$WHEELS_SITE"
}
step_build() {
  # One build: a wheel of the checkout (both extensions; ninja runs MAX_JOBS compiles at once) unpacked into
  # $SITE. No editable install, no second compile. CUDA code for this GPU's architecture only (half the
  # compile time); CI compile-checks the shipped architecture list.
  if [ "$DRY" = 1 ]; then export FASTPREF_NO_NATIVE=1
  else
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1)}
    echo "MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  fi
  "$PY" -m pip install --no-build-isolation --no-deps --no-index --no-cache-dir --target "$SITE" "$ROOT" || return 1
  # setup.py writes why an extension was not built beside its sources
  if [ -f "$ROOT/fastpref/_native_build.json" ]; then echo "build notes:"; cat "$ROOT/fastpref/_native_build.json"; fi
  ls "$SITE/fastpref"
}
step_import() {
  "$PY" - <<'PY'
import os, sys
import fastpref, fastpref.kernels  # noqa: E401
from fastpref import backends
site, device = os.environ["SITE"], os.environ["DEVICE"]
print("fastpref from", fastpref.__file__, "| kernels from", fastpref.kernels.__file__)
assert fastpref.__file__.startswith(site), f"fastpref was imported from {fastpref.__file__}, not the build in {site}"
have = fastpref.available_backends(device)
print(f"available_backends({device!r}) = {have}")
for name, mod in sorted(sys.modules.items()):
    if name.startswith("fastpref._native"):
        print(name, "from", mod.__file__)
        if device == "cuda":
            assert mod.__file__.startswith(site), f"{name} is not the one just built in {site}"
missing = [b for b in os.environ["REQUIRED"].split(",") if b not in have]
for b in missing:
    try:
        backends.resolve(b, __import__("torch").device(device), None)
    except Exception as why:  # noqa: BLE001
        print(f"backend {b!r} unavailable: {why}")
sys.exit(f"required backends missing: {missing}" if missing else 0)
PY
}
step_tests() {
  # Most informative first; then every other file with a GPU-marked test. No -x: every failure is reported.
  local files=() f extra=()
  for f in test_token_stats test_token_kl test_frozen_head test_frozen_precision test_gemm_host test_frozen_kl \
           test_triton_backend test_triton_strategies \
           test_parallel test_inputs test_compile test_nn; do
    [ -f "$ROOT/tests/$f.py" ] && files+=("$ROOT/tests/$f.py")
  done
  for f in $(grep -rl --include='test_*.py' 'mark\.gpu' "$ROOT/tests" | sort); do
    case " ${files[*]} " in *" $f "*) ;; *) files+=("$f") ;; esac
  done
  "$PY" -c "import xdist" 2>/dev/null && [ "$DRY" = 0 ] && extra+=(-n 4 --dist load)  # parallel cold compiles
  "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 100)
  echo "FASTPREF_REQUIRE_BACKENDS=$REQUIRED; files: ${files[*]#$ROOT/}"
  FASTPREF_REQUIRE_BACKENDS=$REQUIRED "$PY" -m pytest -p no:cacheprovider -q -rfEs --durations=25 \
    --junitxml="$OUT/tests.xml" "${extra[@]}" ${TEST_K:+-k "$TEST_K"} "${files[@]}"
}
step_warmup() {  # compiles the sanitizer runs' kernels without the sanitizer (its slowdown would count them)
  "$PY" "$ROOT/bench/sanitize_smoke.py" --device "$DEVICE" && "$PY" "$ROOT/bench/sanitize_smoke.py" --device "$DEVICE" --smallest
}
step_large() {
  "$PY" "$ROOT/bench/large_case.py" --device "$DEVICE" $([ "$DRY" = 1 ] && echo --tiny)
}
step_sanitizer() {  # exit 3: the sanitizer refuses this device (recorded as unsupported, not as a failure)
  local probe='import torch; x = torch.ones(8, device="cuda"); torch.cuda.synchronize(); print("probe", float(x.sum()))'
  sanitizer --tool memcheck --error-exitcode 1 "$PY" -c "$probe" && return 0
  echo "compute-sanitizer cannot run a one-kernel program on this device"
  return 3
}
step_memcheck() {
  # No caching allocator: an out-of-bounds access inside one of its blocks would otherwise pass.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 sanitizer --tool memcheck --error-exitcode 1 --print-limit 30 \
    "$PY" "$ROOT/bench/sanitize_smoke.py" --device cuda
}
step_racecheck() {  # the Triton kernels and the native epilogues' __syncthreads reductions
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 1 \
    --print-limit 30 "$PY" "$ROOT/bench/sanitize_smoke.py" --device cuda --smallest
}
step_bench() {
  # Starts no measurement after BUDGET_S, and none runs longer than TIMEOUT_S: done inside the step's limit.
  "$PY" -m bench --device "$DEVICE" --plan check $BENCH_SIZE --workloads "$BENCH_WORKLOADS" \
    --out "$OUT/bench" --budget-s "$BENCH_BUDGET_S" --timeout-s "$BENCH_TIMEOUT_S" --no-plots
}
step_latency() {
  "$PY" -m bench --device "$DEVICE" --plan check $BENCH_SIZE --workloads latency --out "$OUT/latency" \
    --timeout-s "$BENCH_TIMEOUT_S" --no-plots
}
export -f sanitizer step_env step_wheels step_build step_import step_tests step_warmup step_large step_sanitizer \
  step_memcheck step_racecheck step_bench step_latency
BENCH_TIMEOUT_S=$((LIMIT[bench] / 3))
export BENCH_SIZE BENCH_WORKLOADS TEST_K BENCH_TIMEOUT_S BENCH_BUDGET_S=$((LIMIT[bench] - BENCH_TIMEOUT_S - 15))

# ------------------------------------------------------------------------------------------ run
echo "fastpref GPU check$([ $DRY = 1 ] && echo ' (dry run on the CPU)'): output in $OUT, budget ${BUDGET}s"
step env step_env
if compgen -G "$ROOT/bench/wheels/*.whl" > /dev/null; then step wheels step_wheels
else skip wheels "no bench/wheels/*.whl (bash bench/fetch_wheels.sh, then bring bench/wheels/ along)"; fi
step build step_build
step import step_import
step tests step_tests
step warmup step_warmup
step large step_large
if [ $DRY = 0 ] && ! command -v compute-sanitizer > /dev/null; then
  for s in sanitizer memcheck racecheck; do skip $s "compute-sanitizer not on PATH"; done; FAILED=$((FAILED + 1))
else
  step sanitizer step_sanitizer
  if [ "$(tail -n 1 "$OUT/steps.tsv" | cut -f 2)" = unsupported ]; then
    skip memcheck "compute-sanitizer unsupported on this device (see the sanitizer step)"
    skip racecheck "compute-sanitizer unsupported on this device (see the sanitizer step)"
  else
    step memcheck step_memcheck
    if fits racecheck; then step racecheck step_racecheck; else skip racecheck "no time left in the budget"; fi
  fi
fi
step bench step_bench
if [ $DRY = 0 ] && [ -f "$OUT/bench/bench.json" ]; then
  mkdir -p "$ROOT/bench/results/cuda" && cp "$OUT/bench/bench.json" "$OUT/bench/bench.md" "$ROOT/bench/results/cuda/"
fi
if fits latency; then step latency step_latency; else skip latency "no time left in the budget"; fi
bundle
echo
"$PY" "$ROOT/bench/check_summary.py" "$OUT"
[ $FAILED = 0 ]
