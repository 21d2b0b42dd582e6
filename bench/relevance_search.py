"""Relevance search (issue 19.1): train the project's model in ONE process, no Ray, one thread.

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python bench/relevance_search.py --tag baseline \
        [--config jobs/configs/beauty.yaml] [--prepared DIR] [--ema 0.995] [--max-minutes M] \
        [model.x=... train.y=...]
    .venv/bin/python bench/relevance_search.py --table    # the results as a markdown table
    ... --tag T --save DIR [overrides]                    # also keep the best weights
    .venv/bin/python bench/relevance_search.py --ensemble T1,T2 --save DIR   # mean logits

Beauty with beauty.yaml as of 2026-11-29 (one thread): ~15-17 min on a quiet machine, valid
NDCG@10 0.0669, test 0.0525, test_unseen 0.0543; with its `model.aux_detach: true` of 2026-11-30
(seed 0): 0.0679, 0.0549, 0.0572 (bench/README.md "Relevance search").

Why not `jobs.train`: it holds Ray and both cores, so a search with it would block everybody.
This harness trains the same `Recommender` (rec/recommender.py: network, heads, multi-task loss)
on the same prepared splits, with the same optimiser and schedule as the Ray job (AdamW,
`rec.schedule.lr_lambda` over the job's steps per epoch, gradient clipping as
`train.deepspeed.gradient_clipping`), the same seeded batch order and per-batch seeds
(`rec.resume`), the same length-bucketed batches (`rec.data.batch.length_batches`) and the same
full-ranking evaluation (`rec.evaluation.evaluate`). Differences from jobs.train: one process
with the global batch (`train.batch_size * train.num_workers`, 256 for beauty.yaml) instead of
two DeepSpeed ranks of 128 (the job averages two per-rank mean losses; here one mean over the
batch's positions), and the best epoch is kept in memory and tested directly (the job tests
the serving export of the best checkpoint: the same weights).

The best epoch is chosen on valid NDCG@10 only; test metrics are computed once, for that
epoch. With `--ema D` an exponential moving average of the weights (decay D per step) is
validated too, every epoch, beside the raw weights: it does not change training, so raw and
EMA come from the same run. One JSON line per run is appended to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safetensors.torch import load_file, save_file  # noqa: E402

from jobs.config import RunConfig  # noqa: E402
from jobs.training import model_for_data  # noqa: E402  (imports Ray Train, starts no Ray)
from rec import artifacts, storage  # noqa: E402
from rec.config_loader import from_dict, load_config  # noqa: E402
from rec.data.batch import Batch, collate, length_batches  # noqa: E402
from rec.data.splits import ItemTables, load_examples, load_item_tables  # noqa: E402
from rec.ensemble import tower_clip, weight_decay_groups  # noqa: E402
from rec.evaluation import evaluate  # noqa: E402
from rec.model import ModelConfig, count_parameters  # noqa: E402
from rec.recommender import Recommender, build_recommender  # noqa: E402
from rec.resume import batch_seed, epoch_batches  # noqa: E402
from rec.schedule import lr_lambda  # noqa: E402
from rec.train import count_steps_per_epoch  # noqa: E402

SCORE = "valid.ndcg@10"
DEFAULT_PREPARED = ROOT / "outputs" / "beauty6" / "data"
KEEP = ("ndcg@10", "recall@10", "ndcg@20", "recall@20", "mrr")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("overrides", nargs="*", help="a.b=value overrides of the run config")
    p.add_argument("--config", default=str(ROOT / "jobs" / "configs" / "beauty.yaml"))
    p.add_argument("--prepared", default=str(DEFAULT_PREPARED), help="prepared splits")
    p.add_argument("--tag", help="name of this run in the results (required to train)")
    p.add_argument("--table", action="store_true", help="print --out as a markdown table, exit")
    p.add_argument("--ema", type=float, default=None, help="also validate an EMA of weights")
    p.add_argument("--ema-from", type=int, default=1, help="validate the EMA from this epoch")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop training after the epoch that ends past this",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--save", default=None, help="write the best raw weights to DIR/<tag>.safetensors"
    )
    p.add_argument(
        "--ensemble",
        default=None,
        help="TAG,TAG,..: score the mean of these saved runs' logits (no training)",
    )
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "relevance_search.jsonl"))
    return p.parse_args(argv)


class Ema:
    """Exponential moving average of a model's floating-point parameters (a shadow copy)."""

    def __init__(self, model: Recommender, decay: float) -> None:
        self.decay, self.model = decay, model
        self.shadow = copy.deepcopy(model)
        for p in self.shadow.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow.parameters(), self.model.parameters(), strict=True):
            s.lerp_(p.detach(), 1.0 - self.decay)


def validate(model: Recommender, valid: Batch, tables: ItemTables, bs: int) -> dict[str, float]:
    return evaluate(model, length_batches(valid, bs), tables, "valid")


