#!/usr/bin/env bash
# The whole CUDA benchmark and a short Omniglot 5-way 1-shot training in fp32 and bf16, in
# one command, writing everything under OUTDIR (default results/gpu_suite):
#
#   bash experiments/gpu_suite.sh [--quick] [OUTDIR]
#
#   1. bench.md/json     O1 O5 (SGD, second order), metaopt in fp32 / bf16 against the float32
#                        peers, meta-gradient fidelity (bf16 vs float64), targets
#      bench_sinusoid.*  S5 S1 in fp32 / tf32
#   2. curves.md/json    O1 time and peak memory against inner steps, meta-batch and model
#      remat.md/json     O1 second-order memory against inner steps, plain vs checkpoint_every
#   3. train_fp32/, train_bf16/   `metaopt train configs/omniglot_5w1s.yaml` for N iterations
#                        (train.precision=bf16 for the second), final test accuracy with 95% CI
#   4. summary.md        the targets and the two accuracies side by side
#
# At most 6 minutes on one H200 (the sum of the steps' limits; --quick: about 4). Measured on an
# H200 (2026-11-30): --quick's limits cut the benchmark steps short (the float64 gate and CUDA
# warm-up take most of them): use the full limits when the lease allows. Every step
# runs under `timeout`, so a step that overruns is interrupted (SIGINT: the benchmark still writes what it measured) and the
# suite goes on; suite.log keeps the whole output. Environment:
#   METAOPT_OMNIGLOT  Omniglot folder (the npz copy or the official zips) for the training runs
#   PYTHON            interpreter (default: python)
#   ITERATIONS        training iterations per run (default 800; --quick 300)
#   TEST_TASKS        test tasks of the final evaluation (default 600)
#   DEVICE            default cuda (cpu with EXTRA_BENCH_ARGS=--tiny: a smoke run of the script)
#   EXTRA_BENCH_ARGS  appended to both `metaopt bench` calls
set -u
QUICK=0
OUT=results/gpu_suite
for a in "$@"; do
  case "$a" in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) OUT="$a" ;;
  esac
done
PY="${PYTHON:-python}"; DEV="${DEVICE:-cuda}"; read -r -a EXTRA <<<"${EXTRA_BENCH_ARGS:-}"
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG="$OUT/suite.log"
if [ "$QUICK" = 1 ]; then
  REPEATS=2; ITER="${ITERATIONS:-300}"; T_BENCH=75; T_BENCH_S=25; T_CURVES=35; T_REMAT=40; T_TRAIN=40
  CURVE_STEPS="1 5 10"; CURVE_BATCH="4 32"; REMAT_STEPS="5 20 100"
else
  REPEATS=3; ITER="${ITERATIONS:-800}"; T_BENCH=100; T_BENCH_S=40; T_CURVES=40; T_REMAT=55; T_TRAIN=65
  CURVE_STEPS="1 2 5 10"; CURVE_BATCH="1 4 16 32"; REMAT_STEPS="5 20 50 100"
fi

step() {  # step NAME TIMEOUT_S COMMAND...: run, log, record the exit status, never abort the suite
  local name="$1" limit="$2"; shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  echo "$name $rc $((SECONDS - t0))" >>"$OUT/steps.txt"
}

: >"$OUT/steps.txt"
{ echo "# gpu suite $(date -u)"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  "$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"
  for m in higher torchopt learn2learn; do "$PY" -c "import $m; print('$m', getattr($m, '__version__', '?'))" 2>&1 | tail -1; done
} >>"$LOG" 2>&1

# --iterations 2: a GPU meta-iteration takes milliseconds, the CPU defaults (S1: 20) would
# spend the budget on the sinusoids. Omniglot first: what matters most survives a timeout.
step bench "$T_BENCH" "$PY" -m metaopt bench --device "$DEV" --workloads O1 O5 --inner sgd --order second \
  --precision fp32 bf16 --fidelity --repeats "$REPEATS" --iterations 2 --memory inline --no-memory-report \
  --targets experiments/bench_targets.yaml --output "$OUT/bench" --plots "${EXTRA[@]}"
step bench_sinusoid "$T_BENCH_S" "$PY" -m metaopt bench --device "$DEV" --workloads S5 S1 --inner sgd \
  --order second --precision fp32 tf32 --repeats "$REPEATS" --iterations 5 --memory inline --no-memory-report --no-check \
  --targets experiments/bench_targets.yaml --output "$OUT/bench_sinusoid" "${EXTRA[@]}"

# shellcheck disable=SC2086
step curves "$T_CURVES" "$PY" -m metaopt bench --device "$DEV" --workloads --curves steps batch model \
  --curve-steps $CURVE_STEPS --curve-batch $CURVE_BATCH --curve-models conv4 resnet12 --curve-meta-batch 8 \
  --repeats 2 --memory inline --no-memory-report --no-check --output "$OUT/curves" --plots "${EXTRA[@]}"
# shellcheck disable=SC2086
step remat "$T_REMAT" "$PY" -m metaopt bench --device "$DEV" --workloads --remat-steps $REMAT_STEPS \
  --repeats 1 --memory inline --no-memory-report --no-check --targets experiments/bench_targets.yaml \
  --output "$OUT/remat" --plots "${EXTRA[@]}"

TRAIN_SET=(--set "train.iterations=$ITER" --set train.eval_every=0 --set train.checkpoint_every=0
           --set "train.test_tasks=${TEST_TASKS:-600}" --set train.progress=false --set train.plots=false --set train.tensorboard=false)
step train_fp32 "$T_TRAIN" "$PY" -m metaopt train configs/omniglot_5w1s.yaml --device "$DEV" "${TRAIN_SET[@]}" \
  --out "$OUT/train_fp32"
step train_bf16 "$T_TRAIN" "$PY" -m metaopt train configs/omniglot_5w1s.yaml --device "$DEV" "${TRAIN_SET[@]}" \
  --set train.precision=bf16 --out "$OUT/train_bf16"

"$PY" experiments/gpu_suite_summary.py "$OUT" >"$OUT/summary.md" 2>>"$LOG"
cat "$OUT/summary.md"
echo "suite done: $OUT ($(date -u +%H:%M:%S))" | tee -a "$LOG"
