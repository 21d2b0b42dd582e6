"""The simulator's world built from a trained model: `build_world(model_dir, cfg)` (no Ray).

    cfg = WorldConfig(n_users=3000)
    world = build_world("outputs/beauty", cfg)        # arrays + calibration summary
    save_world(world, "out/world.npz"); data = load_world("out/world.npz", TypeConfig())

What comes from where (rl/simdata.py names the arrays):
  - users: a seeded sample of the prepared data's users; their history is everything but the
    last (test) event, i.e. the ranker's view of a held-out user at test time;
  - candidates, scores: the trained ranker's (`score_next`) top-N items not in the history;
  - diversity_head: the ranker's diversity head for that history;
  - item_vectors: the ranker's item embeddings (what the DPP's cosine similarity uses, as in
    serving); item_categories: the prepared vocabulary;
  - ground truth: weighted ALS fitted on every user's FULL sequence, test event included
    (rl/groundtruth.py). A different model family with information the ranker never saw, so
    the simulated user rewards what the user actually did, not agreement with the ranker.

A world is saved as one .npz of plain arrays (no pickle) so every RLlib env runner loads the
same world from disk instead of re-running the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from rec import artifacts, storage
from rec.data.batch import SCORE_BATCH_SIZE, Batch, collate, length_batches
from rec.data.splits import load_examples, load_item_tables
from rec.export import load_export
from rec.logs import progress
from rl.calibrate import Calibration, SequenceLog, calibrate, load_prepared
from rl.config import TypeConfig
from rl.groundtruth import ALSConfig, GroundTruth, fit_als
from rl.simdata import SimulatorData, recent_items
from rl.users import UserTypes

ARRAYS = (
    "candidates",
    "scores",
    "diversity_head",
    "history_items",
    "item_categories",
    "item_vectors",
    "user_factors",
    "item_factors",
)


@dataclass
class WorldConfig:
    """How the simulator's world is cut from a trained model and its prepared data."""

    # Users sampled for the world (None: all). Sessions are cheap; scoring all users is not.
    n_users: int | None = 3000
    # Ranker candidates per user, N >= env.n_candidates (the env takes the best n_candidates).
    n_candidates: int = 200
    # Recent history items kept per user for the observation and the user's type.
    history_len: int = 50
    # Scoring batch size (users per forward pass).
    batch_size: int = SCORE_BATCH_SIZE
    # Ground-truth matrix factorisation (fitted on full sequences).
    als: ALSConfig = field(default_factory=ALSConfig)
    # Seed of the user sample.
    seed: int = 0
    # The simulated user: "session" fits rl/session_user.py to the log (rl/session_fit.py,
    # provenance in world.json); "types" calibrates the focused/explorer user (rl/calibrate.py).
    user_model: str = "session"
    # Simulated sessions (lam = 0, held-out users) behind realism.json; 0 skips the report.
    realism_episodes: int = 2000
    # Episodes per bisection step when the session model's moments are fitted (rl/moments.py),
    # and coordinate rounds over its parameters (rl/moments.py BOUNDS).
    fit_episodes: int = 300
    fit_rounds: int = 2

    def __post_init__(self) -> None:
        if self.n_users is not None and self.n_users < 2:
            raise ValueError(f"world.n_users must be >= 2 or null, got {self.n_users!r}")
        if self.user_model not in ("session", "types"):
            raise ValueError(f"world.user_model must be session|types, got {self.user_model!r}")
        if self.fit_episodes < 1 or self.fit_rounds < 1:
            raise ValueError(
                f"world.fit_episodes and fit_rounds must be >= 1: {self.fit_episodes!r}"
            )
        if self.realism_episodes < 0:
            raise ValueError(f"world.realism_episodes must be >= 0: {self.realism_episodes!r}")
        if self.n_candidates < 1 or self.history_len < 1 or self.batch_size < 1:
            raise ValueError(
                "world.n_candidates, world.history_len and world.batch_size must be >= 1"
            )


@dataclass
class World:
    """Arrays for SimulatorData (user types are drawn when loaded) plus what calibrates it."""

    arrays: dict[str, np.ndarray]
    calibration: Calibration
    users: np.ndarray  # (U,) user indices into the prepared data (row order of the arrays)
    log: SequenceLog | None = None  # the prepared data's full sequences (not saved)