def train_epoch(model, opt, sched, rows: Batch, cfg, epoch: int, ema: Ema | None) -> dict:
    """One epoch in the job's batch order; returns mean losses."""
    tc = cfg.train
    global_batch = tc.batch_size * tc.num_workers
    bucket = global_batch * tc.length_buckets
    towers = cfg.model.members if cfg.model.tower_orders else 0  # as rec/train.py
    batches = epoch_batches(rows, global_batch, tc.seed, epoch, bucket, towers)
    clip = tower_clip(tc.deepspeed.gradient_clipping, cfg.model.members)  # as rec/train.py
    model.train()
    sums: dict[str, float] = {}
    n = 0
    for k, (_, batch) in enumerate(batches):
        torch.manual_seed(batch_seed(tc.seed, 0, epoch, k))  # dropout, negatives
        loss, logs = model(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update()
        for key, v in logs.items():
            sums[key] = sums.get(key, 0.0) + v
        n += 1
    return {f"train.{k}": v / max(1, n) for k, v in sums.items()}


def load(args: argparse.Namespace):
    """Run config, item tables and the train/valid/test rows of the prepared splits."""
    cfg = load_config(RunConfig, args.config, args.overrides)
    prepared = artifacts.resolve(str(args.prepared))
    meta = json.loads(storage.read_text(storage.join(prepared, "meta.json")))
    cfg = replace(cfg, model=model_for_data(cfg.model, meta))
    tables = load_item_tables(prepared)
    splits = ("train", "valid", "test")
    rows = {s: collate(load_examples(prepared, s, cfg.model.max_len)) for s in splits}
    return cfg, tables, rows, count_steps_per_epoch(prepared, cfg.train)


def fit(
    cfg,
    tables: ItemTables,
    rows: dict,
    steps: int,
    ema_decay: float | None,
    ema_from: int = 1,
    max_minutes: float | None = None,
) -> tuple[dict, list, dict]:
    """Train with per-epoch validation and early stopping (as rec/train.py) -> (best per
    variant: epoch, valid metrics, weights; per-epoch history; the variants' models)."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    model = build_recommender(cfg.model, tables)
    params = weight_decay_groups(model, list(model.parameters()))  # model.tower_weight_decay
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    schedule = lr_lambda(tc, steps)  # the job's steps per epoch: the same LR at every step
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    ema = Ema(model, ema_decay) if ema_decay else None
    variants = {"raw": model} | ({"ema": ema.shadow} if ema else {})
    best = {v: {"score": float("-inf"), "epoch": 0, "state": None, "valid": {}} for v in variants}
    history, bad, t0 = [], 0, time.perf_counter()
    for epoch in range(tc.epochs):
        te = time.perf_counter()
        logs = train_epoch(model, opt, sched, rows["train"], cfg, epoch, ema)
        entry = {"epoch": epoch + 1, "train_s": round(time.perf_counter() - te, 1), **logs}
        for name, m in variants.items():
            if name == "ema" and epoch + 1 < ema_from:  # its early epochs never win: save time
                continue
            valid = validate(m, rows["valid"], tables, tc.eval_batch_size)
            entry[f"{name}.{SCORE}"] = valid[SCORE]
            if valid[SCORE] > best[name]["score"]:
                state = copy.deepcopy(m.state_dict())
                best[name] = {"score": valid[SCORE], "epoch": epoch + 1, "state": state}
                best[name]["valid"] = valid
        bad = 0 if best["raw"]["epoch"] == epoch + 1 else bad + 1
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        history.append(entry)
        rounded = {k: round(v, 5) if isinstance(v, float) else v for k, v in entry.items()}
        print(json.dumps(rounded), flush=True)
        patience = tc.early_stop_patience
        # With an EMA, stop only once neither variant has improved for `patience` epochs.
        stale = ema is None or epoch + 1 - best["ema"]["epoch"] > (patience or 0)
        if patience is not None and bad > patience and stale:
            break
        if max_minutes is not None and entry["seconds"] > 60 * max_minutes:
            entry["stopped"] = "max_minutes"  # a shared machine's budget, not convergence
            break
    return best, history, variants


def run(args: argparse.Namespace) -> dict:
    """One run: train, select the best epoch on valid NDCG@10, test it, append the record."""
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cfg, tables, rows, steps = load(args)
    best, history, variants = fit(
        cfg, tables, rows, steps, args.ema, args.ema_from, args.max_minutes
    )
    record = {
        "tag": args.tag,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "overrides": args.overrides,
        "seed": cfg.train.seed,
        "ema_decay": args.ema,
        "ema_from": args.ema_from,
        "max_minutes": args.max_minutes,
        "threads": args.threads,
        "epochs_run": len(history),
        "train_minutes": round(history[-1]["seconds"] / 60, 2),
        "parameters": count_parameters(variants["raw"]),
        "loadavg_end": os.getloadavg()[0],
    }
    for name, m in variants.items():
        m.load_state_dict(best[name]["state"])
        if args.save and name == "raw":
            Path(args.save).mkdir(parents=True, exist_ok=True)
            save_file(m.state_dict(), str(Path(args.save) / f"{args.tag}.safetensors"))
        test = evaluate(m, length_batches(rows["test"], cfg.train.eval_batch_size), tables, "test")
        scores = best[name]["valid"] | test
        record[name] = {"best_epoch": best[name]["epoch"]} | {
            f"{split}.{k}": scores[f"{split}.{k}"]
            for split in ("valid", "valid_unseen", "test", "test_unseen")
            for k in KEEP
        }
    record["minutes"] = round((time.perf_counter() - t0) / 60, 2)
    record["model"] = asdict(cfg.model)
    record["train"] = {k: v for k, v in asdict(cfg.train).items() if k != "tracking"}
    record["history"] = history
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    summary = {n: {k: round(v, 5) for k, v in record[n].items() if "@10" in k} for n in variants}
    print(json.dumps({"tag": args.tag, "minutes": record["minutes"], **summary}, indent=1))
    return record


class Ensemble(torch.nn.Module):
    """Mean of members' next-item logits. For dot-product members this is itself one
    dot-product model: [h_1 .. h_K] . [e_1 .. e_K] / K (the repeat logits averaged too)."""

    def __init__(self, members: list[Recommender]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    @torch.no_grad()
    def score_next(self, batch: Batch) -> torch.Tensor:
        return torch.stack([m.score_next(batch) for m in self.members]).mean(0)


def ensemble(args: argparse.Namespace) -> dict:
    """Valid and test metrics of the mean logits of saved runs (`--save` of each tag)."""
    torch.set_num_threads(args.threads)
    tags = args.ensemble.split(",")
    records = {}
    for line in Path(args.out).read_text().splitlines():
        r = json.loads(line)
        if r["tag"] in tags and r.get("kind") != "ensemble":
            records[r["tag"]] = r  # the last record of a tag wins
    missing = [t for t in tags if t not in records]
    if missing:
        raise SystemExit(f"--ensemble: no record for {missing} in {args.out}")
    cfg, tables, rows, _ = load(args)
    members = []
    for tag in tags:
        # The member's model is rebuilt from the config its record saved (older records: from
        # --config plus that run's overrides, which breaks once the config has moved on).
        saved = records[tag].get("model")
        member = (
            from_dict(ModelConfig, saved)
            if saved
            else load_config(RunConfig, args.config, records[tag]["overrides"]).model
        )
        model = build_recommender(model_for_data(member, tables.meta), tables)
        model.load_state_dict(load_file(str(Path(args.save) / f"{tag}.safetensors")))
        members.append(model.eval())
    ens = Ensemble(members)
    bs = cfg.train.eval_batch_size
    scores = evaluate(ens, length_batches(rows["valid"], bs), tables, "valid")
    scores |= evaluate(ens, length_batches(rows["test"], bs), tables, "test")
    record = {
        "tag": args.tag or "ens_" + "+".join(tags),
        "kind": "ensemble",
        "members": tags,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "overrides": [f"ensemble of {' '.join(tags)}"],
        "seed": [records[t]["seed"] for t in tags],
        "epochs_run": 0,
        "minutes": 0.0,
        "raw": {"best_epoch": 0}
        | {
            f"{split}.{k}": scores[f"{split}.{k}"]
            for split in ("valid", "valid_unseen", "test", "test_unseen")
            for k in KEEP
        },
    }
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps({k: round(v, 5) for k, v in record["raw"].items() if "@10" in k}, indent=1))
    return record


def table(path: str) -> str:
    """The results file as markdown: one row per run and weights variant (raw, ema)."""
    cols = [f"{s}.{k}" for s in ("valid", "test", "test_unseen") for k in ("ndcg@10", "recall@10")]
    lines = [
        "| run | overrides | seed | variant | best epoch / run | " + " | ".join(cols) + " | min |",
        "|---" * (6 + len(cols)) + "|",
    ]
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        for name in ("raw", "ema"):
            if not isinstance(r.get(name), dict):  # no EMA in this run
                continue
            v = r[name]
            cells = " | ".join(f"{v[c]:.4f}" for c in cols)
            over = " ".join(r["overrides"]) or "(beauty.yaml)"
            epochs = f"{v['best_epoch']} / {r['epochs_run']}"
            lines.append(
                f"| {r['tag']} | {over} | {r['seed']} | {name} | {epochs} | {cells} | "
                f"{r['minutes']:.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.table:
        print(table(args.out))
        return 0
    if args.ensemble:
        if not args.save:
            raise SystemExit("--ensemble reads the members' weights from --save DIR")
        ensemble(args)
        return 0
    if not args.tag:
        raise SystemExit("--tag is required to train")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
