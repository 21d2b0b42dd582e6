"""Sampled versus full softmax at ~100k items, where both fit (issue 13.3).

    flock /tmp/ray.lock timeout 480 python bench/scale_quality.py --steps 150

The Taobao-shaped synthetic log (rec/data/synthetic.py: users with preferred categories,
sessions, Zipf items) at the scale that gives ~100k items; each user's last event is the test
target, the 50 events before it the history, everything before that the training sequences
(one row per user, its last 51 training events). The tiny model of taobao_scale.yaml is
trained twice in this process, from the same seed on the same batches, once with
`model.interest_loss=full` and once with `sampled` (logQ-corrected, n_negatives from the
config); both are then ranked over the full catalogue (rec/evaluation.py) for the same seeded
sample of test users. One process, no Ray: only the loss differs between the two runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.scale_train import emit_records, peak_rss_mb, scale_configs  # noqa: E402

TAOBAO_ITEMS = 4_162_024
ITEMS_SEEN = 1.6  # catalogue / items the log reaches (Zipf tails stay unseen)


def taobao_like(n_items: int, max_len: int = 50, seed: int = 0) -> dict:
    """Synthetic log at ~n_items items -> train/test arrays and the item tables
    (items that never occur are dropped, so the catalogue is the items seen)."""
    import polars as pl

    from jobs.config import RunConfig
    from rec.config_loader import load_config
    from rec.data.batch import left_pad
    from rec.data.schema import BEHAVIOR_TOKENS
    from rec.data.synthetic import iter_chunks

    syn = load_config(RunConfig, str(ROOT / "jobs/configs/taobao_scale.yaml"), []).data.synthetic
    syn.scale, syn.seed = ITEMS_SEEN * n_items / TAOBAO_ITEMS, seed
    # Page views only, a re-view of the item just viewed dropped: cart/fav/buy follow their pv
    # of the same item, so with them (or re-views) the next item is mostly the last one and the
    # comparison would measure the repeat logit, not the softmax over the catalogue.
    log = pl.concat([pl.from_arrow(t) for t in iter_chunks(syn)]).filter(
        pl.col("behavior_type") == "pv"
    )
    log = log.sort("user_id", "timestamp").filter(
        (pl.col("item_id") != pl.col("item_id").shift(1))
        | (pl.col("user_id") != pl.col("user_id").shift(1))
    )
    log = log.with_columns(pl.col("item_id").rank("dense").cast(pl.Int64).alias("idx"))
    cats = log.group_by("idx").agg(pl.col("category_id").first()).sort("idx")
    n = int(log["idx"].max())
    cat_idx = cats["category_id"].rank("dense").cast(pl.Int64).to_numpy()
    categories = np.zeros((n + 1, 1), dtype=np.int64)
    categories[cats["idx"].to_numpy(), 0] = cat_idx
    beh = log["behavior_type"].replace_strict(BEHAVIOR_TOKENS, return_dtype=pl.Int64)
    seqs = (
        log.with_columns(beh.alias("b"))
        .sort("user_id", "timestamp")
        .group_by("user_id", maintain_order=True)
        .agg("idx", "b")
        .filter(pl.col("idx").list.len() >= 3)
    )
    items = [np.asarray(x) for x in seqs["idx"].to_list()]
    behs = [np.asarray(x) for x in seqs["b"].to_list()]
    train = [x[:-1][-(max_len + 1) :] for x in items]
    counts = np.bincount(np.concatenate([x[:-1] for x in items]), minlength=n + 1)
    return {
        "n_items": n,
        "events": log.height,
        "categories": categories,
        "counts": counts,
        "train": left_pad(train, max_len + 1),
        "train_beh": left_pad([b[:-1][-(max_len + 1) :] for b in behs], max_len + 1),
        "test_hist": left_pad([x[:-1][-max_len:] for x in items], max_len),
        "test_beh": left_pad([b[:-1][-max_len:] for b in behs], max_len),
        "test_target": np.array([x[-1] for x in items]),
    }


def _train_batch(data: dict):
    import torch

    from rec.data.batch import Batch

    seqs, beh = data["train"], data["train_beh"]
    inside = seqs[:, :-1] > 0
    t = torch.as_tensor
    return Batch(
        items=t(seqs[:, :-1]),
        behaviors=t(beh[:, :-1]),
        gaps=t(inside.astype(np.int64)),
        targets=t(seqs[:, 1:] * inside),
        target_behaviors=t(beh[:, 1:] * inside),
    )


def _test_batch(data: dict, users: np.ndarray):
    import torch

    from rec.data.batch import Batch

    items = data["test_hist"][users]
    targets = np.zeros_like(items)
    targets[:, -1] = data["test_target"][users]
    t = torch.as_tensor
    return Batch(
        t(items),
        t(data["test_beh"][users]),
        t((items > 0).astype(np.int64)),
        t(targets),
        t((targets > 0) * 1),
    )


def run_loss(data: dict, loss: str, steps: int, batch_size: int, users: np.ndarray) -> dict:
    """Train the tiny model with one interest loss, then rank the test users' targets."""
    import torch

    from bench.scale_train import build_model
    from rec.data.batch import length_batches
    from rec.data.splits import ItemTables
    from rec.evaluation import evaluate

    model_cfg, train_cfg = scale_configs([f"model.interest_loss={loss}"])
    torch.manual_seed(0)
    model = build_model(model_cfg, data["n_items"], data["counts"])
    model.model.item_categories.copy_(torch.as_tensor(data["categories"]))
    opt = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr)
    rows, rng = _train_batch(data), np.random.default_rng(0)
    t0, done = time.perf_counter(), 0
    while done < steps:
        for _, batch in length_batches(rows, batch_size, rng, 8 * batch_size):
            torch.manual_seed(done)  # the same dropout and negatives draws in both runs
            total, _ = model.loss(batch)
            opt.zero_grad()
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            done += 1
            if done == steps:
                break
    train_s = time.perf_counter() - t0
    model.eval()
    tables = ItemTables(data["categories"], data["counts"], {})
    metrics = evaluate(model, length_batches(_test_batch(data, users), 256), tables, "test")
    return {
        "stage": "quality",
        "items": data["n_items"],
        "interest_loss": loss,
        "steps": steps,
        "batch_size": batch_size,
        "train_seconds": round(train_s, 1),
        "seconds": round(train_s / steps, 3),
        "users": len(users),
        "ndcg@10": round(metrics["test.ndcg@10"], 5),
        "recall@10": round(metrics["test.recall@10"], 5),
        "peak_rss_mb": peak_rss_mb(),
    }


def quality(
    n_items: int = 100_000, steps: int = 150, batch_size: int = 64, users: int = 2000
) -> list[dict]:
    """Full and sampled softmax on the same data, steps and seeds -> two records."""
    import torch

    torch.set_num_threads(2)
    data = taobao_like(n_items)
    sample = np.sort(
        np.random.default_rng(0).choice(len(data["test_target"]), users, replace=False)
    )
    return [run_loss(data, loss, steps, batch_size, sample) for loss in ("full", "sampled")]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--out", help="append the records (JSON lines) to this file")
    args = parser.parse_args()
    records = quality(args.items, args.steps, args.batch, args.users)
    emit_records(records, args.out)


if __name__ == "__main__":
    main()
