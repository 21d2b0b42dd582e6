"""Test helpers for the serving tests: a tiny model directory shaped like a train job's output.

A randomly initialised tiny Recommender over a small synthetic log is enough for the serving
mechanics (no training): <dir>/data is the prepared data, <dir>/export the serving export.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from rec import artifacts
from rec.data.config import DataConfig
from rec.data.local import prepare_local
from rec.data.splits import load_item_tables
from rec.data.synthetic import SyntheticConfig
from rec.export import save_export
from rec.model import ModelConfig
from rec.recommender import build_recommender


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
