"""The synthetic log's contract and knobs: its schema, its time window, `SyntheticConfig`.

Separate from rec/data/synthetic.py (the sampler and the file writer) so the config, the part
users read, override (`data.synthetic.*`) and validate, is short and on its own; the generator
re-exports the schema, the window and the config, so `from rec.data.synthetic import ...` works.
The defaults are calibrated to Taobao UserBehavior: its window (2017-11-25 .. 2017-12-03,
UTC+8) and its behaviour shares (~89 % pv, 5.5 % cart, 3 % fav, 2 % buy).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass

import pyarrow as pa

BEHAVIOR_TYPES = ("pv", "cart", "fav", "buy")
TAOBAO_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("category_id", pa.int64()),
        ("behavior_type", pa.string()),
        ("timestamp", pa.int64()),
    ]
)
DAY_S = 86_400


@dataclass
class SyntheticConfig:
    """Knobs of the generator; defaults give Taobao-like behaviour shares (~89/5.5/3/2 %)."""

    n_users: int = 2000  # users in the log
    n_items: int = 5000  # catalogue size; every item has exactly one category
    n_categories: int = 100  # categories (sizes lognormal-skewed, at least one item each)
    events_per_user: float = 40.0  # mean pv events per user
    events_sigma: float = 1.0  # lognormal sigma of pv events per user (heavy-tailed activity)
    seed: int = 0  # root of every random stream
    start: str = "2017-11-25"  # first local day of the window (Taobao's)
    days: int = 9  # window length in days (Taobao's: 2017-11-25 .. 2017-12-03)
    tz_offset_hours: int = 8  # window and daily cycle are in local time; Taobao's is UTC+8
    item_zipf: float = 1.1  # item popularity exponent by rank within a category
    category_zipf: float = 1.0  # category popularity exponent by rank
    category_size_sigma: float = 1.0  # lognormal sigma of category sizes (items per category)
    max_preferred: int = 4  # each user prefers 1..max_preferred categories (uniform)
    drift_prob: float = 0.3  # share of users whose taste drifts once (1-2 preferences replaced)
    session_mean_events: float = 8.0  # mean session length in pv events (geometric)
    stickiness: float = 0.7  # P(a pv stays in the previous pv's category within a session)
    repeat_view_prob: float = 0.15  # P(a sticky pv re-views the previous item)
    explore_alpha: float = 0.5  # Beta(alpha, beta) of the per-user exploration rate: mass near 0
    explore_beta: float = 2.0  # (focused users) and a tail of explorers; mean 0.2 by default
    explore_engagement: float = 0.5  # funnel rates on explored vs preferred categories
    in_session_gap_s: float = 45.0  # mean seconds between pvs in a session (exponential)
    action_delay_s: float = 60.0  # mean seconds from a pv to its cart / fav / direct buy
    buy_delay_s: float = 900.0  # mean seconds from a cart to its buy
    p_cart: float = 0.07  # P(cart | pv) in a preferred category
    p_fav: float = 0.037  # P(fav | pv) in a preferred category
    p_buy_after_cart: float = 0.25  # P(buy | cart)
    p_buy_direct: float = 0.009  # P(buy without cart | pv) in a preferred category
    users_per_chunk: int = 20_000  # users per chunk: bounds memory, one output file each
    # Multiplies n_users and n_items together (n_categories is capped at the scaled n_items):
    # one knob from a Taobao-shaped config down to a quick run (jobs/configs/taobao_scale.yaml).
    scale: float = 1.0

    def __post_init__(self) -> None:
        for ok, rule, names in _CHECKS:
            for name in names.split():
                if not ok(getattr(self, name)):
                    raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")
        if self.n_items < self.n_categories:
            raise ValueError(f"n_items ({self.n_items!r}) must be >= n_categories")
        try:
            dt.date.fromisoformat(self.start)
        except ValueError:
            raise ValueError(f"start must be an ISO date, got {self.start!r}") from None

    def scaled(self) -> SyntheticConfig:
        """The config the generator runs: `scale` applied to the sizes, then reset to 1."""
        users, items = (max(1, round(n * self.scale)) for n in (self.n_users, self.n_items))
        cats = min(self.n_categories, items)
        return dataclasses.replace(self, n_users=users, n_items=items, n_categories=cats, scale=1)


_CHECKS = (  # (test, rule in words, fields) for SyntheticConfig.__post_init__
    (lambda v: v >= 1, ">= 1", "n_users n_items n_categories days max_preferred users_per_chunk"),
    (lambda v: v > 0, "> 0", "events_per_user session_mean_events explore_alpha explore_beta"),
    (lambda v: v > 0, "> 0", "scale"),
    (lambda v: v > 0, "> 0", "in_session_gap_s action_delay_s buy_delay_s"),
    (lambda v: v >= 0, ">= 0", "events_sigma item_zipf category_zipf category_size_sigma"),
    (lambda v: v >= 0, ">= 0", "explore_engagement seed"),
    (lambda v: 0 <= v <= 1, "in [0, 1]", "drift_prob stickiness repeat_view_prob p_cart p_fav"),
    (lambda v: 0 <= v <= 1, "in [0, 1]", "p_buy_after_cart p_buy_direct"),
)


def window(cfg: SyntheticConfig) -> tuple[int, int]:
    """[first, end) unix seconds of the log (Taobao's defaults: 1511539200, 1512316800)."""
    day = dt.datetime.fromisoformat(cfg.start).replace(tzinfo=dt.timezone.utc)
    first = int(day.timestamp()) - cfg.tz_offset_hours * 3600
    return first, first + cfg.days * DAY_S
