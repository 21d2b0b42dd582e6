"""DataConfig: where the raw log is, how to read it, and how to turn it into sequences."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from rec.data.synthetic import SyntheticConfig


@dataclass
class DataConfig:
    # Source format: a name registered in rec/data/readers.py: FORMATS (taobao, amazon,
    # movielens, parquet, synthetic); see there for what each expects at `path`.
    format: str = "synthetic"
    # File or directory to read. Amazon: the sequences file (`Beauty.txt[.gz]`), attributes
    # found beside it by name. MovieLens: the ml-100k directory or its tarball. Synthetic: where
    # the generated log is written (default: <output_dir>/raw). A local path or a URI
    # (s3://bucket/logs/, gs://, abfs://; rec/storage.py), as every path setting.
    path: str | None = None
    # Generator settings, used when format == "synthetic".
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # Keep events with min_timestamp <= timestamp < max_timestamp (unix seconds or "YYYY-MM-DD",
    # UTC); others are quarantined. Ignored where timestamps are positions (Amazon).
    min_timestamp: int | str | None = None
    max_timestamp: int | str | None = None
    # Longest input history a model sees; sequences keep the most recent max_len + 2 events so
    # that train, validation and test inputs each hold up to max_len events.
    max_len: int = 50
    # Users with fewer events cannot be split leave-last-out (train needs 1, plus valid + test).
    min_user_events: int = 3
    # Iterated k-core: keep users and items with at least k events each (None: no filtering).
    kcore: int | None = None
    # Drop exact duplicate events (same user, item, behavior, timestamp).
    dedupe: bool = True
    # Bytes of uncompressed text per read task (larger files are split at line boundaries).
    chunk_mb: int = 32
    # Hash partitions of users for the per-user stage (None: from the input size).
    num_buckets: int | None = None

    def min_events(self) -> int:
        """Fewest events a user keeps in the output (k-core raises the floor)."""
        return max(self.min_user_events, self.kcore or 0)

    def window(self) -> tuple[int | None, int | None]:
        """The timestamp window as unix seconds."""
        return _to_unix(self.min_timestamp, "data.min_timestamp"), _to_unix(
            self.max_timestamp, "data.max_timestamp"
        )

    def __post_init__(self) -> None:
        from rec.data.readers import FORMATS  # the registry imports this module

        if self.format not in FORMATS:
            raise ValueError(f"data.format {self.format!r} is not one of {', '.join(FORMATS)}")
        if FORMATS[self.format].generate is None and not self.path:
            raise ValueError(f"data.path is required for data.format={self.format!r}")
        if self.max_len < 1:
            raise ValueError(f"data.max_len must be >= 1, got {self.max_len!r}")
        if self.min_user_events < 3:
            raise ValueError(f"data.min_user_events must be >= 3, got {self.min_user_events!r}")
        if self.kcore is not None and self.kcore < 1:
            raise ValueError(f"data.kcore must be >= 1 or null, got {self.kcore!r}")
        if self.chunk_mb < 1:
            raise ValueError(f"data.chunk_mb must be >= 1, got {self.chunk_mb!r}")
        self.window()


def _to_unix(value: int | str | None, key: str) -> int | None:
    if value is None or isinstance(value, int):
        return value
    try:
        day = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{key}: {value!r} is neither unix seconds nor an ISO date") from None
    if day.tzinfo is None:
        day = day.replace(tzinfo=dt.timezone.utc)
    return int(day.timestamp())
