"""policy_eval.json / policy_eval.png: the learned policy against every fixed lam and a random
lam on held-out simulated users (numpy + matplotlib, no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rec.logs import progress
from rec.rerank import RerankConfig
from rl.arms import Arm, ArmResult, fixed, paired_gain, play, random_lam
from rl.config import N_LAM_LEVELS, EnvConfig
from rl.simdata import SimulatorData


def evaluate_arms(
    data: SimulatorData,
    cfg: EnvConfig,
    users: np.ndarray,
    policy: Arm,
    episodes: int,
    seed: int,
    rerank_cfg: RerankConfig | None = None,
) -> dict:
    """Every arm plays the same `episodes` sessions of held-out `users` -> the report dict."""
    grid = [i / (N_LAM_LEVELS - 1) for i in range(N_LAM_LEVELS)]
    args = (data, cfg, users)
    arms = {**{lam: fixed(lam) for lam in grid}, "random": random_lam, "policy": policy}
    played = {
        name: play(*args, arm, episodes, seed, rerank_cfg)
        for name, arm in progress(arms.items(), len(arms), "policy evaluation: arms")
    }
    rand, pol = played.pop("random"), played.pop("policy")
    fixed_results = played
    best_lam = max(grid, key=lambda lam: fixed_results[lam].returns.mean())
    best = fixed_results[best_lam]
    gain = paired_gain(pol, best)
    pol_sum, best_sum = pol.summary(), best.summary()
    explorer = data.types.explorer
    return {
        "episodes_per_arm": episodes,
        "held_out_users": int(len(users)),
        "policy": pol_sum | {"by_type": _by_type(pol, explorer)},
        "policy.mean_return": pol_sum["mean_return"],
        "best_fixed.lam": best_lam,
        "best_fixed.mean_return": best_sum["mean_return"],
        "gain_over_best_fixed": gain["gain"],
        "gain_over_best_fixed_paired_ci95": [gain["gain_ci95_low"], gain["gain_ci95_high"]],
        "cis_apart": pol_sum["mean_return"] - pol_sum["ci95"]
        > best_sum["mean_return"] + best_sum["ci95"],
        "gain_over_random": paired_gain(pol, rand)["gain"],
        "random": rand.summary(),
        "fixed": {
            f"{lam:.1f}": r.summary() | {"by_type": _by_type(r, explorer)}
            for lam, r in fixed_results.items()
        },
        "per_type_oracle_gain": _per_type_oracle(fixed_results, explorer, best),
    }


def _by_type(result: ArmResult, explorer: np.ndarray) -> dict[str, float]:
    """Mean return over focused and over explorer users' episodes."""
    is_explorer = explorer[result.users] > 0.5
    return {
        name: float(result.returns[mask].mean()) if mask.any() else float("nan")
        for name, mask in (("focused", ~is_explorer), ("explorer", is_explorer))
    }


def _per_type_oracle(results: dict[float, ArmResult], explorer: np.ndarray, best) -> float:
    """Gain over the best fixed lam of an oracle that knows each user's (hidden) type and
    plays that type's best fixed lam: what a policy reading the type perfectly could get
    without adapting within the session."""
    total = 0.0
    for typ in (False, True):
        total += max(
            float(r.returns[(explorer[r.users] > 0.5) == typ].sum()) for r in results.values()
        )
    return total / float(best.returns.sum()) - 1.0


def write_report(report: dict, curve: list[dict], out_dir: Path) -> tuple[Path, Path]:
    """policy_eval.json (report + training curve) and policy_eval.png."""
    json_path = out_dir / "policy_eval.json"
    json_path.write_text(json.dumps(report | {"training_curve": curve}, indent=2) + "\n")
    png_path = out_dir / "policy_eval.png"
    _plot(report, curve, png_path)
    return json_path, png_path


def _plot(report: dict, curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    lams = [float(k) for k in report["fixed"]]
    means = [v["mean_return"] for v in report["fixed"].values()]
    cis = [v["ci95"] for v in report["fixed"].values()]
    ax.errorbar(lams, means, yerr=cis, fmt="o-", capsize=3, label="fixed lam (95% CI)")
    pol = report["policy"]
    ax.axhline(pol["mean_return"], color="C3", label=f"policy (mean lam {pol['mean_lam']:.2f})")
    ax.axhspan(
        pol["mean_return"] - pol["ci95"], pol["mean_return"] + pol["ci95"], color="C3", alpha=0.15
    )
    rnd = report["random"]["mean_return"]
    ax.axhline(rnd, color="grey", linestyle="--", label="random lam")
    ax.set_xlabel("lam (DPP diversity weight)")
    ax.set_ylabel("mean episode return")
    ax.set_title(f"held-out users, {report['episodes_per_arm']} episodes per arm")
    ax.legend(fontsize=8)
    rows = [c for c in curve if "episode_return_mean" in c]  # iteration 0: the warm start
    ax2.plot([c["iteration"] for c in rows], [c["episode_return_mean"] for c in rows])
    tuned = [c for c in curve if "tune_return" in c]
    ax2.plot([c["iteration"] for c in tuned], [c["tune_return"] for c in tuned], "o--",
             label="tune users (selection)")  # fmt: skip
    ax2.legend(fontsize=8)
    ax2.set_xlabel("PPO iteration")
    ax2.set_ylabel("training episode return (mean)")
    ax2.set_title("training curve")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
