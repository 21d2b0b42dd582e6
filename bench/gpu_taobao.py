"""GPU: training throughput and MFU of the large model on a Taobao-shaped catalogue (issue 13.3).

    python bench/gpu_taobao.py --zero 2 --batch 256        # one GPU (bench/gpu_check.sh runs it)
    python bench/gpu_taobao.py --dry                       # CPU, tiny model: the code path only

Ray Train + DeepSpeed on one GPU worker, through bench/scale_train.py's step loop (the training
job's model, engine and length batching; no validation, checkpoint or export, so the lease's
minutes go to steps). Data: Taobao's shape at --items (default 104,050 = Taobao's 4.16M items
at scale 0.025, above the 100k sampled-softmax threshold): histories mostly at the 50-event
window, Zipf item popularity. Tuned for throughput: bf16, sampled softmax with logQ (2,048
shared negatives instead of a (positions x items) logit matrix), ZeRO-2 (one GPU: nothing to
partition, ZeRO-3 would only add gathers), torch's fused AdamW (rec/deepspeed_setup.py), a
micro-batch of --batch full-length sequences (~49 tokens each: the last lease's Beauty-shaped
synthetic rows had ~20, 5k tokens per step against the optimizer's fixed cost), and no host
sync inside the timed steps beyond the model's own data-dependent shapes.

Prints and writes <out>/gpu_taobao.json: tokens/s, step seconds, peak GPU memory and MFU
(bench/gpu_report.py: flops_per_token, counting the K sampled negatives, not the catalogue).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_report import PEAK_BF16, flops_per_token  # noqa: E402
from bench.scale_train import scale_configs, train_point  # noqa: E402


def gpu_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "none"
    except (OSError, subprocess.SubprocessError):
        return "none"


def overrides(args: argparse.Namespace) -> list[str]:
    """Config overrides of taobao_scale.yaml for this run (--dry: the tiny model on CPU)."""
    if args.dry:
        tiny = ["model.size=tiny", "model.interest_loss=sampled", "train.batch_size=8"]
        return [*tiny, "train.num_workers=1"]
    return [
        f"model.size={args.size}",
        "model.interest_loss=sampled",
        "model.attn_implementation=sdpa",
        "train.use_gpu=true",
        "train.num_workers=1",
        "train.cpus_per_worker=4",
        f"train.batch_size={args.batch}",
        "train.deepspeed.precision=bf16",
    ]


def run(args: argparse.Namespace) -> dict:
    extra = overrides(args)
    model_cfg, _ = scale_configs(extra)
    rec = train_point(args.items, args.zero, args.steps, args.warmup, extra)
    arch = model_cfg.architecture()
    flops = flops_per_token(
        arch.hidden_size, arch.n_layers, arch.ffn_size, args.items, model_cfg.n_negatives
    )
    gpu = gpu_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    rec |= {
        "run": f"taobao-{model_cfg.size}-z{args.zero}-b{rec['batch_size']}",
        "gpu": gpu,
        "size": model_cfg.size,
        "flops_per_token": flops,
        "mfu": round(rec["tokens_per_s"] * flops / peak, 4) if peak else None,
    }
    return rec


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="large")
    parser.add_argument("--items", type=int, default=104_050)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / ".cache" / "gpu_check"))
    parser.add_argument("--dry", action="store_true", help="CPU, tiny model, a few steps")
    args = parser.parse_args()
    if args.dry:
        args.items, args.steps, args.warmup = min(args.items, 3000), 3, 1
    rec = run(args)
    mfu = "n/a" if rec["mfu"] is None else f"{100 * rec['mfu']:.1f}%"
    print(
        f"{rec['run']}: {rec['tokens_per_s']:,.0f} tokens/s, {rec['seconds']:.3f} s/step, "
        f"MFU {mfu}, peak GPU {rec.get('gpu_peak_mem_gb')} GB ({rec['gpu']})",
        flush=True,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_taobao.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps([*runs, rec], indent=2))
    print("RESULT " + json.dumps(rec))


if __name__ == "__main__":
    main()
