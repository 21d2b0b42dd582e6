"""The relevance-diversity frontier (rec/frontier.py, jobs/evaluate.py) on a tiny trained model.

A small synthetic log is prepared without Ray, a 32-d model trained for a few hundred steps in
plain torch (so it has real hits to lose) and saved as a serving export; no Ray anywhere.
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs import evaluate as evaluate_job
from jobs.config import RunConfig
from rec import artifacts
from rec.config_loader import ConfigError, load_config
from rec.data.batch import collate, length_batches
from rec.data.config import DataConfig
from rec.data.local import prepare_local
from rec.data.splits import load_examples, load_item_tables
from rec.data.synthetic import SyntheticConfig
from rec.evaluation import evaluate
from rec.export import load_export, save_export
from rec.frontier import Candidates, FrontierConfig, candidate_pool, compute_frontier, pick
from rec.model import ModelConfig
from rec.recommender import build_recommender
from rec.rerank import RerankConfig, similarity_inputs
from tests.conftest import ROOT

METRICS = ("ndcg@10", "recall@10", "ild@10", "cat_coverage@10", "novelty@10", "catalog_coverage")
FAST = {"lams": [0.0, 0.3, 1.0], "batch_size": 64}
POOL = RerankConfig(n_candidates=40)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """<dir>/data (prepared synthetic log) and <dir>/export (a briefly trained tiny model)."""
    out = tmp_path_factory.mktemp("frontier_model")
    synthetic = SyntheticConfig(
        n_users=400, n_items=300, n_categories=12, events_per_user=20, seed=3
    )
    prepare_local(DataConfig(format="synthetic", synthetic=synthetic, max_len=20), out / "data")
    tables = load_item_tables(out / "data")
    torch.manual_seed(0)
    cfg = ModelConfig(size="tiny", hidden_size=32, max_len=20, dropout=0.1)
    model = build_recommender(cfg, tables)
    train = collate(load_examples(out / "data", "train", cfg.max_len))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(6):
        for _, batch in length_batches(train, 64, rng, bucket_rows=64):
            loss, _ = model.loss(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_export(model.eval(), out / "export")
    artifacts.write_manifest(out / "export", kind="export", producer="tests", config={})
    return out


def frontier(model_dir: Path, **fields) -> dict:
    cfg = FrontierConfig(**{**FAST, **fields})
    return compute_frontier(model_dir / "export", model_dir / "data", cfg, POOL)


def strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("lam", "rerank_seconds")}


@pytest.mark.parametrize("protocol,prefix", [("unseen", "test_unseen"), ("full", "test")])
def test_none_row_equals_train_job_test_metrics(model_dir, protocol, prefix):
    result = frontier(model_dir, protocol=protocol, methods=["none"])
    (none,) = result["frontier"]["none"]
    # What jobs.training.final_test_metrics computes: the evaluator over the same export and split.
    model = load_export(model_dir / "export")
    tables = load_item_tables(model_dir / "data")
    test = load_examples(model_dir / "data", "test", model.cfg.max_len)
    expected = evaluate(model, length_batches(collate(test), FAST["batch_size"]), tables, "test")
    assert none["ndcg@10"] > 0.02, "the tiny model should find some targets"
    for name in METRICS:
        assert none[name] == pytest.approx(expected[f"{prefix}.{name}"], rel=1e-9, abs=1e-12)
    assert result["n_users"] == len(test["items"])


@pytest.mark.parametrize("similarity", ["embedding", "category"])
def test_lam_zero_rows_equal_none(model_dir, similarity):
    result = frontier(model_dir, similarity=similarity)
    none = strip(result["frontier"]["none"][0])
    for method in ("mmr", "dpp"):
        zero = result["frontier"][method][0]
        assert zero["lam"] == 0.0
        assert strip(zero) == none


@pytest.mark.parametrize(
    "similarity,metric,mix", [("category", "ild@10", 0.0), ("embedding", "ild_emb@10", 0.1)]
)
def test_diversity_rises_with_lam(model_dir, similarity, metric, mix):
    lams = [0.0, 0.1, 0.3, 0.5, 0.8, 1.0]
    result = frontier(model_dir, similarity=similarity, lams=lams, identity_mix=mix)
    for method in ("mmr", "dpp"):
        values = np.array([r[metric] for r in result["frontier"][method]])
        steps = np.diff(values)
        assert steps.mean() > 0 and values[-1] > values[0] + 0.05, (method, values)
        # Relevance pays for it: the most diverse list finds fewer targets than none.
        ndcg = [r["ndcg@10"] for r in result["frontier"][method]]
        assert ndcg[-1] < ndcg[0]


def test_summary_picks_best_ild_within_ndcg_budget(model_dir):
    result = frontier(model_dir, similarity="category", max_ndcg_drop=0.5, target_ild_gain=0.0)
    for method in ("mmr", "dpp"):
        rows = result["frontier"][method]
        ok = [r for r in rows if r["ndcg_change"] >= -0.5]
        best = result["summary"]["methods"][method]
        assert best["ild_change"] == max(r["ild_change"] for r in ok)
        assert best["target_met"] is True  # target gain 0 is met by lam = 0 at worst
        assert best["max_ild_change"] == max(r["ild_change"] for r in rows)


def test_summarize_known_answer():
    """Hand-made rows: the best lam is the most diverse row within the NDCG budget (not the most
    diverse overall), the target is compared with its ILD gain, a method with no row within
    budget has no best. Values are exact binary fractions, so the relative changes are exact."""
    from rec.frontier import summarize

    ref = {"ndcg@10": 0.5, "ild@10": 0.5}
    rows = {
        ("none", None): {"ndcg@10": 0.5, "ild@10": 0.5},
        ("mmr", 0.0): {"ndcg@10": 0.5, "ild@10": 0.5},  # changes 0, 0
        ("mmr", 0.5): {"ndcg@10": 0.5, "ild@10": 0.625},  # 0, +0.25
        ("mmr", 0.8): {"ndcg@10": 0.4921875, "ild@10": 0.6875},  # -1/64, +0.375
        ("mmr", 1.0): {"ndcg@10": 0.25, "ild@10": 1.0},  # -0.5, +1 (outside the budget)
        ("dpp", 0.5): {"ndcg@10": 0.375, "ild@10": 0.75},  # -0.25: outside
    }
    cfg = FrontierConfig(k=10, max_ndcg_drop=0.02, target_ild_gain=0.5)
    frontier_rows, summary = summarize(rows, ref, cfg)
    assert [r["ild_change"] for r in frontier_rows["mmr"]] == [0.0, 0.25, 0.375, 1.0]
    mmr, dpp = summary["methods"]["mmr"], summary["methods"]["dpp"]
    assert (mmr["best_lam"], mmr["ild_change"], mmr["ndcg_change"]) == (0.8, 0.375, -1 / 64)
    assert mmr["ild@10"] == 0.6875 and mmr["max_ild_change"] == 1.0
    assert mmr["target_met"] is False  # 0.375 < 0.5, although lam 1 reaches +1.0
    assert dpp["best_lam"] is None and dpp["target_met"] is False
    assert summary["target_met"] is False and "none" not in summary["methods"]
    _, met = summarize(rows, ref, replace(cfg, target_ild_gain=0.375))
    assert met["methods"]["mmr"]["target_met"] is True and met["target_met"] is True


@pytest.mark.parametrize("item_chunk", [2, 100])
def test_candidate_pool_excludes_history_but_not_target(item_chunk):
    scores = torch.tensor([[float("-inf"), 5.0, 4.0, 3.0, 2.0, 1.0]])  # items 1..5

    def chunk(lo, hi):
        return scores[:, lo:hi]

    history = torch.tensor([[0, 1, 3]])
    pool = partial(candidate_pool, chunk, 5, item_chunk=item_chunk)
    unseen = pool(torch.tensor([3]), history, n=3, protocol="unseen")
    assert unseen.items.tolist() == [[2, 3, 4]]  # 1 removed, 3 is the target and stays
    assert unseen.scores.tolist() == [[4.0, 3.0, 2.0]]
    full = pool(torch.tensor([3]), history, n=3, protocol="full")
    assert full.items.tolist() == [[1, 2, 3]]
    with pytest.raises(ConfigError, match="n_candidates"):
        pool(torch.tensor([2]), history, n=5, protocol="unseen")


def test_chunked_frontier_equals_one_chunk(model_dir):
    """Scoring 300 items 7 at a time (43 chunks, a ragged last one) gives the same candidate
    pools, so the same rows, as scoring them all at once: the 4M-item path at a small size."""
    fields = {"methods": ["none", "mmr", "dpp"], "lams": [0.0, 0.5], "max_users": 200}
    one = frontier(model_dir, **fields)["frontier"]
    chunked = frontier(model_dir, item_chunk=7, **fields)["frontier"]
    assert one["none"][0]["ndcg@10"] > 0.02
    for method, rows in one.items():
        assert [strip(r) for r in chunked[method]] == [strip(r) for r in rows], method


def test_identity_mix_scales_off_diagonal_only():
    cats = np.array([[[1, 2], [1, 2], [3, 0]]])  # (1, 3, 2): items 1 and 2 share a set
    plain = similarity_inputs(RerankConfig(similarity="category"), cat_ids=cats)
    mixed_cfg = RerankConfig(similarity="category", identity_mix=0.25)
    mixed = similarity_inputs(mixed_cfg, cat_ids=cats)
    s0, s1 = plain["similarity"][0], mixed["similarity"][0]
    assert s0[0, 1] == 1.0 and s1[0, 1] == 0.75
    np.testing.assert_allclose(np.diag(s1), 1.0)
    emb_cfg = RerankConfig(similarity="embedding", identity_mix=0.5)
    vecs = np.random.default_rng(0).normal(size=(1, 3, 8))
    emb = similarity_inputs(emb_cfg, vectors=vecs)["similarity"]
    assert emb.shape == (1, 3, 3) and np.all(np.linalg.eigvalsh(emb[0]) > 0.49)
    assert set(similarity_inputs(RerankConfig(), vectors=vecs)) == {"vectors"}


def test_frontier_measures_rerank_with_kernel_overrides():
    served = RerankConfig(similarity="embedding", theta_max=2.0, n_candidates=40)
    measured = FrontierConfig().measured(served)  # the published kernel: category + 10 %
    assert (measured.similarity, measured.identity_mix) == ("category", 0.1)
    assert (measured.theta_max, measured.n_candidates) == (2.0, 40)
    inherit = FrontierConfig(similarity=None, identity_mix=None).measured(served)
    assert inherit == served


def test_pick_is_rerank_dispatch():
    cands = Candidates(torch.tensor([[5, 7, 9, 11]]), torch.tensor([[4.0, 3.0, 2.0, 1.0]]), None)
    vecs = {"vectors": np.eye(4)[None]}
    cfg = RerankConfig(method="dpp")
    assert pick("none", None, cands, vecs, cfg, 3).tolist() == [[5, 7, 9]]
    assert pick("mmr", 0.0, cands, vecs, cfg, 2).tolist() == [[5, 7]]
    assert pick("dpp", 1.0, cands, vecs, cfg, 4).shape == (1, 4)


def test_job_writes_json_and_png(model_dir, tmp_path):
    out = tmp_path / "out"
    overrides = [f"model_dir={model_dir}", f"output_dir={out}", "frontier.lams=[0.0, 0.5]"]
    overrides += ["rerank.n_candidates=40", "frontier.max_users=150"]
    cfg = load_config(RunConfig, ROOT / "jobs" / "configs" / "smoke.yaml", overrides)
    evaluate_job.run(cfg)
    result = json.loads((out / "frontier.json").read_text())
    assert set(result) >= {"config", "n_users", "protocol", "frontier", "summary", "model_dir"}
    assert result["n_users"] == 150
    assert list(result["frontier"]) == ["none", "mmr", "dpp"]
    row = result["frontier"]["dpp"][1]
    assert row["lam"] == 0.5
    assert set(row) >= {*METRICS, "ild_emb@10", "ndcg_change", "ild_change", "ndcg@10_diff_se"}
    assert set(result["summary"]["methods"]) == {"mmr", "dpp"}
    assert {"best_lam", "ndcg_change", "ild_change", "target_met"} <= set(
        result["summary"]["methods"]["dpp"]
    )
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "override,needle",
    [
        ("frontier.lams=[0.0, 1.5]", "lams"),
        ("frontier.lams=[-0.1]", "lams"),
        ("frontier.methods=[none, xmr]", "methods"),
        ("frontier.k=200", "frontier.k"),
        ("frontier.identity_mix=1.0", "identity_mix"),
    ],
)
def test_bad_config_raises_config_error(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(RunConfig, ROOT / "jobs" / "configs" / "smoke.yaml", [override])


def test_job_without_model_dir_exits_2(tmp_path, capsys):
    smoke = str(ROOT / "jobs" / "configs" / "smoke.yaml")
    assert evaluate_job.main(["--config", smoke, f"output_dir={tmp_path}"]) == 2
    assert "model_dir" in capsys.readouterr().err
    missing = [f"model_dir={tmp_path / 'nothing'}", f"output_dir={tmp_path}"]
    assert evaluate_job.main(["--config", smoke, *missing]) == 2


def test_settings_order_and_with_none():
    cfg = FrontierConfig(methods=["dpp", "none"], lams=[0.0, 1.0])
    assert cfg.settings() == [("dpp", 0.0), ("dpp", 1.0), ("none", None)]
    assert replace(cfg, methods=["mmr"]).settings() == [("mmr", 0.0), ("mmr", 1.0)]