def build_world(model_dir: str | Path, cfg: WorldConfig) -> World:
    """Score sampled users with the exported ranker and fit the ground truth (see module doc)."""
    # Both verified against their manifests (sha256) first: one line naming a bad file.
    prepared = artifacts.verify(storage.join(model_dir, "data")).path
    export, _ = artifacts.fetch_verified(storage.join(model_dir, "export"), storage.default_cache())
    model = load_export(export)
    tables = load_item_tables(prepared)
    examples = load_examples(prepared, "test", model.cfg.max_len)  # sorted by user_id
    log = load_prepared(prepared)  # full sequences, also sorted by user_id
    n_all = len(examples["items"])
    rng = np.random.default_rng(cfg.seed)
    users = np.arange(n_all)
    if cfg.n_users is not None and cfg.n_users < n_all:
        users = np.sort(rng.choice(n_all, cfg.n_users, replace=False))
    rows = collate(examples).take(users)  # Batch (U, max_len)
    cands, scores, head = _score(model, rows, cfg.n_candidates, cfg.batch_size)
    truth = fit_als(log.items, tables.n_items, cfg.als)
    vectors = model.model.item_embeddings().detach().float().numpy()  # (n_items + 1, D)
    arrays = {
        "candidates": cands,
        "scores": scores,
        "diversity_head": head,
        "history_items": recent_items([log.items[u][:-1] for u in users], cfg.history_len),
        "item_categories": tables.categories.astype(np.int64),
        "item_vectors": vectors.astype(np.float32),
        "user_factors": truth.user_factors[users],
        "item_factors": truth.item_factors,
    }
    return World(arrays, calibrate(log), users, log)


@torch.no_grad()
def _score(
    model, rows: Batch, n: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (U, n) candidates (history excluded), (U, n) scores, (U,) diversity head, in the
    row order of `rows` (batches come sorted by length; their row indices map them back)."""
    cands = np.zeros((rows.size, n), np.int64)
    scores = np.zeros((rows.size, n), np.float32)
    head = np.zeros(rows.size, np.float32)
    n_batches = -(-rows.size // batch_size)
    for idx, batch in progress(length_batches(rows, batch_size), n_batches, "world: scoring"):
        s = model.score_next(batch)  # (B, n_items + 1), column 0 = -inf
        s.scatter_(1, batch.items, float("-inf"))  # exclude the history (and padding 0)
        top = torch.topk(s, n, dim=1)
        cands[idx] = top.indices.numpy()
        scores[idx] = top.values.numpy()
        head[idx] = model.diversity(batch).numpy()
    return cands, scores, head


def save_world(world: World, path: str | Path) -> Path:
    """One .npz of plain arrays (loaded with allow_pickle=False)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, users=world.users, **world.arrays)
    return path


def load_world(path: str | Path, types: TypeConfig, seed: int = 0) -> SimulatorData:
    """A saved world -> SimulatorData. User types: drawn from the histories with `types` and
    `seed`, unless the file fixes them (arrays `types.<field>`, e.g. a hand-made test world)."""
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ARRAYS if k not in z.files]
        if missing:
            raise ValueError(f"world file {str(path)!r} lacks arrays {missing}")
        a = {k: z[k] for k in ARRAYS}
        pop = z["item_popularity"] if "item_popularity" in z.files else None
        fixed = {
            f.name: z[f"types.{f.name}"] for f in fields(UserTypes) if f"types.{f.name}" in z.files
        }
    truth = GroundTruth(a.pop("user_factors"), a.pop("item_factors"))
    data = SimulatorData.build(ground_truth=truth, types=types, seed=seed, **a)
    data.item_popularity = pop
    if fixed:
        data.types = UserTypes(**fixed)
    return data


_WORLDS: dict[tuple[str, int], SimulatorData] = {}


def make_env(spec: dict):
    """An env from a plain-dict spec (what RLlib passes its env runners as env_config):
    {"world": .npz path, "env": EnvConfig as a dict, "rerank": RerankConfig as a dict,
    "users": [user rows], "seed": int}.
    A runner process loads each world once."""
    from rec.config_loader import from_dict
    from rec.rerank import RerankConfig
    from rl.config import EnvConfig
    from rl.env import DiversityEnv

    cfg = from_dict(EnvConfig, dict(spec["env"]))
    rerank_cfg = from_dict(RerankConfig, dict(spec.get("rerank", {})))
    key = (str(spec["world"]), int(spec.get("seed", 0)))
    if key not in _WORLDS:
        local = storage.local_copy(key[0], storage.default_cache())  # a URI: copied once
        _WORLDS[key] = load_world(local, cfg.types, seed=key[1])
    users = spec.get("users")
    users = None if users is None else np.asarray(users)
    return DiversityEnv(_WORLDS[key], cfg, users=users, rerank_cfg=rerank_cfg)
