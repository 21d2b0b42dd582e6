"""The frontier's summary: each re-ranked list's change against the model's own top k, and
the best lam per method within the allowed NDCG drop (rec/frontier.py computes the rows)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # FrontierConfig lives in rec/frontier.py, which imports this module
    from rec.frontier import FrontierConfig


def summarize(
    metrics: dict[tuple[str, float | None], dict[str, float]],
    reference: dict[str, float],
    cfg: FrontierConfig,
) -> tuple[dict[str, list[dict]], dict]:
    """Rows per method with relative changes versus `reference`, and the target summary."""
    ndcg, ild = f"ndcg@{cfg.k}", f"ild@{cfg.k}"
    frontier: dict[str, list[dict]] = {}
    for (method, lam), row in metrics.items():
        change = {
            "ndcg_change": _relative(row[ndcg], reference[ndcg]),
            "ild_change": _relative(row[ild], reference[ild]),
        }
        frontier.setdefault(method, []).append({"lam": lam, **row, **change})
    per_method = {}
    for method, rows in frontier.items():
        if method == "none":
            continue
        ok = [r for r in rows if r["ndcg_change"] >= -cfg.max_ndcg_drop]
        best = max(ok, key=lambda r: r["ild_change"]) if ok else None
        per_method[method] = {
            "best_lam": None if best is None else best["lam"],
            "ndcg_change": None if best is None else best["ndcg_change"],
            "ild_change": None if best is None else best["ild_change"],
            ild: None if best is None else best[ild],
            "target_met": best is not None and best["ild_change"] >= cfg.target_ild_gain,
            "max_ild_change": max(r["ild_change"] for r in rows),
        }
    summary = {
        "max_ndcg_drop": cfg.max_ndcg_drop,
        "target_ild_gain": cfg.target_ild_gain,
        "reference": {ndcg: reference[ndcg], ild: reference[ild]},
        "methods": per_method,
        "target_met": any(m["target_met"] for m in per_method.values()),
    }
    return frontier, summary


def _relative(value: float, ref: float) -> float | None:
    return None if ref == 0 else value / ref - 1.0
