"""Summarise bench/gpu_check.sh runs: tokens/s, MFU and peak GPU memory per configuration.

    python bench/gpu_report.py .cache/gpu_check   # writes bench/results/gpu_check.json

MFU = achieved model FLOP/s / the GPU's dense bf16 peak, with training FLOPs per real token
~= 6 * backbone parameters + 6 * hidden * n_items (full-softmax output layer; K + 1 under
sampled softmax) + 12 * layers * hidden * mean context (attention scores), the usual 6N
accounting (Kaplan et al. 2020). bench/gpu_taobao.py's runs are listed from gpu_taobao.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core FLOP/s


def _current_export(run: Path) -> Path:
    """The export's current version (a published artefact root: CURRENT names it)."""
    current = run / "export" / "CURRENT"
    return run / "export" / (current.read_text().strip() if current.exists() else "missing")


def main(out: Path) -> None:
    gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "unknown"
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    names = {p.name for p in out.glob("*-z*") if p.is_dir()}
    names |= {p.name.removesuffix(".wall.json") for p in out.glob("*-z*.wall.json")}
    rows = [_run_row(out, out / name, peak) for name in sorted(names)]
    taobao_path = out / "gpu_taobao.json"  # bench/gpu_taobao.py's records, MFU included
    taobao = json.loads(taobao_path.read_text()) if taobao_path.exists() else []
    report = {"gpu": gpu, "peak_bf16_flops": peak, "runs": rows, "taobao": taobao}
    _print_table(gpu, rows)
    for r in taobao:
        mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        print(f"{r['run']:22} {r['tokens_per_s']:12,.0f} tokens/s  MFU {mfu}")
    Path("bench/results/gpu_check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))


def _run_row(out: Path, run: Path, peak: float | None) -> dict:
    """One run's throughput and MFU, or the reason it has none."""
    metrics_path = run / "metrics.json"
    wall_path = out / f"{run.name}.wall.json"
    wall = json.loads(wall_path.read_text()) if wall_path.exists() else {}
    config_path = _current_export(run) / "model_config.json"
    m = json.loads(metrics_path.read_text()) if metrics_path.exists() else None
    if m is None and config_path.exists():
        m = _from_log(out / f"{run.name}.log")  # cut after training (e.g. by a timeout)
    if m is None:
        return {"run": run.name, "error": f"no metrics (rc {wall.get('rc')}, see {run.name}.log)"}
    cfg = json.loads(config_path.read_text())
    hidden, layers, ffn = _arch(cfg)
    n_items = cfg["data"]["n_items"]
    sampled = _sampled_negatives(cfg)
    flops_token = flops_per_token(hidden, layers, ffn, n_items, sampled)
    # Steady: after the first batches (CUDA and allocator warm-up); whole: the epoch loop.
    tps = m.get("best.train_tokens_per_s_steady", m["best.train_tokens_per_s"])
    return {
        "run": run.name,
        "parameters": m["parameters"],
        "tokens_per_s": tps,
        "tokens_per_s_whole_loop": m["best.train_tokens_per_s"],
        "seq_per_s": m["best.train_seq_per_s"],
        "gpu_peak_mem_gb": m.get("best.gpu_peak_mem_gb"),
        "mfu": round(tps * flops_token / peak, 4) if peak else None,
        "steps": m["best.step"],
        "train_loop_s": m["best.train_seconds"],
        "job_wall_s": wall.get("wall_s"),
        "valid.ndcg@10": m.get("best.valid.ndcg@10"),
        "test.ndcg@10": m.get("test.ndcg@10"),
        "finished": metrics_path.exists(),  # False: the job stopped in its test evaluation
        "hidden": hidden,
        "layers": layers,
    }


def flops_per_token(
    hidden: int, layers: int, ffn: int, n_items: int, n_negatives: int | None = None
) -> int:
    """Training FLOPs per real token (6N accounting): backbone, the interest logits (every
    item under full softmax; the K shared negatives + the positive under sampled softmax, as
    that is all the step computes) and attention scores over a mean 25-token context."""
    backbone = layers * (4 * hidden**2 + 3 * hidden * ffn)  # attention projections + SwiGLU
    mean_context = 25  # half the 50-event window
    logits = n_items if n_negatives is None else n_negatives + 1
    return 6 * backbone + 6 * hidden * logits + 12 * layers * hidden * mean_context


def _sampled_negatives(cfg: dict) -> int | None:
    """K if the exported model trained with sampled softmax ("auto" resolved), else None."""
    from rec.model import DataDims, ModelConfig, resolve_interest_loss

    m, d = cfg["model"], cfg["data"]
    mode = m.get("interest_loss", "full")
    if mode == "auto":
        threshold = m.get("sampled_above_items", 100_000)
        probe = ModelConfig(interest_loss="auto", sampled_above_items=threshold)
        mode = resolve_interest_loss(probe, DataDims(n_items=d["n_items"], n_categories=1))
    return m.get("n_negatives", 1024) if mode == "sampled" else None


def _print_table(gpu: str, rows: list[dict]) -> None:
    print(f"GPU: {gpu}")
    print(f"{'run':12} {'params':>8} {'tokens/s':>10} {'MFU':>6} {'peak mem GB':>11} {'job s':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['run']:12} {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(
            f"{r['run']:12} {r['parameters'] / 1e6:7.0f}M {r['tokens_per_s']:10,.0f} {mfu:>6}"
            f" {r['gpu_peak_mem_gb']!s:>11} {r['job_wall_s']!s:>6}"
        )


def _from_log(log: Path) -> dict | None:
    """Training metrics of a job cut after its last epoch report, read from its log: the
    worker's `[train] {...}` line and the driver's parameter count, keyed as in metrics.json."""
    if not log.exists():
        return None
    report, params = None, None
    for line in log.read_text(errors="replace").splitlines():
        if "[train] {" in line:
            report = json.loads(line[line.index("[train] {") + len("[train] ") :])
        elif line.startswith("[train] ") and " parameters; " in line:
            params = int(line.split()[1].replace(",", ""))
    if report is None or params is None:
        return None
    return {"parameters": params, **{f"best.{k}": v for k, v in report.items()}}


def _arch(cfg: dict) -> tuple[int, int, int]:
    """(hidden, layers, ffn) of an exported model config."""
    from rec.model import SIZE_PRESETS

    m = cfg["model"]
    preset = SIZE_PRESETS[m["size"]]
    return (
        m["hidden_size"] or preset.hidden_size,
        m["n_layers"] or preset.n_layers,
        m["ffn_size"] or preset.ffn_size,
    )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/gpu_check"))
