"""Seeded synthetic e-commerce behaviour logs in the Taobao UserBehavior format.

The embedded default dataset, so the pipeline runs with no download. Rows have exactly Taobao's
columns (`TAOBAO_SCHEMA`): user_id, item_id, category_id (int64; item and category ids are large
sparse integers, each item in exactly one category), behavior_type (pv | cart | fav | buy) and
timestamp (unix seconds in [start, start + days) local time; Taobao's is UTC+8).

Structure: Zipf item popularity inside skewed categories; users with 1..4 preferred categories
that may drift once; a per-user exploration rate from a Beta (explorers vs focused users, the
heterogeneity a diversity policy feeds on); geometric sessions with category stickiness and
repeat views; a daily cycle; the funnel pv -> cart/fav -> buy. Every cart, fav and buy (direct
buys too) follows a pv of the same item by the same user, at an equal or later second. Rows are
sorted by user, timestamp, funnel step. Chunk c (`users_per_chunk` users) draws from
SeedSequence(seed, spawn_key=(1, c)): a config gives byte-identical files, and a chunk does not
depend on the chunks after it.

The schema, the window and `SyntheticConfig` live in rec/data/synthetic_config.py and are
re-exported here (`__all__`), so callers import everything from this module.

    paths = generate(SyntheticConfig(n_users=100_000), "outputs/synthetic")  # part-00000.parquet..
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from rec.data.synthetic_config import (
    BEHAVIOR_TYPES,
    DAY_S,
    TAOBAO_SCHEMA,
    SyntheticConfig,
    window,
)

__all__ = [
    "BEHAVIOR_TYPES",
    "SINGLE_FILE_STEM",
    "TAOBAO_SCHEMA",
    "SyntheticConfig",
    "generate",
    "iter_chunks",
    "user_traits",
    "window",
]

SINGLE_FILE_STEM = "UserBehavior"  # the name of Taobao's own file
_ID_SPACE = 5_200_000  # Taobao's item and category ids reach ~5.16M
# Relative activity per local hour, shaped like Taobao's: quiet at night, evening peak.
_HOURLY_ACTIVITY = (5, 3, 2, 1, 1, 1, 2, 3, 5, 6, 7, 7, 7, 7, 7, 7, 7, 7, 8, 9, 11, 12, 11, 8)
_SORT_RANK = np.array([0, 1, 1, 2], dtype=np.int64)  # pv before cart/fav before buy in one second


@dataclass
class _Catalog:
    """Items grouped by category: internal index i -> ids; per-category popularity CDFs."""

    item_ids: np.ndarray  # (n_items,) int64 public ids
    category_ids: np.ndarray  # (n_categories,) int64 public ids
    item_category: np.ndarray  # (n_items,) int64 category index; items contiguous per category
    item_cdf: np.ndarray  # (n_items,) float64: c + within-category CDF, so c + u finds an item
    guide: np.ndarray  # (n_items,) int64 guide table: where the walk for a bucket starts
    first_item: np.ndarray  # (n_categories,) int64 index of each category's first item
    size: np.ndarray  # (n_categories,) int64 items per category
    category_cdf: np.ndarray  # (n_categories,) float64 CDF of category popularity


def _build_catalog(cfg: SyntheticConfig) -> _Catalog:
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(0,)))
    n_i, n_c = cfg.n_items, cfg.n_categories
    size_w = rng.lognormal(0.0, cfg.category_size_sigma, n_c)
    sizes = 1 + rng.multinomial(n_i - n_c, size_w / size_w.sum())  # >= 1 item per category
    item_category = np.repeat(np.arange(n_c), sizes)
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.arange(n_i) - first[item_category]  # popularity rank within the category
    weight = (rank + 1.0) ** -cfg.item_zipf
    cum = np.cumsum(weight)
    before = cum[first] - weight[first]  # cumulative weight of earlier categories
    total = cum[first + sizes - 1] - before
    item_cdf = item_category + (cum - before[item_category]) / total[item_category]
    item_cdf[first + sizes - 1] = np.arange(1, n_c + 1)  # exact ends: c + u (u < 1) stays in c
    # One bucket per item; bucket j starts at the answer for the start of bucket j - 1, so float
    # rounding of the bucket index can never start a walk past its answer.
    lower = item_category + np.maximum(rank - 1, 0) / sizes[item_category]
    guide = np.searchsorted(item_cdf, lower, side="right")
    cat_w = (rng.permutation(n_c) + 1.0) ** -cfg.category_zipf  # popularity unrelated to size
    category_cdf = np.cumsum(cat_w) / cat_w.sum()
    space_i, space_c = max(_ID_SPACE, 2 * n_i), max(_ID_SPACE, 2 * n_c)
    return _Catalog(
        item_ids=1 + rng.choice(space_i, n_i, replace=False).astype(np.int64),
        category_ids=1 + rng.choice(space_c, n_c, replace=False).astype(np.int64),
        item_category=item_category.astype(np.int64),
        item_cdf=item_cdf,
        guide=guide,
        first_item=first,
        size=sizes,
        category_cdf=category_cdf,
    )


@dataclass
class _Users:
    """Latent traits of one chunk of users. Shapes: (U,) unless noted."""

    user_ids: np.ndarray  # int64 public ids 1 + 2u + (0 or 1): sorted, not dense
    n_views: np.ndarray  # int64 pv events
    exploration: np.ndarray  # float64 P(a fresh category draw ignores the preferences)
    n_preferred: np.ndarray  # int64 in 1..max_preferred
    preferred: np.ndarray  # (2, U, max_preferred) int64 category indices before/after drift
    drift_at: np.ndarray  # int64 pv position from which preferred[1] applies (n_views: never)


def _chunk_rngs(cfg: SyntheticConfig, chunk: int) -> tuple[np.random.Generator, ...]:
    # Traits and events draw from separate streams so user_traits() need not generate events.
    traits, events = np.random.SeedSequence(cfg.seed, spawn_key=(1, chunk)).spawn(2)
    return np.random.default_rng(traits), np.random.default_rng(events)


def _categories(cdf: np.ndarray, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, rng.random(shape), side="right"), cdf.size - 1)


def _sample_users(cfg: SyntheticConfig, cat: _Catalog, chunk: int) -> _Users:
    rng = _chunk_rngs(cfg, chunk)[0]
    lo = chunk * cfg.users_per_chunk
    n = min(cfg.users_per_chunk, cfg.n_users - lo)
    mu = np.log(cfg.events_per_user) - cfg.events_sigma**2 / 2  # so the mean is events_per_user
    n_views = np.maximum(1, np.rint(rng.lognormal(mu, cfg.events_sigma, n))).astype(np.int64)
    n_pref = rng.integers(1, cfg.max_preferred + 1, n)
    preferred = np.stack([_categories(cat.category_cdf, rng, (n, cfg.max_preferred))] * 2)
    # Drift replaces the first one or two slots; slots are drawn uniformly, so that is random.
    drifts = rng.random(n) < cfg.drift_prob
    replace = drifts[:, None] & (np.arange(cfg.max_preferred) < rng.integers(1, 3, n)[:, None])
    preferred[1][replace] = _categories(cat.category_cdf, rng, replace.shape)[replace]
    drift_at = np.where(drifts, (rng.uniform(0.2, 0.8, n) * n_views).astype(np.int64), n_views)
    return _Users(
        user_ids=1 + 2 * np.arange(lo, lo + n, dtype=np.int64) + rng.integers(0, 2, n),
        n_views=n_views,
        exploration=rng.beta(cfg.explore_alpha, cfg.explore_beta, n),
        n_preferred=n_pref,
        preferred=preferred,
        drift_at=drift_at,
    )


def _draw_items(cat: _Catalog, category: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N,) category indices -> (N,) item indices drawn by popularity within the category.

    Exact inverse-CDF draws, several times faster than searchsorted on a large catalogue: the
    guide table puts each draw a few items short of its answer, a vectorised walk finishes.
    """
    u = rng.random(category.size, dtype=np.float32)  # float32: c + u is exact and below c + 1
    q = category + u.astype(np.float64)
    item = cat.guide[cat.first_item[category] + (u * cat.size[category]).astype(np.int64)]
    todo = np.flatnonzero(cat.item_cdf[item] <= q)
    while todo.size:
        item[todo] += 1
        todo = todo[cat.item_cdf[item[todo]] <= q[todo]]
    return item


