"""The same preparation in one process with polars, no Ray: the baseline `bench/prepare.py`
measures the Ray pipeline against, and a reference the tests compare the Ray output with.

It holds the whole log in memory: fine for a laptop-sized log, not for 100M rows.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import polars as pl
import pyarrow as pa

from rec import artifacts, storage
from rec.data import outputs, readers, sequences
from rec.data.config import DataConfig


def prepare_local(cfg: DataConfig, output_dir: str | Path) -> dict:
    """Read, validate, clean, build vocabularies and sequences, write the splits; return stats."""
    out = storage.absolute(output_dir)
    outputs.reset_output(out)
    fmt = readers.get_format(cfg.format)
    if fmt.generate is not None:
        raw = cfg.path or storage.join(out, "raw")
        if not storage.glob(raw, "*.parquet"):
            _generate(fmt.generate, cfg, raw)
        cfg = replace(cfg, path=raw)
    plan = readers.plan(cfg)
    events, bad = [], []
    for chunk in plan.chunks:
        for ev, q in readers.read_chunk(chunk, cfg, plan.files):
            events.append(ev)
            bad.append(q)
    quarantine = pa.concat_tables(bad)
    if quarantine.num_rows:
        part = storage.join(out, "quarantine", "part-00000.parquet")
        storage.write_parquet(pl.from_arrow(quarantine), part)
    log = pl.from_arrow(pa.concat_tables(events))
    clean, info = sequences.clean_bucket(log, cfg.dedupe, cfg.min_user_events)
    stats = sequences.item_stats(clean)
    if cfg.kcore:
        stats = _kcore(clean, stats, cfg)
    items, cats = sequences.build_vocab(stats.sort("item_id"))
    outputs.write_vocab(out, items, cats)
    seqs = sequences.build_sequences(clean, items, cfg.max_len, cfg.min_events())
    for split, frame in sequences.split_views(seqs, cfg.max_len).items():
        storage.write_parquet(frame, storage.join(out, split, "part-00000.parquet"))
    info.pop("rows_in")
    stats = outputs.finish(out, cfg, log.height, info)
    # Sealed in place (tests and benches re-run it into one folder; jobs.prepare publishes
    # versions): readers verify it like a published version.
    artifacts.write_manifest(out, kind="prepared", producer="rec.data.local", config=cfg)
    return stats


def _generate(generate, cfg: DataConfig, raw: str) -> None:
    """The generator writes local files: into `raw` itself, or a temp dir uploaded to it."""
    if not storage.is_uri(raw):
        generate(cfg.synthetic, raw)
        return
    with tempfile.TemporaryDirectory() as tmp:
        generate(cfg.synthetic, tmp)
        storage.upload_dir(tmp, raw)


def _kcore(clean: pl.DataFrame, stats: pl.DataFrame, cfg: DataConfig) -> pl.DataFrame:
    items = stats.filter(pl.col("count") >= cfg.kcore)
    while True:
        counts = sequences.kcore_counts(clean, items, cfg.kcore, cfg.min_user_events)
        new = counts.filter(pl.col("count") >= cfg.kcore)
        if new.height == items.height == counts.height:
            return new
        items = new
