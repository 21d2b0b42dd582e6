"""The canonical event schema every reader produces, and the behavior tokens models see.

One row = one event:

    user_id       int64          raw user id from the source
    item_id       int64          raw item id from the source
    category_ids  list<int64>    raw category ids of the item (Taobao: one; Amazon: brand and
                                 sub-categories; MovieLens: genre indices 0..18); may be empty
    behavior      string         pv | cart | fav | buy (Taobao), review (Amazon), rating (MovieLens)
    value         float32, null  the rating for `rating` events, else null
    timestamp     int64          unix seconds, or the event's position in the user's sequence
                                 where the source keeps only the order (Amazon S3-Rec files)
    seq_no        int64          the event's global read order; breaks timestamp ties so that
                                 sorting is deterministic and keeps the source's order

Quarantined rows keep the raw text, where it came from and why it was set aside.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

BEHAVIORS = ("pv", "cart", "fav", "buy", "review", "rating")

EVENT_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("category_ids", pa.list_(pa.int64())),
        ("behavior", pa.string()),
        ("value", pa.float32()),
        ("timestamp", pa.int64()),
        ("seq_no", pa.int64()),
    ]
)

# Columns a user-supplied canonical parquet file must have (seq_no and value are optional).
REQUIRED_PARQUET_COLUMNS = ("user_id", "item_id", "category_ids", "behavior", "timestamp")

QUARANTINE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),  # file the row came from
        ("offset", pa.int64()),  # byte offset of the line (text) or row index (parquet)
        ("raw", pa.string()),  # the line as read, or the row rendered as text
        ("reason", pa.string()),  # one of QUARANTINE_REASONS
    ]
)

QUARANTINE_REASONS = (
    "field_count",  # wrong number of fields (wrong delimiter, ragged line)
    "missing_field",  # an empty field
    "bad_number",  # a field that must be a number is not one (or overflows int64)
    "unknown_behavior",  # behavior not in BEHAVIORS / Taobao's pv, cart, fav, buy
    "timestamp_out_of_window",  # outside [data.min_timestamp, data.max_timestamp]
    "bad_rating",  # MovieLens rating outside 1..5
)

# Behavior tokens the model embeds. 0 pads. Ratings split at 4 stars into like/dislike so the
# relevance head has a graded target on MovieLens as on Taobao's funnel.
TOKEN_PAD = 0
BEHAVIOR_TOKENS = {
    "pv": 1,
    "cart": 2,
    "fav": 3,
    "buy": 4,
    "review": 5,
    "rating_low": 6,
    "rating_high": 7,
}
N_BEHAVIOR_TOKENS = len(BEHAVIOR_TOKENS) + 1
# Tokens that count as strong engagement for the relevance head.
ENGAGED_TOKENS = (
    BEHAVIOR_TOKENS["cart"],
    BEHAVIOR_TOKENS["fav"],
    BEHAVIOR_TOKENS["buy"],
    BEHAVIOR_TOKENS["rating_high"],
)
RATING_HIGH_THRESHOLD = 4.0


def engaged_mask() -> np.ndarray:
    """(N_BEHAVIOR_TOKENS,) bool: which behavior tokens are strong engagement."""
    mask = np.zeros(N_BEHAVIOR_TOKENS, dtype=bool)
    mask[list(ENGAGED_TOKENS)] = True
    return mask
