"""Export the project's own splits for RecBole (runs in the PROJECT venv, no Ray): Beauty by
default, any log with --config and a.b=value overrides (the file is still named beauty.inter:
RecBole's dataset name).

    .venv/bin/python bench/recbole/export_splits.py --config jobs/configs/beauty.yaml \
        --out outputs/recbole/beauty [--compare outputs/beauty/data] [data.path=... overrides]

1. Prepares the data with `rec.data.local.prepare_local` (the pure-polars path that
   tests/test_prepare_ray.py checks against the Ray job) into <out>/data, unless it is there.
2. `--compare DIR`: asserts that every split equals, row by row, an existing prepared
   directory (e.g. the Ray job's outputs/beauty/data).
3. Writes <out>/atomic/beauty/beauty.inter, RecBole's atomic file: each user's kept sequence
   (train items + valid target + test target, in the project's order) with the position as
   timestamp, so RecBole's leave-one-out split (`LS: valid_and_test`, order `TO`) rebuilds
   exactly the project's train / valid / test rows. Item tokens are the project's indices.
4. Writes <out>/eval.npz: per split the user ids, targets and padded histories (project item
   indices) the project evaluates on, plus the category table and train counts that
   `rec.metrics.RankingEvaluator` needs; run_sasrec.py scores RecBole's model against them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from jobs.config import RunConfig  # noqa: E402
from rec.config_loader import load_config  # noqa: E402
from rec.data.local import prepare_local  # noqa: E402
from rec.data.splits import load_item_tables  # noqa: E402

SPLITS = ("train", "valid", "test")


def read_split(prepared: Path, split: str) -> pl.DataFrame:
    return pl.read_parquet(prepared / split).sort("user_id")


def compare(prepared: Path, reference: Path) -> None:
    """Every split and the item vocabulary equal the reference directory's, row by row."""
    for split in SPLITS:
        mine, ref = read_split(prepared, split), read_split(reference, split)
        if not mine.equals(ref):
            raise SystemExit(f"compare: split {split!r} differs from {reference}")
    vocab = [
        pl.read_parquet(d / "vocab" / "items.parquet").sort("item_idx")
        for d in (prepared, reference)
    ]
    if not vocab[0].select("item_idx", "item_id").equals(vocab[1].select("item_idx", "item_id")):
        raise SystemExit(f"compare: item vocabulary differs from {reference}")
    print(f"[export] splits and vocabulary identical to {reference}")


def padded(lists: list[list[int]], width: int) -> np.ndarray:
    """Left-padded (B, width) int64 array of the last `width` items of each list."""
    out = np.zeros((len(lists), width), dtype=np.int64)
    for row, items in enumerate(lists):
        tail = items[-width:]
        if tail:
            out[row, width - len(tail) :] = tail
    return out


def write_atomic(train: pl.DataFrame, valid: pl.DataFrame, test: pl.DataFrame, path: Path) -> int:
    """beauty.inter with full sequences; checks the splits are consistent leave-last-out views."""
    seqs = train.select("user_id", "items").join(
        valid.select("user_id", pl.col("target_item").alias("v")), on="user_id"
    )
    seqs = seqs.join(test.select("user_id", pl.col("target_item").alias("t")), on="user_id")
    if not (seqs.height == train.height == valid.height == test.height):
        raise SystemExit("export: train/valid/test do not hold the same users")
    seqs = seqs.sort("user_id").with_columns(pl.concat_list("items", "v", "t").alias("seq"))
    rows = (
        seqs.select("user_id", "seq")
        .explode("seq")
        .with_columns(pl.int_range(pl.len()).over("user_id").alias("timestamp"))
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = rows.select(
        pl.col("user_id").cast(pl.Utf8).alias("user_id:token"),
        pl.col("seq").cast(pl.Utf8).alias("item_id:token"),
        pl.col("timestamp").cast(pl.Float64).alias("timestamp:float"),
    )
    frame.write_csv(path, separator="\t")
    return frame.height


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("overrides", nargs="*", help="a.b=value overrides of --config")
    ap.add_argument("--config", default=str(ROOT / "jobs/configs/beauty.yaml"))
    ap.add_argument("--out", default=str(ROOT / "outputs/recbole/beauty"))
    ap.add_argument("--compare", default=None, help="a prepared dir the splits must equal")
    args = ap.parse_args(argv)
    cfg = load_config(RunConfig, Path(args.config), args.overrides)
    out = Path(args.out)
    prepared = out / "data"
    if not (prepared / "meta.json").exists():
        stats = prepare_local(cfg.data, prepared)
        print(f"[export] prepared {stats['n_users']} users, {stats['n_items']} items -> {prepared}")
    if args.compare:
        compare(prepared, Path(args.compare))
    train, valid, test = (read_split(prepared, s) for s in SPLITS)
    n_rows = write_atomic(train, valid, test, out / "atomic" / "beauty" / "beauty.inter")
    tables = load_item_tables(prepared)
    max_len = cfg.data.max_len
    np.savez_compressed(
        out / "eval.npz",
        categories=tables.categories,
        train_counts=tables.train_counts,
        max_len=np.int64(max_len),
        **{f"{s}_users": f["user_id"].to_numpy() for s, f in (("valid", valid), ("test", test))},
        **{
            f"{s}_targets": f["target_item"].to_numpy().astype(np.int64)
            for s, f in (("valid", valid), ("test", test))
        },
        **{
            f"{s}_history": padded(f["items"].to_list(), max_len)
            for s, f in (("valid", valid), ("test", test))
        },
    )
    print(f"[export] {n_rows} interactions of {train.height} users -> {out / 'atomic'}; eval.npz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
