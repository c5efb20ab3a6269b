#!/usr/bin/env bash
# The GPU check of issue 6, as one script for the device machine (about 8 minutes on an H100):
#   gnc bench on the GPU, then a short cifar10-resnet18 training of the three methods.
# Run from the repository root with the CIFAR-10 JPEGs unpacked under data/ (carry `data`
# and `.venv` if they were built there, else this script installs):
#   tar xzf ../shared/data/cifar10-jpg.tar.gz -C data/
# Writes $OUT/bench.json, $OUT/bench.txt and $OUT/train-<method>.jsonl (OUT defaults to gpu-out).
set -euo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if [ ! -x .venv/bin/gnc ]; then make install >/dev/null; fi
G=.venv/bin/gnc
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$G bench --device cuda --sizes 512x10,512x100,2048x1000,10240x10000 | tee "$OUT/bench.txt"
$G bench --device cuda --sizes 2048x1000,10240x10000 --json > "$OUT/bench.json"
for m in standard fixed implicit; do
  $G train --preset cifar10-resnet18 --method "$m" --epochs 3 --eval-every 1 --seed 1 \
    --device cuda --amp bf16 --data-dir data --no-progress --out "runs/gpu-$m" | tail -1
  cp "runs/gpu-$m/metrics.jsonl" "$OUT/train-$m.jsonl"
done
