"""The learned lam policy: its training config and the inference wrapper Serve uses.

    policy = LamPolicy.load("outputs/policy")       # policy_dir of jobs.train_policy
    lam = policy.choose(obs)                        # (B, 12) float32 -> (B,) lam in [0, 1]

policy_dir is an artefact (rec/artifacts.py, kind "policy"; jobs.train_policy publishes a new
version v-.../ into its output_dir and switches CURRENT) whose files are `rl_module/` (an
RLlib RLModule checkpoint, `RLModule.save_to_path`: loads without the Algorithm, its env
runners or the simulator) and `policy.json` (the environment config the policy was trained
under, the action mode and the observation layout). Loading verifies every file's sha256.
This module imports `ray.rllib` only inside `LamPolicy.load`: the RLModule is RLlib's format.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rec import artifacts, storage
from rec.config_loader import from_dict
from rl.config import N_LAM_LEVELS, EnvConfig
from rl.env import OBS_FIELDS
from rl.sensitivity import SensitivityConfig

POLICY_FORMAT = "raydiv-policy/1"
MODULE_DIR = "rl_module"
POLICY_FILE = "policy.json"
# A warm-started policy's probability of its lam (rl.policy.warm_start_module): greedy it is
# that constant; sampled, PPO still tries each other lam 7.5 % of the time. The logit margin
# (1.2 nats) is what PPO must cross to change the greedy choice: at 0.5 (2.3 nats) the
# contextual test's policy had not moved after 6 iterations.
WARM_START_PROB = 0.25


@dataclass
class PolicyConfig:
    """PPO on RLlib's new API stack (jobs/train_policy.py)."""

    # Training iterations (each collects train_batch_size env steps, then optimises); at
    # most: early stopping usually ends a seed after 8 (eval_every * patience). 20 keeps
    # the job within ~15 min (module docstring of jobs/train_policy.py).
    iterations: int = 20
    # Env steps per iteration (per learner); 1000 with the warm start (session 10: 2000
    # took the job past 15 min on the shared 2-core machine).
    train_batch_size: int = 1000
    minibatch_size: int = 250
    num_epochs: int = 8  # passes over each iteration's batch
    lr: float = 3e-4
    gamma: float = 0.95  # sessions are short (a few slates); long horizons only add variance
    entropy_coeff: float = 0.01  # keeps the 11-way lam choice exploring early on
    hidden: list[int] = field(default_factory=lambda: [64, 64])  # policy and value MLPs
    # Env runner actors (0: sample in the learner's process; 1 suits 2 CPUs).
    num_env_runners: int = 1
    # Held-out users (never seen in training), halved into tune and test: 0.4 = 60/20/20.
    eval_fraction: float = 0.4
    # Episodes per arm in the evaluation (fixed seeds, the same for every arm): at least
    # this many, and at least episodes_per_user per user of the evaluated set, up to
    # max_episodes (`episodes`). A cluster CI over few users is dominated by within-user
    # noise until each user has tens of episodes: on the Taobao slice (23 test users) the
    # paired CI of two fixed lams halves from 300 to 3000 episodes, and the best fixed lam
    # chosen on 300 moved with the episode seed. Large sets are covered by the cap.
    eval_episodes: int = 500
    episodes_per_user: int = 50
    max_episodes: int = 1000
    # States whose per-request best lam is measured by rollouts for the ladder's context
    # ceiling (rl/ladder.py, on the held-out users); 0 skips the ladder.
    ladder_states: int = 300
    ladder_rollouts: int = 4  # rollouts per state and lam (their mean: less noise)
    seed: int = 0
    # PPO runs with seeds seed, seed + 1, ...: each reported in the ladder, the one with the
    # best tune return published.
    seeds: int = 5
    # Early stopping on the tune users: score every eval_every iterations on tune_episodes
    # seeded episodes, stop after `patience` scores without improvement (rl/train.py).
    eval_every: int = 2
    tune_episodes: int = 150  # the floor; sized to the tune users as eval_episodes is
    patience: int = 4
    # Start every seed at the best fixed lam of the tune users (the ladder's best_fixed
    # choice) and score that constant as iteration 0: PPO only replaces it with an iterate
    # whose tune return beats it with a paired CI above 0 (rl/train.py). Without it PPO
    # must first find the best constant from a uniform policy in a world whose returns
    # are flat in lam, and lost 6-15 % to it (issue 14, sessions 8-9).
    warm_start: bool = True
    lr_final_fraction: float = 0.1  # lr decays linearly to lr * this; entropy_coeff to 0
    # Test episodes of the ladder's full-information oracle (11 rollouts per slate).
    oracle_episodes: int = 100
    # The ladder without PPO across the unidentified parameters (rl/sensitivity.py);
    # sensitivity.w_exp=[] skips it.
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)

    def __post_init__(self) -> None:
        for name in ("iterations", "train_batch_size", "minibatch_size", "num_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"policy.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.minibatch_size > self.train_batch_size:
            raise ValueError("policy.minibatch_size must be <= policy.train_batch_size")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"policy.eval_fraction must be in (0, 1): {self.eval_fraction!r}")
        if self.ladder_states < 0:
            raise ValueError(f"policy.ladder_states must be >= 0, got {self.ladder_states!r}")
        if min(self.seeds, self.eval_every, self.tune_episodes, self.patience) < 1:
            raise ValueError("policy.seeds, eval_every, tune_episodes, patience must be >= 1")
        if not 0.0 <= self.lr_final_fraction <= 1.0:
            raise ValueError(
                f"policy.lr_final_fraction must be in [0, 1]: {self.lr_final_fraction}"
            )
        if self.eval_episodes < 2 or self.num_env_runners < 0:
            raise ValueError("policy.eval_episodes must be >= 2 and num_env_runners >= 0")
        if self.episodes_per_user < 0 or self.max_episodes < 2:
            raise ValueError("policy.episodes_per_user must be >= 0 and max_episodes >= 2")

    def episodes(self, n_users: int, floor: int | None = None) -> int:
        """Episodes per arm for an evaluation of n_users users: at least `floor`
        (eval_episodes), episodes_per_user per user, at most max(floor, max_episodes)."""
        floor = self.eval_episodes if floor is None else floor
        return max(floor, min(self.episodes_per_user * int(n_users), self.max_episodes))


