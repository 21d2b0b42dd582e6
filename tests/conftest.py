"""Shared fixtures: real data paths, one local Ray per test session (2 CPUs, loopback)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RECDIV_DATA", ROOT.parent / "shared" / "data"))
BEAUTY = DATA / "amazon-beauty" / "Beauty.txt.gz"
TAOBAO = DATA / "taobao-userbehavior-mini" / "UserBehavior_10k_114users.csv.gz"
MOVIELENS = DATA / "ml-100k" / "ml-100k.tar.gz"

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


# Property tests draw the same examples on every run (a failure reproduces; CI never flakes on
# a rare draw): derandomize seeds hypothesis from each test's source. No deadline: the machine
# is small and shared, so per-example timing is noise.
settings.register_profile("repo", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("repo")


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Whatever a test or fixture sets torch's intra-op thread count to, the next test starts
    from the process default again."""
    import torch

    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set RECDIV_DATA)")
    return path


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray on 127.0.0.1 with 2 CPUs and its dashboard, shared by every test that needs
    one."""
    import ray

    from tests.cluster_helpers import start_session_ray

    if not ray.is_initialized():  # bound to 127.0.0.1 as a job's (tests/test_loopback.py)
        start_session_ray()
    yield ray
    ray.shutdown()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for the test, restored after: the test machine is small and shared,
    and one thread keeps timings predictable (`pytest.mark.usefixtures("one_torch_thread")`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
