#!/usr/bin/env bash
# The runs of docs/spikes.md (issue 26), one at a time (two of our processes on 2 cores slow each other), each
# resumed where it stopped: `bash study/run.sh [GROUP ...]` from the repository root, runs in runs/study/.
# Groups: pairs20 (plain20/resnet20, seeds 0-4), interventions (the prescribed BN momentum 0.8, --precise-bn 2000,
# momentum 0.02 and 0.4, lr 0.05; plain20/resnet20, seeds 0-1), depth56 (plain56/resnet56, seeds 0-2), resnet18
# (the seed report's ResNet-18 with and without --no-skip in its recipe, shortened; seeds 0-1), warmup56 (the
# 56-layer pair with one epoch of linear warm-up; seeds 0-1).
# THREADS=1 taskset -c 0 bash study/run.sh   leaves the other core free (what the first session did).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/study}
export OMP_NUM_THREADS=${THREADS:-${OMP_NUM_THREADS:-2}}
# The recipe: Fashion-MNIST, the first 20,000 training images (the last 5,000 of the 60,000 validate), fp32, lr 0.2, BN momentum
# 0.1, SGD 0.9, wd 5e-4, batch 128, cosine, crop-flip, 10 epochs; BN monitor every 10 steps; the attribution
# on the first 2,000 validation images with statistics recomputed over the first 2,000 training images.
RECIPE="--dataset fashion-mnist --data-dir ${DATA:-data} --train-images 20000 --val-split 5000 --precision fp32 --epochs 10 --lr 0.2
        --bn-momentum 0.1 --augment crop-flip --schedule cosine --batch-size 128 --monitor-every 10
        --recalibration-images 2000 --compile off"

train() {  # NAME MODEL SEED [OPTIONS ...]
  local name=$1 model=$2 seed=$3; shift 3
  if [ -f "$OUT/$name/last.pt" ] || [ -f "$OUT/$name/config.json" ]; then
    $PY -m train --resume "$OUT/$name"
  else
    $PY -m train --model "$model" --seed "$seed" $RECIPE "$@" --out "$OUT/$name"
  fi
}

pairs20() { for seed in 0 1 2 3 4; do train plain20-s$seed plain20 $seed; train resnet20-s$seed resnet20 $seed; done; }
depth56() { for seed in 0 1 2; do train plain56-s$seed plain56 $seed; train resnet56-s$seed resnet56 $seed; done; }
# The seed report's with-skip ResNet-18 spiked at epochs 5-7 of 20 (CIFAR-10, SGD 0.9, lr 0.1, wd 5e-4, batch 128,
# cosine, crop-flip): that recipe on the first 10,000 training images for 10 epochs (a CPU's budget, 780 steps).
resnet18() {
  for seed in 0 1; do
    train resnet18-noskip-s$seed resnet18 $seed --no-skip --lr 0.1 --train-images 10000
    train resnet18-s$seed resnet18 $seed --lr 0.1 --train-images 10000
  done
}
# plain56's stem and stage 1 grew 20-40-fold in the first ten steps at lr 0.2 and froze (docs/spikes.md): the
# same pair with the lr warmed up linearly over the first epoch (156 steps), the paper's remedy for ResNet-110.
warmup56() { for seed in 0 1; do train plain56-warmup-s$seed plain56 $seed --warmup 156; train resnet56-warmup-s$seed resnet56 $seed --warmup 156; done; }
interventions() {  # each intervention on both models and both seeds before the next: a stopped study compares whole rows
  local -A options=([m0.8]="--bn-momentum 0.8" [precise]="--precise-bn 2000" [m0.02]="--bn-momentum 0.02"
                    [m0.4]="--bn-momentum 0.4" [lr0.05]="--lr 0.05")
  for change in m0.8 precise m0.02 m0.4 lr0.05; do
    for seed in 0 1; do
      for model in plain20 resnet20; do
        train $model-$change-s$seed $model $seed ${options[$change]}
      done
    done
  done
}

for group in "${@:-pairs20}"; do
  "$group"
done
