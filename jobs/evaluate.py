r"""The relevance-diversity frontier of a trained model: no re-ranking, MMR and DPP over a lam grid.

    python -m jobs.evaluate --config jobs/configs/beauty.yaml model_dir=outputs/beauty \
        output_dir=outputs/frontier_beauty [frontier.similarity=category] [frontier.max_users=2000]

`model_dir` is a train job's output_dir (its export/ and data/; train.prepared_dir overrides
the data). For every test user the full catalogue is scored once, the top
`rerank.n_candidates` re-ranked by each method at each lam, and the top-`frontier.k` lists
measured (rec/frontier.py). No Ray: one process, torch + numpy. Writes

  <output_dir>/frontier.json  per method per lam: NDCG@10, Recall@10, ILD@10 (category
                              Jaccard), ILD on item vectors, category coverage, novelty,
                              catalogue coverage, NDCG and ILD change versus "none", the
                              paired standard error of the NDCG change; and "summary": per
                              method the largest ILD gain whose NDCG drop is <= 2%
  <output_dir>/frontier.png   NDCG@10 against ILD@10, one curve per method, points labelled lam

Scoring the catalogue dominates the run time. The `none` row equals the train job's
`test_unseen.*` metrics (protocol "unseen", the default) or `test.*` (protocol "full").
Measured run times and Beauty's frontier: bench/README.md, "Relevance-diversity frontier".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jobs.common import (
    check_locations,
    main_guard,
    parse_args,
    verified_export,
    verified_prepared,
)
from jobs.config import RunConfig
from rec import storage
from rec.config_loader import ConfigError
from rec.frontier import compute_frontier

COLORS = {"none": "black", "mmr": "tab:blue", "dpp": "tab:red"}
LABEL_OFFSETS = {"mmr": (4, -10, "left"), "dpp": (-4, 5, "right")}  # points, lam labels


def run(cfg: RunConfig) -> dict:
    if not cfg.model_dir:
        raise ConfigError("model_dir: required (a train job's output_dir, with export/ and data/)")
    check_locations(cfg)
    # The export's current version copied and verified (sha256), the data's verified in place:
    # a missing, truncated or altered file stops the job with one line naming it (exit 2).
    local_export = verified_export(cfg.model_dir)
    prepared = verified_prepared(cfg, cfg.model_dir)
    result = compute_frontier(local_export, prepared, cfg.frontier, cfg.rerank)
    result["model_dir"] = cfg.model_dir
    with storage.staged_dir(cfg.output_dir) as out:  # uploaded at the end to a URI
        (out / "frontier.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_frontier(result, out / "frontier.png")
    print(format_table(result))
    written = [storage.join(cfg.output_dir, f) for f in ("frontier.json", "frontier.png")]
    print(f"[evaluate] wrote {written[0]} and {written[1]}")
    return result


def format_table(result: dict) -> str:
    """A plain-text table of the frontier plus the target summary."""
    k = result["config"]["k"]
    lines = [
        f"{result['n_users']} users, protocol {result['protocol']}, "
        f"similarity {result['config']['similarity']}, {result['seconds']} s",
        f"{'method':>6} {'lam':>5} {'ndcg@' + str(k):>9} {'d_ndcg':>7} "
        f"{'ild@' + str(k):>8} {'d_ild':>7} {'cat_cov':>7} {'novelty':>7}",
    ]
    for method, rows in result["frontier"].items():
        for r in rows:
            lam = "-" if r["lam"] is None else f"{r['lam']:.2f}"
            lines.append(
                f"{method:>6} {lam:>5} {r[f'ndcg@{k}']:9.4f} {r['ndcg_change']:+7.1%} "
                f"{r[f'ild@{k}']:8.4f} {r['ild_change']:+7.1%} "
                f"{r[f'cat_coverage@{k}']:7.2f} {r[f'novelty@{k}']:7.2f}"
            )
    s = result["summary"]
    for method, m in s["methods"].items():
        lines.append(
            f"{method}: best ILD gain with NDCG drop <= {s['max_ndcg_drop']:.0%}: "
            f"{_pct(m['ild_change'])} at lam {m['best_lam']}; target met: {m['target_met']}"
        )
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "none" if x is None else f"{x:+.1%}"


def plot_frontier(result: dict, path: Path) -> None:
    """NDCG@k (y) against ILD@k (x): one curve per method, points labelled with lam, the
    target region's edges dashed."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    k = result["config"]["k"]
    ndcg, ild = f"ndcg@{k}", f"ild@{k}"
    fig, ax = plt.subplots(figsize=(7, 5))
    for method, rows in result["frontier"].items():
        xs, ys = [r[ild] for r in rows], [r[ndcg] for r in rows]
        color = COLORS.get(method)
        if method == "none":
            ax.scatter(xs, ys, marker="*", s=160, color=color, label="none", zorder=3)
            continue
        ax.plot(xs, ys, "o-", color=color, label=method, markersize=4)
        # Curves often run close together: label one method below-right, the other above-left.
        dx, dy, ha = LABEL_OFFSETS.get(method, (3, 3, "left"))
        for r in rows:
            ax.annotate(
                f"{r['lam']:g}", (r[ild], r[ndcg]), fontsize=7, color=color, ha=ha,
                textcoords="offset points", xytext=(dx, dy),
            )  # fmt: skip
    s = result["summary"]
    ref = s["reference"]
    ax.axhline(ref[ndcg] * (1 - s["max_ndcg_drop"]), ls="--", lw=0.8, color="gray")
    ax.axvline(ref[ild] * (1 + s["target_ild_gain"]), ls="--", lw=0.8, color="gray")
    ax.set_xlabel(f"ILD@{k} (category Jaccard distance)")
    ax.set_ylabel(f"NDCG@{k}")
    ax.set_title(
        f"Relevance vs diversity ({result['config']['similarity']} similarity, "
        f"{result['n_users']} users, {result['protocol']})\n"
        f"dashed: NDCG -{s['max_ndcg_drop']:.0%} and ILD +{s['target_ild_gain']:.0%} vs none",
        fontsize=9,
    )
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    return main_guard(lambda: run(parse_args(RunConfig, argv, __doc__)))


if __name__ == "__main__":
    sys.exit(main())
