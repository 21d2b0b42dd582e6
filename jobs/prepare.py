"""Prepare behavior logs with Ray Data: validate, quarantine, vocabularies, per-user sequences,
leave-last-out splits.

    python -m jobs.prepare --config jobs/configs/beauty.yaml output_dir=outputs/beauty/data

Writes into output_dir: train/ valid/ test/ parquet shards, vocab/, quarantine/, meta.json and
stats.json (on Amazon Beauty: 22,363 users, 12,101 items, 198,502 interactions).
"""

from __future__ import annotations

import json
import sys

from jobs.common import check_locations, init_ray, main_guard, parse_args
from jobs.config import RunConfig
from rec import storage
from rec.ray_prepare import prepare


def run(cfg: RunConfig) -> dict:
    check_locations(cfg)
    init_ray(cfg.ray)
    stats = prepare(cfg.data, cfg.output_dir)
    print(json.dumps(stats, indent=2))
    print(f"[prepare] wrote {storage.absolute(cfg.output_dir)}")
    return stats


def main(argv: list[str] | None = None) -> int:
    return main_guard(lambda: run(parse_args(RunConfig, argv, __doc__)))


if __name__ == "__main__":
    sys.exit(main())
