#!/usr/bin/env bash
# GPU path check: the `base` and `large` (>= 1B) models, bf16, DeepSpeed ZeRO-3 and ZeRO-2,
# a few hundred steps each on one GPU, through the same jobs.train code the CPU tests use:
# Ray Train worker on NCCL, DeepSpeed checkpoint per rank, consolidated serving export, test
# evaluation of the export in the driver. Records tokens/s, MFU and peak GPU memory in
# bench/results/gpu_check.json.
#
#   bash bench/gpu_check.sh [STEPS]        # on a machine with an NVIDIA GPU and CUDA torch
#
# Env: PYTHON (default .venv/bin/python, else python3), OUT_DIR (work dir, default
# .cache/gpu_check), PREPARED (an already prepared data dir; default: prepared here),
# RUN_TIMEOUT (seconds per run, default 1200), DEADLINE (unix time after which no run starts),
# RUNS (which of base-z3 large-z3 base-z2 large-z2, in that order by default; "" for none),
# TAOBAO (bench/gpu_taobao.py runs, default "z2-b256 z3-b256 z2-b512"; "" for none). For a
# 15-min lease: TAOBAO default, RUNS="" and DEADLINE=$(( $(date +%s) + 600 )).
# Data: a synthetic Taobao-schema log (60k users, 100k items) generated on the spot, so the
# check needs no download; the large catalogue makes the full softmax realistic.
set -uo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-200}"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
OUT="${OUT_DIR:-.cache/gpu_check}"
DEADLINE="${DEADLINE:-0}"
mkdir -p "$OUT" bench/results
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
# Taobao shape first (issue 13.3): the large model at 104k items, sampled softmax, bf16,
# ZeRO-2, fused AdamW, micro-batch 256 then 512 full-length rows: throughput and MFU
# (bench/gpu_taobao.py; no prepare, validation or export). TAOBAO="" skips it.
for spec in ${TAOBAO-z2-b256 z3-b256 z2-b512}; do
  if [ "$DEADLINE" -gt 0 ] && [ "$(date +%s)" -gt "$DEADLINE" ]; then
    echo "== taobao $spec skipped: past the deadline"
    continue
  fi
  stage="${spec%-b*}"
  batch="${spec#*-b}"
  echo "== taobao large ${stage}, batch $batch"
  timeout "${RUN_TIMEOUT:-1200}" "$PY" bench/gpu_taobao.py --zero "${stage#z}" --batch "$batch" \
    --out "$OUT" >"$OUT/taobao_large_${stage}_b${batch}.log" 2>&1
  rc=$?
  [ "$rc" = 124 ] && "$PY" -m ray.scripts.scripts stop --force >/dev/null 2>&1
  grep -E "tokens/s|Error|error:" "$OUT/taobao_large_${stage}_b${batch}.log" | cut -c1-400 | tail -n 4
  echo "   rc=$rc"
done
data=(data.synthetic.n_users=60000 data.synthetic.n_items=100000 data.synthetic.n_categories=2000)
DATA="${PREPARED:-$OUT/data}"
if [ -n "${RUNS-x}" ] && [ ! -f "$DATA/meta.json" ]; then
  "$PY" -m jobs.prepare --config jobs/configs/smoke.yaml "output_dir=$DATA" "${data[@]}" || exit 1
fi

common=(
  --config jobs/configs/smoke.yaml "${data[@]}" "ray.num_cpus=$(nproc)"
  "train.prepared_dir=$DATA" "train.use_gpu=true" "train.num_workers=1" "train.cpus_per_worker=4"
  "train.epochs=1" "train.max_steps=$STEPS" "train.batch_size=256" "train.warmup_steps=20"
  "train.eval_batch_size=256" "train.early_stop_patience=null"
  "train.deepspeed.precision=bf16" "model.attn_implementation=sdpa"
)
# ZeRO-3 first (the path that shards parameters), so a short lease still gets both sizes.
for run in ${RUNS-base-z3 large-z3 base-z2 large-z2}; do
  if [ "$DEADLINE" -gt 0 ] && [ "$(date +%s)" -gt "$DEADLINE" ]; then
    echo "== $run skipped: past the deadline"
    continue
  fi
  size="${run%-z*}"
  stage="${run#*-z}"
  dir="$OUT/$run"
  echo "== $run: model $size, ZeRO-$stage, bf16, batch 256, $STEPS steps; free disk $(df -h --output=avail "$OUT" | tail -1)"
  start=$(date +%s)
  timeout "${RUN_TIMEOUT:-1200}" "$PY" -m jobs.train "${common[@]}" "output_dir=$dir" \
    "model.size=$size" "train.deepspeed.zero_stage=$stage" >"$dir.log" 2>&1
  rc=$?
  # A timed-out driver leaves its local Ray (and the GPU memory its worker holds) behind.
  [ "$rc" = 124 ] && "$PY" -m ray.scripts.scripts stop --force >/dev/null 2>&1
  echo "{\"rc\": $rc, \"wall_s\": $(($(date +%s) - start))}" >"$dir.wall.json"
  grep -E "^\[train\]|Error|error:" "$dir.log" | cut -c1-400 | tail -n 8
  echo "   rc=$rc, $(($(date +%s) - start)) s"
  # Keep metrics and the model config; the DeepSpeed shards and weights (up to ~20 GB for
  # the 1B model) would fill the disk over four runs.
  rm -rf "$dir/ray" "$dir/export/model.safetensors"
done
"$PY" bench/gpu_report.py "$OUT" | tee "$OUT/report.txt"
