#!/usr/bin/env bash
# One prepared GPU check: each strategy's training step (e2e included) at realistic sizes,
# with its step time and model-FLOPs utilisation (benchmarks/step_cost.py), in at most
# 8 minutes: a Transformer LM with d_model 1024 and T 1024, then a ResNet-50 at 224x224,
# both bf16 and cut into 4 stages, all stages on one device; then the trainer's
# per-step overhead against the bare executor loop (benchmarks/trainer_overhead.py) on
# the accelerator (mpmd and spmd need 2 devices and are skipped on one).
#
#   benchmarks/gpu.sh            # on the GPU machine, from anywhere
#   benchmarks/gpu.sh --cpu      # the same script at test size, on any machine
#
# MFU needs the device's peak FLOP/s: ilbp.costs.PEAK_FLOPS by device kind (H100/H200
# bf16 dense 989 TFLOP/s, A100 312, TPU v4 275, v5e 197), or set PEAK_TFLOPS.
# Each workload stops compiling new strategies after BUDGET_S seconds (the compiled ones
# are still timed) and is killed after LIMIT_S, the overhead benchmark after
# OVERHEAD_S: the three stay within 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
STRATEGIES=${STRATEGIES:-e2e,global,local,pairwise,3wise}
BUDGET_S=${BUDGET_S:-150}
LIMIT_S=${LIMIT_S:-200}
OVERHEAD_S=${OVERHEAD_S:-70}
peak=()
[[ -n "${PEAK_TFLOPS:-}" ]] && peak=(--peak-tflops="$PEAK_TFLOPS")

if [[ "${1:-}" == "--cpu" ]]; then
  exec "$PYTHON" -m benchmarks.step_cost --tiny --models=transformer_large \
    --strategies=e2e,pairwise --engines=routed --repeats=1 --no-plan-count \
    --peak-tflops="${PEAK_TFLOPS:-1}"
fi

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv
status=0
for model in transformer_large resnet50; do
  timeout "$LIMIT_S" "$PYTHON" -m benchmarks.step_cost --models="$model" \
    --strategies="$STRATEGIES" --engines=routed --repeats=10 --no-plan-count \
    --budget-s="$BUDGET_S" "${peak[@]}"
  rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "($model: exit status $rc; 124 = killed at the ${LIMIT_S} s limit)"
    status=$rc
  fi
done
timeout "$OVERHEAD_S" "$PYTHON" -m benchmarks.trainer_overhead --platform=default \
  --steps=110 --log-every=25 --repeats=3
rc=$?
[[ $rc -ne 0 ]] && echo "(trainer_overhead: exit status $rc)" && status=$rc
exit $status