def _sample_views(
    cfg: SyntheticConfig, cat: _Catalog, users: _Users, rng: np.random.Generator
) -> tuple[np.ndarray, ...]:
    """The pv stream in user order: (user, item, explored, seconds into the window), each (N,)."""
    n = int(users.n_views.sum())
    user = np.repeat(np.arange(users.n_views.size), users.n_views)
    user_first = np.cumsum(users.n_views) - users.n_views
    pos = np.arange(n) - user_first[user]
    new_session = rng.random(n) < 1.0 / cfg.session_mean_events
    new_session[user_first] = True
    # A fresh category draw at session starts and when the user leaves the current category.
    fresh = new_session | (rng.random(n) >= cfg.stickiness)
    f_idx = np.flatnonzero(fresh)
    f_user = user[f_idx]
    explored = rng.random(f_idx.size) < users.exploration[f_user]
    slot = (rng.random(f_idx.size) * users.n_preferred[f_user]).astype(np.int64)
    after = (pos[f_idx] >= users.drift_at[f_user]).astype(np.int64)
    liked = users.preferred[after, f_user, slot]
    f_cat = np.where(explored, _categories(cat.category_cdf, rng, (f_idx.size,)), liked)
    which = np.cumsum(fresh) - 1  # index into the fresh draws that each pv continues
    category, explored = f_cat[which], explored[which]
    # A sticky pv sometimes re-views the previous item (same category, so carrying it is valid).
    new_item = fresh | (rng.random(n) >= cfg.repeat_view_prob)
    item = _draw_items(cat, category[new_item], rng)[np.cumsum(new_item) - 1]
    return user, item, explored, _view_times(cfg, user, new_session, rng)


