"""What every job shares: the Ray connection, argument parsing, clean error exits, and where
a run's prepared data is."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from rec.config_loader import ConfigError, load_config
from rec.data.textio import DataError

if TYPE_CHECKING:  # jobs.config imports RayConfig from here
    from jobs.config import RunConfig

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


def prepared_dir(cfg: RunConfig, model_dir: str | Path | None = None) -> Path:
    """The prepared-data folder a run reads: `train.prepared_dir` when set, else the `data/`
    a train job keeps beside its export. model_dir: that train job's output_dir (default: this
    run's own output_dir, as in jobs.train and jobs.tune, which prepare it when missing)."""
    if cfg.train.prepared_dir:
        return Path(cfg.train.prepared_dir).resolve()
    return Path(model_dir or cfg.output_dir).resolve() / "data"


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
