#!/usr/bin/env bash
# Trains the shipped release (models/) from random init on the official train split,
# selecting epochs and thresholds on val and reporting test once. Resumable: rerun the
# script after an interruption and each model continues from its last epoch checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${CTSCAN_DATA_DIR:-../shared/data/ucsd-covid-ct}
RUNS=${RELEASE_RUNS:-var/release-runs}
SIZE=${RELEASE_INPUT_SIZE:-160}
train() {
  local model=$1 epochs=$2
  if [ -f "$RUNS/$model/.stored" ]; then echo "$model already in the release"; return; fi
  local resume=()
  [ -f "$RUNS/$model/state.json" ] && resume=(--resume)
  .venv/bin/ctscan train --model "$model" --init none --input-size "$SIZE" --epochs "$epochs" \
    --patience "${RELEASE_PATIENCE:-12}" --batch-size 16 --learning-rate 1e-3 --data "$DATA" \
    --report-test --run-dir "$RUNS/$model" --store models --promote always "${resume[@]}" \
    | tee "$RUNS/$model.summary.json"
  touch "$RUNS/$model/.stored"
}
mkdir -p "$RUNS"
train mobilenetv2 "${MOBILENET_EPOCHS:-60}"
train densenet121 "${DENSENET_EPOCHS:-30}"
train inceptionv3 "${INCEPTION_EPOCHS:-30}"
.venv/bin/ctscan models calibrate-ensemble --store models --data "$DATA"