class LamPolicy:
    """An RLModule that maps the 12-dim observation to lam, deterministically (greedy)."""

    def __init__(self, module, env_cfg: EnvConfig) -> None:
        self.module = module
        self.env_cfg = env_cfg

    @classmethod
    def load(cls, policy_dir: str | Path) -> LamPolicy:
        from ray.rllib.core.rl_module.rl_module import RLModule

        # The current version, copied once if remote, every file checked against its manifest.
        policy_dir, _ = artifacts.fetch_verified(str(policy_dir), storage.default_cache())
        meta_path, module_path = policy_dir / POLICY_FILE, policy_dir / MODULE_DIR
        if not meta_path.is_file() or not module_path.is_dir():
            raise ValueError(
                f"policy_dir {str(policy_dir)!r} lacks {POLICY_FILE} or {MODULE_DIR}/ "
                "(run jobs.train_policy)"
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != POLICY_FORMAT or meta.get("obs_fields") != list(OBS_FIELDS):
            raise ValueError(f"{str(meta_path)!r} is not a {POLICY_FORMAT} policy for this env")
        env_cfg = from_dict(EnvConfig, meta["env"])
        return cls(RLModule.from_checkpoint(str(module_path.resolve())), env_cfg)

    def choose(self, obs: np.ndarray) -> np.ndarray:
        """(B, 12) observations -> (B,) float64 lam in [0, 1], the module's most likely action."""
        import torch
        from ray.rllib.core.columns import Columns

        obs = np.asarray(obs, dtype=np.float32)
        if obs.ndim != 2 or obs.shape[1] != len(OBS_FIELDS):
            raise ValueError(f"obs must have shape (B, {len(OBS_FIELDS)}), got {obs.shape}")
        with torch.no_grad():
            out = self.module.forward_inference({Columns.OBS: torch.from_numpy(obs)})
        logits = out[Columns.ACTION_DIST_INPUTS].numpy()  # discrete (B, 11); Box (B, 2)
        if self.env_cfg.action_mode == "discrete":
            return logits.argmax(1).astype(np.float64) / (N_LAM_LEVELS - 1)
        return np.clip(logits[:, 0].astype(np.float64), 0.0, 1.0)  # the Gaussian's mean

    def arm(self):
        """The policy as an `rl.arms.Arm` (one observation at a time)."""
        return lambda obs, rng: float(self.choose(obs[None])[0])


def warm_start_module(module, lam: float, action_mode: str) -> None:
    """Make a PPO RLModule's policy the constant `lam`, in place: the policy head's last layer
    gets zero weights (its output no longer depends on the observation; gradients still reach
    them, so PPO can learn a context from there) and a bias that puts WARM_START_PROB on lam's
    grid level (discrete) or the Gaussian's mean at lam (continuous, log std kept)."""
    import torch

    last = policy_head_layer(module)
    with torch.no_grad():
        last.weight.zero_()
        if action_mode == "discrete":
            other = math.log((1.0 - WARM_START_PROB) / (N_LAM_LEVELS - 1))
            last.bias.fill_(other)
            last.bias[int(round(lam * (N_LAM_LEVELS - 1)))] = math.log(WARM_START_PROB)
        else:
            last.bias[0] = float(lam)


def policy_head_layer(module):
    """The last Linear layer of a PPO RLModule's policy head (`module.pi`): its outputs are
    the action logits (discrete) or the Gaussian's parameters (continuous)."""
    import torch

    return [m for m in module.pi.modules() if isinstance(m, torch.nn.Linear)][-1]


def write_policy_meta(policy_dir: Path, env_cfg: EnvConfig, extra: dict) -> Path:
    """policy.json beside the RLModule checkpoint."""
    meta = {
        "format": POLICY_FORMAT,
        "obs_fields": list(OBS_FIELDS),
        "env": asdict(env_cfg),
        **extra,
    }
    path = policy_dir / POLICY_FILE
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path
