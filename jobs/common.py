"""What every job shares: the Ray connection, argument parsing, clean error exits, and where
a run's prepared data is."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from rec import artifacts, storage
from rec.artifacts import ArtifactError
from rec.config_loader import ConfigError, load_config
from rec.data.textio import DataError
from rec.storage import StorageError

if TYPE_CHECKING:  # jobs.config imports RayConfig from here
    from jobs.config import RunConfig

T = TypeVar("T")


# Ray Train's PlacementGroupCleaner polls the state API once a second; a job-started local Ray
# without the dashboard has no state API, so it logs "Failed to query Ray Train Controller actor
# state" every second of a training run. Its placement groups die with that local Ray anyway:
# drop exactly that line from what workers forward to the job's console (Ray's documented log
# filter; the session's log files keep it). Ray reads it when imported: set before any job
# imports ray (every job imports this module first). RAY_DEDUP_LOGS_SKIP_REGEX= shows it again.
os.environ.setdefault(
    "RAY_DEDUP_LOGS_SKIP_REGEX", r"Failed to query Ray Train Controller actor state"
)
# A single-node Ray takes 127.0.0.1 as its node address (Ray's macOS/Windows default), and Ray
# binds its servers to the node address: the setting that keeps a job-started Ray on loopback.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class RayConfig:
    # Cluster to join: None joins RAY_ADDRESS if set (e.g. under `ray job submit`), else starts
    # a local Ray inside the job; "auto" joins a running `ray start` cluster.
    address: str | None = None
    # CPUs of a local Ray started by the job (None: all of this machine's).
    num_cpus: int | None = None
    # Address a job-started local Ray binds every server to: 127.0.0.1 keeps it on this machine
    # (single-node); a LAN address exposes it to the network (then enable Ray's token auth).
    local_ip: str = "127.0.0.1"
    # Ray's dashboard for a job-started local Ray (costs ~1 s and memory at start; on local_ip).
    include_dashboard: bool = False


def start_local_ray(cfg: RayConfig, **init_kwargs: Any) -> None:
    """Start a Ray inside this process's job, its servers bound to `cfg.local_ip` only.

    `ray.init(_node_ip_address="127.0.0.1")` alone does not do it: Ray swaps a loopback address
    for the machine's LAN address and binds GCS, raylet, agents and workers there or to every
    interface. In single-node mode Ray keeps 127.0.0.1 (tests/test_loopback.py lists the
    listening sockets to check it)."""
    import ray
    from ray._private import ray_constants

    kwargs: dict[str, Any] = {"num_cpus": cfg.num_cpus, "include_dashboard": cfg.include_dashboard}
    if cfg.include_dashboard:
        kwargs["dashboard_host"] = cfg.local_ip
    if cfg.local_ip not in LOOPBACK:
        ray.init(**kwargs, _node_ip_address=cfg.local_ip, **init_kwargs)
        return
    # Only while Ray starts: the processes it starts now (GCS, raylet, agents; workers are the
    # raylet's children) inherit it, and this process reads the flag imported with ray. Not
    # left set: a later `ray start --address` from this process would refuse to join a cluster.
    saved_env, saved_flag = os.environ.get(LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(**kwargs, **init_kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = saved_env


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
    start_local_ray(cfg, log_to_driver=True)


def prepared_dir(cfg: RunConfig, model_dir: str | Path | None = None) -> str:
    """The prepared-data folder a run reads: `train.prepared_dir` when set, else the `data/`
    a train job keeps beside its export. model_dir: that train job's output_dir (default: this
    run's own output_dir, as in jobs.train and jobs.tune, which prepare it when missing).
    A local path (made absolute) or a URI, as given: never `Path(uri)`."""
    if cfg.train.prepared_dir:
        return storage.absolute(cfg.train.prepared_dir)
    return storage.join(storage.absolute(model_dir or cfg.output_dir), "data")


def verified_prepared(cfg: RunConfig, model_dir: str | Path | None = None) -> str:
    """The current version of the run's prepared data (`prepared_dir`), every file checked
    against its MANIFEST.json (sha256): what Ray readers on any node then read. A missing,
    truncated or altered file: ArtifactError naming it (exit 2)."""
    return artifacts.verify(prepared_dir(cfg, model_dir)).path


def verified_export(model_dir: str | Path) -> Path:
    """A verified local copy of `<model_dir>/export`'s current version (a local version is
    read in place): what load_export and the vocabulary readers open."""
    export = storage.join(storage.absolute(model_dir), "export")
    return artifacts.fetch_verified(export, storage.default_cache())[0]


def check_locations(cfg: RunConfig) -> None:
    """At job start: every path setting that is set must be usable -- a URI's bucket reachable
    with the credentials found (StorageError, one line naming it, exit 2 via main_guard)."""
    for value in (
        cfg.data.path,
        cfg.output_dir,
        cfg.model_dir,
        cfg.policy_dir,
        cfg.train.resume_from,
        cfg.train.prepared_dir,
    ):
        if value:
            storage.check(value)


def config_sections(cls: type) -> str:
    """The top-level keys of a run config, each with the comment above its field."""
    notes: dict[str, str] = {}
    comment: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        if text.startswith("#"):
            comment.append(text.lstrip("# "))
            continue
        name = text.split(":", 1)[0]
        if name.isidentifier() and line.startswith("    ") and not line.startswith("     "):
            notes[name] = " ".join(comment)
        comment = []
    rows = []
    for f in dataclasses.fields(cls):
        wrapped = textwrap.wrap(notes.get(f.name, ""), width=86) or [""]
        rows.append(f"  {f.name:<12}{wrapped[0]}")
        rows += [" " * 14 + more for more in wrapped[1:]]
    return "\n".join(rows)


def parse_args(cls: type[T], argv: list[str] | None, description: str) -> T:
    """`--config FILE` plus `a.b=value` overrides -> a typed run config. `--help` shows the
    job's docstring as written (its example commands) and the config's sections."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config sections (YAML top-level keys; override any field as section.field=value):\n"
        + config_sections(cls),
    )
    parser.add_argument("--config", required=True, help="YAML run config (jobs/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="a.b=value overrides, applied last")
    args = parser.parse_args(argv)
    return load_config(cls, args.config, args.overrides)


def main_guard(fn: Callable[[], Any]) -> int:
    """Run a job; input, config, storage and artefact errors print one line and exit 2, no
    traceback."""
    try:
        fn()
    except (ConfigError, DataError, StorageError, ArtifactError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
