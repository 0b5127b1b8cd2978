#!/usr/bin/env bash
# Trains the shipped release (models/) from random initialisation on the official UCSD train
# split with the recipe of README "Train and evaluate": lung-v1 preprocessing, domain-randomising
# augmentation and a long cosine schedule; the epoch (val AUC), calibration,
# thresholds and the indeterminate band are chosen on val, test is reported once. Resumable:
# rerun after an interruption and each model continues from its last epoch checkpoint.
# DenseNet-121 needs a lower learning rate and a longer schedule than MobileNetV2 (its val AUC
# swings between epochs; the best one is kept, or the average of the last epochs if better).
# (The shipped InceptionV3 is still the first release's legacy model: its runs with this recipe
# did not pass the promotion floors on val; see README "Results".)
#   CTSCAN_DATA_DIR=../shared/data/ucsd-covid-ct scripts/train_release.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${CTSCAN_DATA_DIR:-../shared/data/ucsd-covid-ct}
RUNS=${RELEASE_RUNS:-var/release-runs}
STORE=${RELEASE_STORE:-models}
SIZE=${RELEASE_INPUT_SIZE:-128}
train() {
  local model=$1 epochs=$2 rate=$3
  shift 3  # the rest: flags of this model's recipe
  if [ -f "$RUNS/$model/.stored" ]; then echo "$model already in the release"; return; fi
  local resume=()
  [ -f "$RUNS/$model/state.json" ] && resume=(--resume)
  .venv/bin/ctscan train --model "$model" --init none --input-size "$SIZE" --epochs "$epochs" \
    --patience "$epochs" --batch-size 16 --learning-rate "$rate" --data "$DATA" "$@" \
    --preprocessing lung-v1 --augmentation domain \
    --report-test --run-dir "$RUNS/$model" --store "$STORE" --promote always "${resume[@]}" \
    | tee "$RUNS/$model.summary.json"
  touch "$RUNS/$model/.stored"
}
recipe() {  # one model's release recipe: epochs, learning rate, then its own flags
  case $1 in
    mobilenetv2) echo "${MOBILENET_EPOCHS:-150} 1e-3" ;;
    densenet121) echo "${DENSENET_EPOCHS:-72} 3e-4 --swa-epochs 24" ;;
    inceptionv3) echo "${INCEPTION_EPOCHS:-40} 1e-3" ;;
    *) echo "no release recipe for $1 (an ensemble member in ctscan/models.py): add one here" >&2; return 1 ;;
  esac
}
mkdir -p "$RUNS"
# The release is the registry's ensemble (ctscan.models.ensemble_members), never a list here.
members=$(.venv/bin/python -c 'from ctscan.models import ensemble_members; print(*ensemble_members())')
for model in $members; do
  spec=$(recipe "$model")
  read -r -a arguments <<< "$spec"
  train "$model" "${arguments[@]}"
done
.venv/bin/ctscan models calibrate-ensemble --store "$STORE" --data "$DATA"
