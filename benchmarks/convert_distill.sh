#!/usr/bin/env bash
# Teacher → separable student → distilled student, on the embedded Fashion-MNIST subset at 32 px.
# Prints the three accuracies and the conversion report (MACs, params, measured latency).
#   bash benchmarks/convert_distill.sh [OUT_DIR]        (≈ 1.5 min on 2 cores)
set -euo pipefail
OUT=${1:-runs/convert-distill}
FT=${FT:-.venv/bin/finetune}
.venv/bin/python -m finetune.demo_data "$OUT/data" >/dev/null
$FT train --data "$OUT/data" --model resnet18 --weights none --img-size 32 --epochs 4 --lr 2e-3 \
    --out "$OUT/teacher" --overwrite --no-progress
$FT convert "$OUT/teacher" --rank 1 --calib-data "$OUT/data/train" --out "$OUT/sep" --overwrite
$FT distill --teacher "$OUT/teacher" --student "$OUT/sep" --data "$OUT/data" --epochs 3 --img-size 32 \
    --out "$OUT/sep-kd" --overwrite --no-progress
