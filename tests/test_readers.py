"""Readers on the real files and on malformed input (no Ray: the pure reading path)."""

from __future__ import annotations

import gzip
import json
from dataclasses import replace

import polars as pl
import pytest

from rec.data.config import DataConfig
from rec.data.local import prepare_local
from rec.data.readers import FORMATS, Format, plan, read_chunk, register
from rec.data.textio import DataError, plan_text_chunks
from tests.conftest import BEAUTY, MOVIELENS, TAOBAO, need


def read_all(cfg: DataConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    p = plan(cfg)
    ev, bad = [], []
    for chunk in p.chunks:
        for e, q in read_chunk(chunk, cfg, p.files):
            ev.append(pl.from_arrow(e))
            bad.append(pl.from_arrow(q))
    return pl.concat(ev), pl.concat(bad)


def test_amazon_beauty_counts_as_published(tmp_path):
    stats = prepare_local(DataConfig(format="amazon", path=str(need(BEAUTY))), tmp_path)
    assert (stats["n_users"], stats["n_items"], stats["n_interactions"]) == (22363, 12101, 198502)
    assert stats["n_categories"] == 637 and stats["rows_quarantined"] == 0
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["timestamp_kind"] == "position" and not meta["has_engaged_behaviors"]
    assert meta["request_behavior"] == "review"  # what serving gives request history events


def test_taobao_slice_counts():
    events, bad = read_all(DataConfig(format="taobao", path=str(need(TAOBAO))))
    assert events.height == 10000 and bad.height == 0
    assert events["user_id"].n_unique() == 114
    assert events["item_id"].n_unique() == 7623
    assert events["category_ids"].explode().n_unique() == 1096
    assert set(events["behavior"].unique()) == {"pv", "cart", "fav", "buy"}


def test_taobao_window_quarantines_outliers():
    cfg = DataConfig(
        format="taobao",
        path=str(need(TAOBAO)),
        min_timestamp="2017-11-24T16:00:00",
        max_timestamp=1512316800,
    )
    events, bad = read_all(cfg)
    assert events.height + bad.height == 10000
    assert bad.height > 0 and set(bad["reason"]) == {"timestamp_out_of_window"}
    assert events["timestamp"].min() >= 1511539200


def test_movielens_counts_from_tarball():
    events, bad = read_all(DataConfig(format="movielens", path=str(need(MOVIELENS))))
    assert (events.height, bad.height) == (100000, 0)
    assert events["user_id"].n_unique() == 943 and events["item_id"].n_unique() == 1682
    assert events["category_ids"].explode().n_unique() == 19  # genres
    assert events["value"].min() == 1.0 and events["value"].max() == 5.0


def test_movielens_from_directory(tmp_path):
    import tarfile

    with tarfile.open(need(MOVIELENS)) as tar:
        tar.extractall(
            tmp_path,
            members=[m for m in tar.getmembers() if m.name.endswith(("u.data", "u.item"))],
            filter="data",
        )
    events, _ = read_all(DataConfig(format="movielens", path=str(tmp_path)))
    assert events.height == 100000


def write_lines(path, lines, compress=False):
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    return str(path)


GOOD = ["1,10,100,pv,1511600000", "1,11,100,cart,1511600010", "2,10,100,buy,1511600020"]


def test_malformed_rows_are_counted_by_reason(tmp_path):
    lines = GOOD + [
        "1,10,100,pv,12x",  # bad number
        "1,10,pv,1511600000",  # too few fields
        "1,10,100,pv,1511600000,extra",  # too many
        "1,,100,pv,1511600000",  # missing field
        "1,10,100,click,1511600000",  # unknown behavior
        "99999999999999999999999,10,100,pv,1511600000",  # overflows int64
        "",  # blank lines are not rows
    ]
    events, bad = read_all(DataConfig(format="taobao", path=write_lines(tmp_path / "x.csv", lines)))
    assert events.height == 3
    counts = dict(bad.group_by("reason").len().iter_rows())
    assert counts == {"bad_number": 2, "field_count": 2, "missing_field": 1, "unknown_behavior": 1}
    assert set(bad["raw"]) == set(lines[3:9])


ODD_BUT_VALID = [" 5,+10,007,pv,1511600000", "\t5,10,-0,buy,1511600001\r", "5,10,1,fav,1511600002"]


@pytest.mark.parametrize(
    "extra",
    [
        [],  # every row well formed: polars' CSV reader takes the block
        ["5,10,1, pv,1511600003"],  # a padded behavior: the line parser strips it
        ["5,10,1,pv,1511600004 "],  # a padded number polars' reader refuses
        ["\ufeff5,10,1,pv,1511600005"],  # a byte-order mark polars would skip
        ["5,10,1,pv,15116.5", "", "5,10,1,pv"],  # bad number, blank line, too few fields
        ["5,10,1,pv,1511600006,x", "5,,1,pv,1511600007", "5,10,1,click,1511600008"],
    ],
)
def test_csv_fast_path_gives_the_line_parsers_rows(tmp_path, monkeypatch, extra):
    """Taobao blocks go through polars' CSV reader and, when any row is bad, through the line
    parser: events (with their read order) and quarantine equal the line parser's alone."""
    import rec.data.readers as readers_mod
    import rec.data.textio as textio

    rows = [f"{u},{u % 7},3,pv,{1511600100 + u}" for u in range(300)]
    lines = extra + GOOD + ODD_BUT_VALID + rows  # a byte-order mark counts at the start only
    path = tmp_path / "x.csv"
    path.write_bytes(("\n".join(lines)).encode())  # no newline at the end
    monkeypatch.setattr(textio, "BLOCK_BYTES", 1000)  # several blocks: clean ones and bad ones
    cfg = DataConfig(format="taobao", path=str(path), chunk_mb=1)
    taken = []  # per block: did polars' reader parse it
    fast = readers_mod.parse_csv_block

    def counted(*args):
        frame = fast(*args)
        taken.append(frame is not None)
        return frame

    monkeypatch.setattr(readers_mod, "parse_csv_block", counted)
    fast_events, fast_bad = read_all(cfg)
    assert sum(taken) > 3 and (all(taken) or extra)  # most blocks hold only good rows
    monkeypatch.setattr(readers_mod, "parse_csv_block", lambda *a: None)
    line_events, line_bad = read_all(cfg)
    if not extra:
        assert fast_events.height == len(lines) and fast_bad.height == 0
    assert fast_events.equals(line_events) and fast_bad.equals(line_bad)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "file is empty"),
        (b"\n\n", "no data lines"),
        ("\n".join(g.replace(",", ";") for g in GOOD).encode(), "wrong delimiter"),
    ],
)
def test_unreadable_files_give_one_clear_error(tmp_path, content, match):
    path = tmp_path / "x.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=match):
        plan(DataConfig(format="taobao", path=str(path)))


