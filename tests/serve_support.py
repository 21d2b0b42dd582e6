"""Test helpers for the serving tests: a tiny model directory shaped like a train job's output,
a closed-loop HTTP load generator (Load), and the replica-kill and metrics helpers of
tests/test_serve_http.py (Ray imported inside them only).

A randomly initialised tiny Recommender over a small synthetic log is enough for the serving
mechanics (no training): <dir>/data is the prepared data, <dir>/export the serving export.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from rec import artifacts
from rec.data.config import DataConfig
from rec.data.local import prepare_local
from rec.data.splits import load_item_tables
from rec.data.synthetic import SyntheticConfig
from rec.export import save_export
from rec.model import ModelConfig
from rec.recommender import build_recommender
from serve.catalog import Catalog


def make_model_dir(root: Path, seed: int = 0) -> Path:
    """Prepare a ~300-user synthetic log and export an untrained tiny model; returns root."""
    synthetic = SyntheticConfig(
        n_users=300, n_items=400, n_categories=20, events_per_user=15, seed=seed
    )
    data = root / "data"
    prepare_local(DataConfig(format="synthetic", synthetic=synthetic, max_len=20), data)
    tables = load_item_tables(data)
    torch.manual_seed(seed)
    cfg = ModelConfig(size="tiny", hidden_size=32, n_heads=2, max_len=20, dropout=0.0)
    model = build_recommender(cfg, tables).eval()
    export = save_export(model, root / "export", extra={"dataset": "synthetic-test"})
    shutil.copytree(data / "vocab", export / "vocab")
    shutil.copy(data / "meta.json", export / "data_meta.json")
    # Serving fetches only verifiable artefacts (rec.artifacts): a manifest written in place.
    artifacts.write_manifest(export, kind="export", producer="tests.serve_support", config={})
    return root


def make_policy_dir(root: Path, seed: int = 0) -> Path:
    """An untrained RLlib PPO module saved as jobs.train_policy saves one; returns root.

    Serving mechanics only need a loadable policy, not a good one (tests/test_policy.py trains).
    """
    import numpy as np
    from gymnasium.spaces import Box, Discrete
    from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import (
        DefaultPPOTorchRLModule,
    )
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from rl.config import N_LAM_LEVELS, EnvConfig
    from rl.env import OBS_FIELDS
    from rl.policy import MODULE_DIR, write_policy_meta

    torch.manual_seed(seed)
    spec = RLModuleSpec(
        module_class=DefaultPPOTorchRLModule,
        observation_space=Box(0.0, 1.0, (len(OBS_FIELDS),), np.float32),
        action_space=Discrete(N_LAM_LEVELS),
        model_config={"fcnet_hiddens": [16]},
    )
    spec.build().save_to_path(str(root / MODULE_DIR))
    write_policy_meta(root, EnvConfig(), {"algorithm": "untrained (test)"})
    artifacts.write_manifest(root, kind="policy", producer="tests.serve_support", config={})
    return root


class Load:
    """Closed-loop load in a background thread: `workers` concurrent clients (asyncio + httpx)
    post random 5-item histories to `url`/recommend until stopped; each result is (status,
    seconds, Retry-After); `ingress_ms` holds each 200's own `timings_ms.total` (the time inside
    the ingress replica). A client answered 503 pauses `backoff_s` (a polite client would wait
    Retry-After; a short pause keeps the overload on)."""

    def __init__(self, url: str, catalog: Catalog, workers: int, backoff_s: float = 0.05) -> None:
        self.url, self.catalog, self.workers, self.backoff_s = url, catalog, workers, backoff_s
        self.results: list[tuple[int, float, str | None]] = []
        self.ingress_ms: list[float] = []
        self.errors: list[str] = []  # why a request got no HTTP answer (code -1), in order
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=self.workers, max_keepalive_connections=self.workers)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            await asyncio.gather(*(self._client(client, seed) for seed in range(self.workers)))

    async def _client(self, client: httpx.AsyncClient, seed: int) -> None:
        rng, ids = np.random.default_rng(seed), self.catalog.item_ids
        while not self.stop.is_set():
            history = ids[rng.integers(1, self.catalog.n_items, 5)].tolist()
            t = time.perf_counter()
            try:
                resp = await client.post(f"{self.url}/recommend", json={"history": history})
                code, retry = resp.status_code, resp.headers.get("retry-after")
                if code == 200:
                    self.ingress_ms.append(resp.json()["timings_ms"]["total"])
            except httpx.HTTPError as exc:  # no answer: kept (code -1) with its reason
                code, retry = -1, None
                self.errors.append(f"{type(exc).__name__} after {time.perf_counter() - t:.1f} s")
            self.results.append((code, time.perf_counter() - t, retry))
            if code == 503:
                await asyncio.sleep(self.backoff_s)

    def wait_for(self, n: int, timeout_s: float = 60.0) -> None:
        """Poll until `n` more answers came back (a deadline, never a fixed sleep)."""
        target, deadline = len(self.results) + n, time.monotonic() + timeout_s
        while len(self.results) < target:
            assert time.monotonic() < deadline, f"{len(self.results)} < {target} answers"
            time.sleep(0.05)

    def codes(self) -> dict[int, int | list[str]]:
        """Answers per status code; -1 (no HTTP answer) lists each one's reason instead."""
        counts = {c: sum(r[0] == c for r in self.results) for c in {r[0] for r in self.results}}
        return counts | ({-1: self.errors} if self.errors else {})

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


def replica_actor_names(app: str, deployment: str) -> list[str]:
    """The Ray actor names of `deployment`'s live replicas in Serve application `app`, sorted."""
    import ray

    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::") and f"{app}#{deployment}#" in a["name"]
    )


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    dep = serve.status().applications[app].deployments[deployment]
    return int(dep.replica_states.get("RUNNING", 0))


def kill_and_wait_replaced(
    app: str, victims: dict[str, list[str]], timeout_s: float = 120.0
) -> float:
    """Kill the named replicas; poll serve.status until every deployment again runs 2 replicas
    none of which is a victim. Returns the seconds that took."""
    import ray

    t0 = time.monotonic()
    for names in victims.values():
        for name in names:
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    while True:
        done = all(  # two live named replicas, none a victim, and Serve counts both running
            len(live := replica_actor_names(app, dep)) == 2
            and not set(names) & set(live)
            and running_replicas(app, dep) == 2
            for dep, names in victims.items()
        )
        if done:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout_s, {d: running_replicas(app, d) for d in victims}
        time.sleep(0.2)


def prometheus_samples(ray, name: str, app: str) -> dict[str, float]:
    """{tags: value} of one metric of one application, from every node's metrics endpoint."""
    found: dict[str, float] = {}
    for node in ray.nodes():
        text = httpx.get(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + "{") and f'application="{app}"' in line:
                tags, value = line[len(name) + 1 :].rsplit("} ", 1)
                found[tags] = found.get(tags, 0.0) + float(value)
    return found
