"""jobs.prepare end to end on a local Ray: same result as the single-process reference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from jobs import prepare as prepare_job
from jobs.config import RunConfig
from rec import artifacts, ray_prepare
from rec.config_loader import load_config
from rec.data.local import prepare_local
from rec.ray_dataset import BatchCollate, training_dataset
from tests.conftest import BEAUTY, ROOT, need

pytestmark = pytest.mark.ray  # every test here starts Ray (ray_local, or a job's own)


def frames(out):
    return {
        s: pl.read_parquet(out / s / "*.parquet").sort("user_id")
        for s in ("train", "valid", "test")
    }


def test_smoke_job_matches_local_reference(ray_local, tmp_path, monkeypatch):
    # One item part per bucket: the 100M-event path (partial item stats merged by item part on
    # workers, rec/ray_prepare.py: _item_stats) with several parts, at a small size.
    monkeypatch.setattr(ray_prepare, "BUCKETS_PER_ITEM_PART", 1)
    cfg = load_config(
        RunConfig,
        ROOT / "jobs/configs/smoke.yaml",
        [f"output_dir={tmp_path / 'ray'}", "data.num_buckets=3"],
    )
    stats = prepare_job.run(cfg)
    for key in (
        "rows_read",
        "rows_valid",
        "rows_quarantined",
        "n_users",
        "n_items",
        "n_categories",
        "n_interactions",
    ):
        assert key in stats
    assert stats["n_users"] > 100 and stats["rows_read"] == stats["rows_valid"]
    ref_cfg = load_config(
        RunConfig, ROOT / "jobs/configs/smoke.yaml", [f"data.path={tmp_path / 'ray' / 'raw'}"]
    )
    ref = prepare_local(ref_cfg.data, tmp_path / "local")
    for key in ("n_users", "n_items", "n_categories", "n_interactions", "duplicates_removed"):
        assert stats[key] == ref[key], key
    ray_out = Path(artifacts.verify(str(tmp_path / "ray")).path)  # the published version
    got, want = frames(ray_out), frames(tmp_path / "local")
    for split in want:
        assert got[split].equals(want[split]), split
    for name in ("items", "categories"):
        assert pl.read_parquet(ray_out / "vocab" / f"{name}.parquet").equals(
            pl.read_parquet(tmp_path / "local" / "vocab" / f"{name}.parquet")
        )
    assert not (ray_out / "_staging").exists()  # work dirs cleaned up
    assert {p.name for p in (tmp_path / "ray").iterdir()} == {"CURRENT", "raw", ray_out.name}

    # The training loader: padded examples through Ray Data -> typed tensor batches.
    ds = training_dataset(ray_out, "train")
    batch = next(iter(ds.iter_torch_batches(batch_size=8, collate_fn=BatchCollate())))
    assert batch.items.shape == (8, 50) and batch.targets.shape == (8, 50)
    assert (batch.targets[:, -1] > 0).all() and (batch.items[:, 0] == 0).any()


def test_beauty_kcore_matches_local(ray_local, tmp_path, monkeypatch):
    monkeypatch.setattr(ray_prepare, "BUCKETS_PER_ITEM_PART", 3)  # 3 item parts of 8 buckets
    over = [f"output_dir={tmp_path / 'ray'}", f"data.path={need(BEAUTY)}", "data.kcore=10"]
    stats = prepare_job.run(load_config(RunConfig, ROOT / "jobs/configs/beauty.yaml", over))
    ref_cfg = load_config(RunConfig, ROOT / "jobs/configs/beauty.yaml", over[1:])
    ref = prepare_local(ref_cfg.data, tmp_path / "local")
    assert (stats["n_users"], stats["n_items"], stats["n_interactions"]) == (
        ref["n_users"],
        ref["n_items"],
        ref["n_interactions"],
    )
    assert stats["n_items"] < 12101
    ray_out = Path(artifacts.resolve(str(tmp_path / "ray")))
    assert pl.read_parquet(ray_out / "vocab" / "items.parquet").equals(
        pl.read_parquet(tmp_path / "local" / "vocab" / "items.parquet")
    )
    test = pl.read_parquet(ray_out / "test" / "*.parquet")
    assert (test["n_events"] >= 10).all()


def test_bad_file_is_one_clear_message(tmp_path):
    """A truncated gzip found inside a Ray task reaches the user as one line, exit code 2."""
    import gzip

    rows = "\n".join(f"{u},{u},1,pv,1511600000" for u in range(50000)) + "\n"
    data = gzip.compress(rows.encode())
    (tmp_path / "cut.csv.gz").write_bytes(data[: len(data) // 2])
    cmd = [
        sys.executable,
        "-m",
        "jobs.prepare",
        "--config",
        "jobs/configs/taobao.yaml",
        f"data.path={tmp_path / 'cut.csv.gz'}",
        f"output_dir={tmp_path / 'out'}",
        "ray.num_cpus=1",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: " in proc.stderr and "truncated gzip" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.prepare",
            "--config",
            "jobs/configs/taobao.yaml",
            "data.max_len=0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "data.max_len" in bad.stderr and "Traceback" not in bad.stderr