def _view_times(
    cfg: SyntheticConfig, user: np.ndarray, new_session: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """(N,) float seconds since the window start of each pv; non-decreasing per user."""
    span = float(cfg.days * DAY_S)
    gap = rng.exponential(cfg.in_session_gap_s, user.size)
    gap[new_session] = 0.0
    cum = np.cumsum(gap)
    s_first = np.flatnonzero(new_session)
    session = np.cumsum(new_session) - 1
    within = cum - cum[s_first][session]  # seconds since the session's first pv
    s_last = np.append(s_first[1:], user.size) - 1
    duration = within[s_last]
    # Session starts: a day, then an hour by the daily cycle; sorted per user, their spacings
    # are the hours-long, roughly exponential gaps between sessions.
    s_user = user[s_first]
    hour_cdf = np.cumsum(_HOURLY_ACTIVITY) / sum(_HOURLY_ACTIVITY)
    hour = np.minimum(np.searchsorted(hour_cdf, rng.random(s_first.size), side="right"), 23)
    day = rng.integers(0, cfg.days, s_first.size)
    raw = day * DAY_S + (hour + rng.random(s_first.size)) * 3600.0
    raw = np.sort(s_user * span + raw) - s_user * span  # sorted within each user
    # Push sessions later so none starts before the previous ended (+1 s): start_k = D_k +
    # running max of (raw_j - D_j) per user, D = exclusive per-user sum of (duration + 1).
    step = duration + 1.0
    excl = np.cumsum(step) - step
    user_s0 = np.flatnonzero(np.diff(s_user, prepend=-1))  # every user has >= 1 session
    d = excl - excl[user_s0][s_user]
    # An offset per user larger than any user's range of raw - d keeps the running max per user.
    big = span + np.add.reduceat(step, user_s0).max() + 1.0
    start = d + np.maximum.accumulate(raw - d + s_user * big) - s_user * big
    # The rare user who runs past the window end is compressed into it.
    u_last = np.append(user_s0[1:], s_first.size) - 1
    scale = np.minimum(1.0, (span - 1.0) / (start[u_last] + duration[u_last]))
    return (start[session] + within) * scale[user]


def _funnel_table(
    cfg: SyntheticConfig, cat: _Catalog, users: _Users, views: tuple, rng: np.random.Generator
) -> pa.Table:
    """pvs plus their carts, favs and buys, sorted by (user, second, funnel step)."""
    user, item, explored, t = views
    n = user.size
    boost = np.where(explored, cfg.explore_engagement, 1.0)
    u = rng.random((4, n), dtype=np.float32)
    cart = np.flatnonzero(u[0] < cfg.p_cart * boost)
    fav = np.flatnonzero(u[1] < cfg.p_fav * boost)
    direct = np.flatnonzero(u[2] < cfg.p_buy_direct * boost)
    then_buy = u[3][cart] < cfg.p_buy_after_cart
    bought = cart[then_buy]
    cart_t = t[cart] + rng.exponential(cfg.action_delay_s, cart.size)
    fav_t = t[fav] + rng.exponential(cfg.action_delay_s, fav.size)
    buy_t = cart_t[then_buy] + rng.exponential(cfg.buy_delay_s, bought.size)
    direct_t = t[direct] + rng.exponential(cfg.action_delay_s, direct.size)
    src = np.concatenate([np.arange(n), cart, fav, bought, direct])  # the pv behind each row
    when = np.concatenate([t, cart_t, fav_t, buy_t, direct_t])
    code = np.repeat(np.arange(4), [n, cart.size, fav.size, bought.size + direct.size])
    span = cfg.days * DAY_S
    second = np.minimum(when, span - 1).astype(np.int64)  # follow-ups stay inside the window
    # One int64 key; the blocks are each sorted already, so the stable sort merges a few runs.
    key = (user[src] * span + second) * 4 + _SORT_RANK[code]
    order = np.argsort(key, kind="stable")
    src, second, code = src[order], second[order], code[order]
    items = item[src]
    return pa.table(
        {
            "user_id": users.user_ids[user[src]],
            "item_id": cat.item_ids[items],
            "category_id": cat.category_ids[cat.item_category[items]],
            "behavior_type": pc.take(pa.array(BEHAVIOR_TYPES), pa.array(code.astype(np.int8))),
            "timestamp": window(cfg)[0] + second,
        },
        schema=TAOBAO_SCHEMA,
    )


def _n_chunks(cfg: SyntheticConfig) -> int:
    return -(-cfg.n_users // cfg.users_per_chunk)


def iter_chunks(cfg: SyntheticConfig) -> Iterator[pa.Table]:
    """The log chunk by chunk (`users_per_chunk` users each), as tables in `TAOBAO_SCHEMA`."""
    cfg = cfg.scaled()
    cat = _build_catalog(cfg)
    for chunk in range(_n_chunks(cfg)):
        users = _sample_users(cfg, cat, chunk)
        rng = _chunk_rngs(cfg, chunk)[1]
        yield _funnel_table(cfg, cat, users, _sample_views(cfg, cat, users, rng), rng)


def user_traits(cfg: SyntheticConfig) -> pa.Table:
    """Ground truth per user (for evaluation, e.g. diversity by exploration rate).

    Columns: user_id int64, n_views int64 (pv rows), exploration_rate float64,
    n_preferred int64, drifted bool. Cheap: no events are generated.
    """
    cfg = cfg.scaled()
    cat = _build_catalog(cfg)
    parts = [_sample_users(cfg, cat, c) for c in range(_n_chunks(cfg))]
    return pa.table(
        {
            "user_id": np.concatenate([p.user_ids for p in parts]),
            "n_views": np.concatenate([p.n_views for p in parts]),
            "exploration_rate": np.concatenate([p.exploration for p in parts]),
            "n_preferred": np.concatenate([p.n_preferred for p in parts]),
            "drifted": np.concatenate([p.drift_at < p.n_views for p in parts]),
        }
    )


def generate(
    cfg: SyntheticConfig,
    out_dir: str | Path,
    fmt: Literal["parquet", "csv"] = "parquet",
    single_file: bool = False,
    overwrite: bool = False,
) -> list[Path]:
    """Write the log to `out_dir`, one chunk in memory at a time; returns the files written.

    One file per chunk (`part-00000.parquet`, ... or `.csv`), or with `single_file` one
    `UserBehavior.<fmt>` (parquet: one row group per chunk). CSV is Taobao's: no header, no
    quotes. Refuses a directory that holds earlier output unless `overwrite` (which deletes it).
    """
    if fmt not in ("parquet", "csv"):
        raise ValueError(f"fmt must be 'parquet' or 'csv', got {fmt!r}")
    cfg = cfg.scaled()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = [p for p in sorted(out.glob("*.*")) if p.suffix in (".parquet", ".csv")]
    stale = [p for p in stale if p.stem.startswith("part-") or p.stem == SINGLE_FILE_STEM]
    if stale and not overwrite:
        raise FileExistsError(f"{str(out)!r} already holds output ({stale[0].name}, ...)")
    for path in stale:
        path.unlink()
    if single_file:
        path = out / f"{SINGLE_FILE_STEM}.{fmt}"
        with _writer(path, fmt) as writer:  # parquet: one row group per chunk
            for table in iter_chunks(cfg):
                writer.write_table(table)
        return [path]
    paths = [out / f"part-{i:05d}.{fmt}" for i in range(_n_chunks(cfg))]
    for path, table in zip(paths, iter_chunks(cfg), strict=True):
        with _writer(path, fmt) as writer:
            writer.write_table(table)
    return paths


def _writer(path: Path, fmt: str) -> pq.ParquetWriter | pacsv.CSVWriter:
    if fmt == "parquet":
        return pq.ParquetWriter(path, TAOBAO_SCHEMA)
    # Taobao's CSV: no header; no quotes (pyarrow would quote every string otherwise).
    options = pacsv.WriteOptions(include_header=False, quoting_style="none")
    return pacsv.CSVWriter(path, TAOBAO_SCHEMA, write_options=options)