def test_missing_file_and_truncated_gzip(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        plan(DataConfig(format="taobao", path=str(tmp_path / "nope.csv")))
    full = gzip.compress(("\n".join(GOOD * 5000) + "\n").encode())
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(full[: len(full) // 2])
    cfg = DataConfig(format="taobao", path=str(path))
    with pytest.raises(DataError, match="truncated gzip"):
        read_all(cfg)


def test_amazon_needs_attributes_beside(tmp_path):
    seq = write_lines(tmp_path / "Toys.txt", ["1 5 6 7", "2 5 x 7", "3"])
    with pytest.raises(DataError, match="Toys_item2attributes"):
        plan(DataConfig(format="amazon", path=seq))
    (tmp_path / "Toys_item2attributes.json").write_text(json.dumps({"5": [1, 2], "6": [2]}))
    events, bad = read_all(DataConfig(format="amazon", path=seq))
    assert events["timestamp"].to_list() == [0, 1, 2]
    assert events["category_ids"].to_list() == [[1, 2], [2], []]
    assert dict(bad.group_by("reason").len().iter_rows()) == {"bad_number": 1, "field_count": 1}


def test_parquet_canonical_and_missing_columns(tmp_path):
    df = pl.DataFrame(
        {
            "user_id": [1, 1, 2, None],
            "item_id": [5, 6, 5, 5],
            "category_ids": [[1], [1, 2], [], [1]],
            "behavior": ["pv", "buy", "teleport", "pv"],
            "timestamp": [10, 20, 30, 40],
        }
    )
    df.write_parquet(tmp_path / "ok.parquet")
    events, bad = read_all(DataConfig(format="parquet", path=str(tmp_path / "ok.parquet")))
    assert events.height == 2
    assert sorted(bad["reason"]) == ["missing_field", "unknown_behavior"]
    df.drop("behavior").write_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="behavior"):
        read_all(DataConfig(format="parquet", path=str(tmp_path / "bad.parquet")))


def test_byte_range_chunks_read_every_line_once(tmp_path):
    lines = [f"{u},{u * 7},{u % 3},pv,{1511600000 + u}" for u in range(2000)]
    path = write_lines(tmp_path / "big.csv", lines)
    for size in (37, 100, 4096):
        chunks = plan_text_chunks(path, size)
        assert len(chunks) > 1
        cfg = DataConfig(format="taobao", path=path)
        got = []
        for chunk in chunks:
            for events, bad in read_chunk(chunk, cfg, [path]):
                assert bad.num_rows == 0
                got += events["user_id"].to_pylist()
        assert got == list(range(2000))


def test_a_format_is_one_registered_object(tmp_path):
    """Adding a format = one `Format` passed to `register`; prepare writes its request_behavior
    into meta.json (serving reads it there instead of knowing dataset names)."""
    fmt = register(replace(FORMATS["parquet"], name="reviews_parquet", request_behavior="review"))
    try:
        rows = [(u, i) for u in range(1, 6) for i in range(1, 5)]
        pl.DataFrame(
            {
                "user_id": [u for u, _ in rows],
                "item_id": [i for _, i in rows],
                "category_ids": [[i % 2 + 1] for _, i in rows],
                "behavior": ["review"] * len(rows),
                "timestamp": list(range(len(rows))),
            }
        ).write_parquet(tmp_path / "log.parquet")
        cfg = DataConfig(format=fmt.name, path=str(tmp_path / "log.parquet"), max_len=5)
        prepare_local(cfg, tmp_path / "out")
        meta = json.loads((tmp_path / "out" / "meta.json").read_text())
        assert (meta["format"], meta["request_behavior"]) == ("reviews_parquet", "review")
        with pytest.raises(ValueError, match="already registered"):
            register(fmt)
    finally:
        FORMATS.pop("reviews_parquet", None)
    with pytest.raises(ValueError, match="request_behavior"):
        register(replace(FORMATS["parquet"], name="x", request_behavior="clicked"))
    with pytest.raises(ValueError, match="not one of taobao, amazon"):
        DataConfig(format="csv", path="x.csv")
    synthetic = prepare_local(DataConfig(), tmp_path / "synthetic")
    assert synthetic["n_users"] > 0
    meta = json.loads((tmp_path / "synthetic" / "meta.json").read_text())
    assert meta["request_behavior"] == "pv" and isinstance(FORMATS["synthetic"], Format)


# ------------------------------------------------- synthetic stand-ins (no real files needed)


@pytest.mark.parametrize("tarball", [False, True])
def test_movielens_synthetic_dir_and_tarball(tmp_path, tarball):
    from tests.data_fixtures import ML_GENRES, ML_RATINGS, ML_VALID, write_movielens

    path = write_movielens(tmp_path, tarball=tarball)
    events, bad = read_all(DataConfig(format="movielens", path=str(path)))
    assert events.height == ML_VALID and bad.height == 1
    assert bad["reason"].to_list() == ["bad_rating"] and bad["raw"][0] == "2\t3\t6\t881250961"
    assert bad["source"][0] == str(path)
    got = events.sort("timestamp")
    want = [r for r in ML_RATINGS if r[2] <= 5]
    assert got["user_id"].to_list() == [r[0] for r in want]
    assert got["value"].to_list() == [float(r[2]) for r in want]
    assert set(got["behavior"]) == {"rating"}
    genres = dict(zip(got["item_id"].to_list(), got["category_ids"].to_list(), strict=True))
    assert {i: sorted(c) for i, c in genres.items()} == ML_GENRES  # genre flag positions


def test_movielens_synthetic_prepares_with_rating_tokens(tmp_path):
    from tests.data_fixtures import write_movielens

    stats = prepare_local(
        DataConfig(format="movielens", path=str(write_movielens(tmp_path))), tmp_path / "out"
    )
    # users 2 (one rating quarantined) and 3 are left with 2 events: too short to split
    assert stats["quarantined_by_reason"]["bad_rating"] == stats["rows_quarantined"] == 1
    assert (stats["n_users"], stats["users_too_short"], stats["n_interactions"]) == (1, 2, 3)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["request_behavior"] == "rating_high" and meta["timestamp_kind"] == "unix"


def test_taobao_window_edges_from_the_shipped_config(tmp_path):
    """jobs/configs/taobao.yaml's window on rows at, just inside and just outside each edge:
    [min_timestamp, max_timestamp) keeps the lower edge and drops the upper one."""
    from jobs.config import RunConfig
    from rec.config_loader import load_config
    from tests.conftest import ROOT
    from tests.data_fixtures import TAOBAO_ROWS, write_taobao

    path = write_taobao(tmp_path / "UserBehavior.csv")
    cfg = load_config(RunConfig, ROOT / "jobs/configs/taobao.yaml", [f"data.path={path}"]).data
    events, bad = read_all(cfg)
    kept = sorted(r[4] for r in TAOBAO_ROWS if r[5])
    assert sorted(events["timestamp"].to_list()) == kept
    assert set(bad["reason"]) == {"timestamp_out_of_window"}
    assert sorted(int(line.split(",")[-1]) for line in bad["raw"]) == sorted(
        r[4] for r in TAOBAO_ROWS if not r[5]
    )
    lines = path.read_bytes().splitlines(keepends=True)
    starts = [sum(len(x) for x in lines[:n]) for n in range(len(lines))]
    early = [s for s, r in zip(starts, TAOBAO_ROWS, strict=True) if not r[5]]
    assert sorted(bad["offset"].to_list()) == early  # byte offsets of the quarantined lines


def test_iterated_kcore_on_a_four_pass_log(tmp_path):
    from tests.data_fixtures import KCORE_COUNTS, KCORE_KEPT_USERS, write_kcore_log

    path = write_kcore_log(tmp_path / "log.csv")
    out = tmp_path / "out"
    stats = prepare_local(DataConfig(format="taobao", path=str(path), kcore=2), out)
    items = pl.read_parquet(out / "vocab" / "items.parquet")
    assert dict(zip(items["item_id"], items["count"], strict=True)) == KCORE_COUNTS
    assert set(pl.read_parquet(out / "test" / "*.parquet")["user_id"]) == KCORE_KEPT_USERS
    assert (stats["n_users"], stats["n_items"]) == (2, 3)
    plain = prepare_local(DataConfig(format="taobao", path=str(path)), tmp_path / "plain")
    assert plain["n_users"] == 6  # without k-core every user has >= 3 events and stays
