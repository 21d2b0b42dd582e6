#!/usr/bin/env bash
# GPU path check: the `base` and `large` (>= 1B) models, bf16, DeepSpeed ZeRO-2 and ZeRO-3,
# a few hundred steps each on one GPU, through the same jobs.train code the CPU tests use.
# Records tokens/s, MFU and peak GPU memory in bench/results/gpu_check.json.
#
#   bash bench/gpu_check.sh [STEPS]        # on a machine with an NVIDIA GPU and CUDA torch
#
# Data: a synthetic Taobao-schema log (50k users, 100k items) generated on the spot, so the
# check needs no download; the large catalogue makes the full softmax realistic.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-200}"
PY="${PYTHON:-.venv/bin/python}"
OUT="${OUT_DIR:-.cache/gpu_check}"
mkdir -p "$OUT" bench/results
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

common=(
  --config jobs/configs/smoke.yaml
  "data.synthetic.n_users=50000" "data.synthetic.n_items=100000" "data.synthetic.n_categories=2000"
  "train.prepared_dir=$OUT/data" "train.use_gpu=true" "train.num_workers=1" "train.cpus_per_worker=4"
  "train.epochs=100" "train.max_steps=$STEPS" "train.eval_batch_size=256" "train.early_stop_patience=null"
  "train.deepspeed.precision=bf16" "model.attn_implementation=sdpa"
)
"$PY" -m jobs.prepare --config jobs/configs/smoke.yaml "output_dir=$OUT/data" \
  "data.synthetic.n_users=50000" "data.synthetic.n_items=100000" "data.synthetic.n_categories=2000"

for size in base large; do
  for stage in 2 3; do
    batch=256; [ "$size" = large ] && batch=64
    echo "== $size ZeRO-$stage bf16 batch $batch"
    "$PY" -m jobs.train "${common[@]}" "output_dir=$OUT/$size-z$stage" "model.size=$size" \
      "train.batch_size=$batch" "train.deepspeed.zero_stage=$stage" 2>&1 | tail -n 30 \
      | tee "$OUT/$size-z$stage.log"
  done
done
"$PY" bench/gpu_report.py "$OUT" | tee "$OUT/report.txt"
