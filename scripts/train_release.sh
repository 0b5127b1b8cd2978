#!/usr/bin/env bash
# Trains the shipped release (models/) from random init on the official train split,
# selecting epochs and thresholds on val and reporting test once. Resumable: rerun the
# script after an interruption and each model continues from its last epoch checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${CTSCAN_DATA_DIR:-../shared/data/ucsd-covid-ct}
RUNS=${RELEASE_RUNS:-var/release-runs}
train() {
  local model=$1 epochs=$2 size=$3 patience=$4
  if [ -f "$RUNS/$model/.stored" ]; then echo "$model already in the release"; return; fi
  local resume=()
  [ -f "$RUNS/$model/state.json" ] && resume=(--resume)
  .venv/bin/ctscan train --model "$model" --init none --input-size "$size" --epochs "$epochs" \
    --patience "$patience" --batch-size 16 --learning-rate 1e-3 --data "$DATA" \
    --report-test --run-dir "$RUNS/$model" --store models --promote always "${resume[@]}" \
    | tee "$RUNS/$model.summary.json"
  touch "$RUNS/$model/.stored"
}
mkdir -p "$RUNS"
# Input sizes below the ImageNet defaults keep CPU training to about an hour (see README).
train mobilenetv2 "${MOBILENET_EPOCHS:-60}" "${MOBILENET_SIZE:-160}" "${MOBILENET_PATIENCE:-15}"
train densenet121 "${DENSENET_EPOCHS:-20}" "${DENSENET_SIZE:-128}" "${DENSENET_PATIENCE:-8}"
train inceptionv3 "${INCEPTION_EPOCHS:-20}" "${INCEPTION_SIZE:-128}" "${INCEPTION_PATIENCE:-8}"
.venv/bin/ctscan models calibrate-ensemble --store models --data "$DATA"
