"""Quarantine end to end through Ray (rec/ray_prepare.py): every bad row lands in
quarantine/ with its source file, byte offset, raw text and reason; stats.json counts them by
reason; MovieLens ratings outside 1..5 are `bad_rating`; k-core on Ray equals the reference."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from rec.data.config import DataConfig
from rec.data.local import prepare_local
from tests.data_fixtures import (
    KCORE_COUNTS,
    TAOBAO_HI,
    TAOBAO_LO,
    write_kcore_log,
    write_movielens,
)

pytestmark = pytest.mark.ray

# 40 good rows: 8 users with 5 events each (enough to split); then the bad lines and reasons
GOOD = [f"{n % 8},{10 + n % 7},{100 + n % 3},pv,{TAOBAO_LO + 60 * n}" for n in range(40)]
BAD = [
    ("1,10,100,pv,12x", "bad_number"),
    ("1,10,pv,1511600000", "field_count"),
    ("1,10,100,pv,1511600000,extra", "field_count"),
    ("1,,100,pv,1511600000", "missing_field"),
    ("1,10,100,click,1511600000", "unknown_behavior"),
    (f"2,10,100,pv,{TAOBAO_HI}", "timestamp_out_of_window"),
    (f"3,10,100,buy,{TAOBAO_LO - 1}", "timestamp_out_of_window"),
]


def expected_rows(lines: list[str], reasons: dict[str, str], source: str) -> set[tuple]:
    """(source, byte offset, raw, reason) of every bad line of the file."""
    rows, offset = set(), 0
    for line in lines:
        if line in reasons:
            rows.add((source, offset, line, reasons[line]))
        offset += len(line) + 1
    return rows


def current(root: Path) -> Path:
    """The version of an artefact root that CURRENT names (rec/artifacts.py)."""
    from rec import artifacts

    return Path(artifacts.resolve(str(root)))


def test_taobao_quarantine_columns_and_counts(ray_local, tmp_path):
    from rec.ray_prepare import prepare

    lines = GOOD[:20] + [b for b, _ in BAD] + GOOD[20:]
    path = tmp_path / "UserBehavior.csv"
    path.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(
        format="taobao",
        path=str(path),
        min_timestamp=TAOBAO_LO,
        max_timestamp=TAOBAO_HI,
        chunk_mb=1,
        num_buckets=2,
    )
    out = tmp_path / "out"
    stats = prepare(cfg, out)
    out = current(out)  # the version prepare published
    got = pl.read_parquet(out / "quarantine" / "*.parquet")
    assert got.columns == ["source", "offset", "raw", "reason"]
    assert set(got.iter_rows()) == expected_rows(lines, dict(BAD), str(path))
    want_counts = {}
    for _, reason in BAD:
        want_counts[reason] = want_counts.get(reason, 0) + 1
    by_reason = {k: v for k, v in stats["quarantined_by_reason"].items() if v}
    assert by_reason == want_counts
    assert (stats["rows_read"], stats["rows_valid"], stats["rows_quarantined"]) == (
        len(lines),
        len(GOOD),
        len(BAD),
    )
    assert json.loads((out / "stats.json").read_text()) == stats
    ref = prepare_local(cfg, tmp_path / "local")  # the single-process reference agrees
    assert ref["quarantined_by_reason"] == stats["quarantined_by_reason"]


def test_movielens_bad_rating_and_kcore_through_ray(ray_local, tmp_path):
    from rec.ray_prepare import prepare

    source = write_movielens(tmp_path, tarball=True)
    stats = prepare(DataConfig(format="movielens", path=str(source)), tmp_path / "ml")
    got = pl.read_parquet(current(tmp_path / "ml") / "quarantine" / "*.parquet")
    assert got.select("source", "raw", "reason").rows() == [
        (str(source), "2\t3\t6\t881250961", "bad_rating")
    ]
    assert stats["quarantined_by_reason"]["bad_rating"] == stats["rows_quarantined"] == 1

    log = write_kcore_log(tmp_path / "kcore.csv")
    cfg = DataConfig(format="taobao", path=str(log), kcore=2, num_buckets=2)
    stats = prepare(cfg, tmp_path / "kc")
    items = pl.read_parquet(current(tmp_path / "kc") / "vocab" / "items.parquet")
    assert dict(zip(items["item_id"], items["count"], strict=True)) == KCORE_COUNTS
    assert (stats["n_users"], stats["n_items"]) == (2, 3)
