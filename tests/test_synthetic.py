"""The synthetic Taobao-format generator: schema, determinism, realism, files on disk."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rec.data.synthetic import (
    BEHAVIOR_TYPES,
    TAOBAO_SCHEMA,
    SyntheticConfig,
    generate,
    iter_chunks,
    user_traits,
    window,
)

# Three chunks, ~67k rows: big enough for stable shares, small enough for a shared 2-core box.
SMALL = SyntheticConfig(n_users=1500, n_items=3000, n_categories=60, users_per_chunk=500)


def _collect(cfg: SyntheticConfig) -> pa.Table:
    return pa.concat_tables(list(iter_chunks(cfg)))


def read_csv(path: Path) -> pa.Table:
    """A headerless Taobao-format CSV, read the way a reader of the real file would."""
    return pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=TAOBAO_SCHEMA.names),
        convert_options=pacsv.ConvertOptions(column_types=TAOBAO_SCHEMA),
    )


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return _collect(SMALL)


@pytest.fixture(scope="module")
def events(table: pa.Table) -> pl.DataFrame:
    return pl.from_arrow(table)


def _check_invariants(df: pl.DataFrame, cfg: SyntheticConfig) -> None:
    """What every config must give: window, order, one category per item, funnel after pv."""
    first, end = window(cfg)
    assert df["timestamp"].min() >= first and df["timestamp"].max() < end
    assert (df["user_id"].diff().drop_nulls() >= 0).all()  # grouped by user, ascending
    steps = df.select(pl.col("timestamp").diff().over("user_id").alias("d"))["d"].drop_nulls()
    assert (steps >= 0).all()
    assert df.group_by("item_id").agg(pl.col("category_id").n_unique())["category_id"].max() == 1
    # Every cart/fav/buy (direct buys too) comes after a pv of the same item by the same user,
    # in row order as well as in time: rows of one second keep the funnel order.
    df = df.with_row_index("row")
    first_view = (
        df.filter(pl.col("behavior_type") == "pv")
        .group_by("user_id", "item_id")
        .agg(pl.col("row").min().alias("pv_row"), pl.col("timestamp").min().alias("pv_ts"))
    )
    actions = df.filter(pl.col("behavior_type") != "pv").join(
        first_view, on=["user_id", "item_id"], how="left"
    )
    assert actions["pv_row"].null_count() == 0
    assert (actions["pv_row"] < actions["row"]).all()
    assert (actions["pv_ts"] <= actions["timestamp"]).all()


def test_schema_and_dtypes(table: pa.Table) -> None:
    assert table.schema == TAOBAO_SCHEMA
    assert set(table.column("behavior_type").to_pylist()) == set(BEHAVIOR_TYPES)
    assert window(SyntheticConfig()) == (1511539200, 1512316800)  # Taobao's filter bounds


def test_invariants(events: pl.DataFrame) -> None:
    _check_invariants(events, SMALL)


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_users=st.integers(1, 60),
    n_categories=st.integers(1, 8),
    extra_items=st.integers(0, 50),
    users_per_chunk=st.integers(1, 25),
    days=st.integers(1, 3),
)
def test_invariants_hold_for_any_config(
    seed: int, n_users: int, n_categories: int, extra_items: int, users_per_chunk: int, days: int
) -> None:
    cfg = SyntheticConfig(
        n_users=n_users,
        n_items=n_categories + extra_items,
        n_categories=n_categories,
        users_per_chunk=users_per_chunk,
        days=days,
        seed=seed,
        p_cart=0.3,  # plenty of funnel rows to check even in a tiny log
        p_buy_direct=0.1,
    )
    df = pl.from_arrow(_collect(cfg))
    _check_invariants(df, cfg)
    assert df["user_id"].n_unique() == n_users  # every user has at least one pv


def test_same_seed_same_data_other_seed_other_data(table: pa.Table) -> None:
    assert _collect(SMALL).equals(table)
    other = _collect(dataclasses.replace(SMALL, seed=1))
    assert not other.equals(table)


def test_files_are_byte_identical_across_runs(tmp_path) -> None:
    cfg = SyntheticConfig(n_users=300, users_per_chunk=100)
    a, b = generate(cfg, tmp_path / "a"), generate(cfg, tmp_path / "b")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_a_chunk_does_not_depend_on_later_users(table: pa.Table) -> None:
    fewer = dataclasses.replace(SMALL, n_users=1000)
    assert next(iter(iter_chunks(fewer))).equals(next(iter(iter_chunks(SMALL))))


def test_behavior_shares_are_taobao_like(events: pl.DataFrame) -> None:
    share = dict(events["behavior_type"].value_counts(normalize=True).iter_rows())
    assert 0.86 <= share["pv"] <= 0.92, share
    assert 0.04 <= share["cart"] <= 0.07, share
    assert 0.02 <= share["fav"] <= 0.04, share
    assert 0.012 <= share["buy"] <= 0.03, share


def test_item_popularity_is_heavy_tailed(events: pl.DataFrame) -> None:
    counts = events.filter(pl.col("behavior_type") == "pv")["item_id"].value_counts()["count"]
    counts = np.sort(counts.to_numpy())[::-1]
    top = counts[: SMALL.n_items // 100].sum() / counts.sum()
    assert top > 0.2, top  # the top 1% of the catalogue takes a fifth of the views or more


def test_ids_look_like_taobao(events: pl.DataFrame) -> None:
    # Sparse ids from a seeded draw, not dense indices 0..n.
    assert events["item_id"].max() > 100 * SMALL.n_items
    assert events["category_id"].max() > 1000 * SMALL.n_categories
    assert events["category_id"].n_unique() <= SMALL.n_categories
    assert events["item_id"].n_unique() <= SMALL.n_items


def test_explorers_view_more_diverse_categories(events: pl.DataFrame) -> None:
    traits = pl.from_arrow(user_traits(SMALL))
    views = events.filter(pl.col("behavior_type") == "pv")
    per_user = views.group_by("user_id").len().join(traits, on="user_id")
    assert (per_user["len"] == per_user["n_views"]).all()  # the ground truth matches the log
    p = (
        views.group_by("user_id", "category_id")
        .len()
        .with_columns((pl.col("len") / pl.col("len").sum().over("user_id")).alias("p"))
    )
    h = p.group_by("user_id").agg((-(pl.col("p") * pl.col("p").log())).sum().alias("h"))
    h = h.join(traits, on="user_id").filter(pl.col("n_views") >= 20)
    explorers = h.filter(pl.col("exploration_rate") > 0.5)["h"]
    focused = h.filter(pl.col("exploration_rate") < 0.05)["h"]
    assert len(explorers) >= 10 and len(focused) >= 10
    assert explorers.mean() > focused.mean() + 0.5, (explorers.mean(), focused.mean())


def test_drifting_users_change_their_main_category(events: pl.DataFrame) -> None:
    traits = pl.from_arrow(user_traits(SMALL)).filter(
        (pl.col("n_views") >= 30) & (pl.col("exploration_rate") < 0.1)  # focused, active users
    )
    views = events.filter(pl.col("behavior_type") == "pv").join(traits, on="user_id")
    views = views.with_columns(
        (pl.int_range(pl.len()).over("user_id") / pl.col("n_views")).alias("f")
    )

    def main_category(part: pl.DataFrame, name: str) -> pl.DataFrame:
        counts = part.group_by("user_id", "category_id").len().sort("len", "category_id")
        return counts.group_by("user_id").agg(pl.col("category_id").last().alias(name))

    early = main_category(views.filter(pl.col("f") < 0.2), "early")
    late = main_category(views.filter(pl.col("f") >= 0.8), "late")
    kept = early.join(late, on="user_id").join(traits, on="user_id")
    kept = kept.group_by("drifted").agg((pl.col("early") == pl.col("late")).mean().alias("same"))
    same = dict(kept.iter_rows())
    assert same[True] < same[False] - 0.2, same


def test_chunked_parquet_matches_iter_chunks(tmp_path, table: pa.Table) -> None:
    paths = generate(SMALL, tmp_path)
    assert [p.name for p in paths] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert pa.concat_tables([pq.read_table(p) for p in paths]).equals(table)


def test_csv_parses_back_to_the_same_rows(tmp_path, table: pa.Table) -> None:
    paths = generate(SMALL, tmp_path / "parts", fmt="csv")
    assert len(paths) == 3
    assert pa.concat_tables([read_csv(p) for p in paths]).equals(table)
    (single,) = generate(SMALL, tmp_path / "one", fmt="csv", single_file=True)
    assert single.name == "UserBehavior.csv"
    first_line = single.read_text().split("\n", 1)[0]
    assert first_line.count(",") == 4 and '"' not in first_line  # Taobao: no header, no quotes
    assert read_csv(single).equals(table)


def test_single_parquet_file_and_overwrite(tmp_path, table: pa.Table) -> None:
    (path,) = generate(SMALL, tmp_path, single_file=True)
    assert pq.ParquetFile(path).num_row_groups == 3  # one row group per chunk
    assert pq.read_table(path).equals(table)
    with pytest.raises(FileExistsError):
        generate(SMALL, tmp_path)
    paths = generate(SMALL, tmp_path, overwrite=True)
    assert sorted(tmp_path.iterdir()) == paths  # the earlier single file is gone


@pytest.mark.parametrize(
    ("field", "value"),
    [("p_cart", 1.5), ("n_users", 0), ("item_zipf", -1.0), ("seed", -1), ("start", "25/11/2017")],
)
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SyntheticConfig(**{field: value})
    with pytest.raises(ValueError, match="n_items"):
        SyntheticConfig(n_items=10, n_categories=20)


def test_bad_format_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="fmt"):
        generate(SMALL, tmp_path, fmt="json")  # type: ignore[arg-type]
