"""What every job shares: the Ray connection, argument parsing, clean error exits."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from rec.config import ConfigError, load_config
from rec.data.textio import DataError

T = TypeVar("T")


@dataclass
class RayConfig:
    # Cluster to join: None joins RAY_ADDRESS if set (e.g. under `ray job submit`), else starts
    # a local Ray inside the job; "auto" joins a running `ray start` cluster.
    address: str | None = None
    # CPUs of a local Ray started by the job (None: all of this machine's).
    num_cpus: int | None = None
    # Keep a job-started local Ray on loopback (no network exposure on a laptop or CI box).
    local_ip: str = "127.0.0.1"
    # Ray's dashboard for a job-started local Ray (costs ~1 s and memory at start).
    include_dashboard: bool = False


def init_ray(cfg: RayConfig) -> None:
    """Connect to (or start) Ray once per process; quiet and on loopback when local."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(
        num_cpus=cfg.num_cpus,
        include_dashboard=cfg.include_dashboard,
        _node_ip_address=cfg.local_ip,
        log_to_driver=True,
    )


def parse_args(cls: type[T], argv: list[str] | None, description: str) -> T:
    """`--config FILE` plus `a.b=value` overrides -> a typed run config."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML run config (jobs/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="a.b=value overrides, applied last")
    args = parser.parse_args(argv)
    return load_config(cls, args.config, args.overrides)


def main_guard(fn: Callable[[], Any]) -> int:
    """Run a job; input and config errors print one line and exit 2, no traceback."""
    try:
        fn()
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
