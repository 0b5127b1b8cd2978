#!/usr/bin/env bash
# Trains a release (models/) from random initialisation on several sources at once (issue 22):
# UCSD train + Radiopaedia train, classes balanced within each source and slices weighted so
# that anatomy (lung area, crop share) cannot predict the label (--anatomy-balance), UCSD given
# twice Radiopaedia's say (--source-weight: UCSD val is where every recipe fell); lung-v1
# preprocessing, domain-randomising augmentation, a cosine schedule. The epoch, calibration,
# threshold and band are chosen on the val splits of both sources by the worst source's AUC,
# and a model is promoted only when it passes the floors on EVERY val source (--promote auto):
# one below them stays a candidate and is not in the release. The ensemble is then calibrated
# on both val splits over the members that pass (calibrate-ensemble picks them by the same
# floors and records the others with their reason). Test splits are reported, never chosen on.
# Resumable: rerun after an interruption and each model continues from its last checkpoint.
# RELEASE_MODELS="a b" trains only those members, so two invocations can share the cores (one
# TensorFlow thread each); the ensemble is calibrated by whichever finishes the last member.
#   scripts/train_release.sh            (data: ../shared/data/<set>, or RELEASE_DATA_ROOT)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${RELEASE_DATA_ROOT:-../shared/data}
SOURCES=(--data "$ROOT/ucsd-covid-ct" --data "$ROOT/radiopaedia-covid-seg")
RUNS=${RELEASE_RUNS:-var/release-runs}
STORE=${RELEASE_STORE:-models}
train() {
  local model=$1 size=$2 epochs=$3 rate=$4
  shift 4  # the rest: flags of this model's recipe
  if [ -f "$RUNS/$model/.done" ]; then echo "$model already trained"; return; fi
  local resume=()
  [ -f "$RUNS/$model/state.json" ] && resume=(--resume)
  .venv/bin/ctscan train --model "$model" --init "${RELEASE_INIT:-none}" --input-size "$size" \
    --epochs "$epochs" --patience "$epochs" --batch-size 16 --learning-rate "$rate" "${SOURCES[@]}" \
    --anatomy-balance --preprocessing lung-v1 --augmentation domain "$@" \
    --report-test --run-dir "$RUNS/$model" --store "$STORE" --promote auto "${resume[@]}" \
    | tee "$RUNS/$model.summary.json"
  touch "$RUNS/$model/.done"
}
# UCSD's labels (other lung diseases among its non-COVID slices) disagree with Radiopaedia's about
# density (`ctscan audit --lung-features`); with equal say every recipe fell on UCSD val.
UCSD_SHARE="--source-weight ucsd-covid-ct=${UCSD_SHARE_FACTOR:-2}"
recipe() {  # one model's release recipe: input size, epochs, learning rate, then its own flags
  case $1 in
    densenet121) echo "128 ${DENSENET_EPOCHS:-40} 3e-4 --swa-epochs 12 $UCSD_SHARE" ;;
    inceptionv3) echo "112 ${INCEPTION_EPOCHS:-40} 1e-3 --swa-epochs 12 $UCSD_SHARE" ;;
    mobilenetv2) echo "112 ${MOBILENET_EPOCHS:-90} 1e-3 --ema $UCSD_SHARE" ;;
    *) echo "no release recipe for $1 (an ensemble member in ctscan/models.py): add one here" >&2; return 1 ;;
  esac
}
mkdir -p "$RUNS"
# The release is the registry's ensemble (ctscan.models.ensemble_members), never a list here.
members=$(.venv/bin/python -c 'from ctscan.models import ensemble_members; print(*ensemble_members())')
for model in ${RELEASE_MODELS:-$members}; do
  spec=$(recipe "$model")
  read -r -a arguments <<< "$spec"
  train "$model" "${arguments[@]}"
done
for model in $members; do
  if [ ! -f "$RUNS/$model/.done" ]; then echo "$model not trained yet: the ensemble waits for it"; exit 0; fi
done
.venv/bin/ctscan models calibrate-ensemble --store "$STORE" "${SOURCES[@]}"
