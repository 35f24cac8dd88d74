#!/usr/bin/env bash
# Device call: PHASE=1 -> GPU suite (quick) then the Omniglot study until STUDY_S; PHASE=2 -> continue
# the study, then the all-label summary run. Everything returned as tarballs under $OUT.
set -u
export PYTHONUNBUFFERED=1
T0=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD METAOPT_OMNIGLOT=$PWD/.gpu/omniglot
OUTD=${OUT:-/tmp/out}; mkdir -p "$OUTD" .gpurun
SPEC=configs/study/omniglot_5w1s.yaml
STUDY=(python3 experiments/study.py "$SPEC" --device cuda --runs .gpurun/runs --results .gpurun/results)
LABELS="sgd sgd_momentum adam rmsprop lion adafactor_torch adafactor_hf_scaled adafactor_hf_unscaled adafactor_paper"
if [ "${PHASE:-1}" = 1 ]; then
  ITERATIONS=${SUITE_ITER:-500} timeout --signal=INT --kill-after=20 ${SUITE_S:-250} bash experiments/gpu_suite.sh --quick .gpurun/gpu_suite 2>&1 | tail -40
  tar czf "$OUTD/gpu_suite.tgz" -C .gpurun gpu_suite
fi
left=$(( ${STUDY_S:-280} - (SECONDS - T0) + ${SUITE_OFFSET:-0} ))
echo "study phase ${PHASE:-1}: ${left}s"
if [ "$left" -gt 20 ]; then
  export OMP_NUM_THREADS=1
  for l in $LABELS; do
    timeout --signal=INT --kill-after=20 "$left" "${STUDY[@]}" --only "$l" > ".gpurun/study_$l.log" 2>&1 &
  done
  wait
fi
if [ "${PHASE:-1}" = 2 ]; then
  left=$(( ${SUMMARY_END:-200} - (SECONDS - T0) ))
  echo "summary: ${left}s"
  OMP_NUM_THREADS=4 timeout --signal=INT --kill-after=20 "$left" "${STUDY[@]}" > .gpurun/study_all.log 2>&1; echo "summary rc $?"
fi
for l in $LABELS; do tail -n 2 ".gpurun/study_$l.log" 2>/dev/null; done
tail -n 5 .gpurun/study_all.log 2>/dev/null
tar czf "$OUTD/study_runs.tgz" --exclude='*/tune/*/checkpoints' --exclude='events.out.*' -C .gpurun runs results $(cd .gpurun; ls study_*.log 2>/dev/null)
ls -la "$OUTD"; echo "elapsed $((SECONDS - T0))s"
