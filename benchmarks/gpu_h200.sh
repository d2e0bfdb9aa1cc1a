#!/usr/bin/env bash
# GPU benchmark of issue 7: ViT-B/16 M3AE at 256 px, captions padded to 64, global batch 256,
# bf16 autocast, on one H200; MFU against the measured bf16 matmul peak and against the
# 790 TFLOP/s dense-bf16 datasheet figure. Then peak memory of ViT-L/16 at batch 64 with
# and without activation checkpointing. Writes JSON under benchmarks/results/ and prints
# tables; copy the numbers, the date and this command into benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu_h200.sh            # about 5-8 minutes on an H200 (compile included)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT_DIR:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
STAMP=$(date +%Y%m%d-%H%M)
common=(--preset base --batch 256 --text-len 64 --device cuda --nominal-peak-tflops 790 train.precision=bf16)

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv | tee "$OUT/h200-$STAMP-gpu.txt"
# 1) m3ae pretrain's step (eager), 2) with the unfused text head, 3) compiled.
$PY benchmarks/train_throughput.py "${common[@]}" --steps 30 --warmup 10 --json "$OUT/h200-$STAMP-base-bf16.json"
$PY benchmarks/train_throughput.py "${common[@]}" --plain --steps 15 --warmup 5 --json "$OUT/h200-$STAMP-base-bf16-plain.json"
$PY benchmarks/train_throughput.py "${common[@]}" train.compile=true --steps 30 --warmup 15 --json "$OUT/h200-$STAMP-base-bf16-compile.json" \
  || echo "torch.compile run failed; the eager numbers above stand" >&2
# Peak memory of ViT-L/16 at batch 64 (measured, not extrapolated, on the GPU).
$PY benchmarks/memory.py --config large --batch 64 --device cuda --precision bf16 --json "$OUT/h200-$STAMP-memory-large-b64.json"
