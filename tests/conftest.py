"""Shared fixtures: real data paths, one local Ray per test session (2 CPUs, loopback)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RECDIV_DATA", ROOT.parent / "shared" / "data"))
BEAUTY = DATA / "amazon-beauty" / "Beauty.txt.gz"
TAOBAO = DATA / "taobao-userbehavior-mini" / "UserBehavior_10k_114users.csv.gz"
MOVIELENS = DATA / "ml-100k" / "ml-100k.tar.gz"

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set RECDIV_DATA)")
    return path


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray on 127.0.0.1 with 2 CPUs, shared by every test that needs one."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()
