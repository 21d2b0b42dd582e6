"""Large-catalogue code paths at tiny sizes (issue 13): chunked full-ranking evaluation, the
automatic choices by catalogue size, the Taobao-shaped synthetic config, approximate retrieval."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.config import RunConfig
from rec import ann, artifacts
from rec.config_loader import load_config
from rec.data.batch import length_batches
from rec.data.splits import ItemTables
from rec.data.synthetic import generate
from rec.evaluation import EvalConfig, evaluate, resolve_max_users, sample_users
from rec.export import save_export
from rec.model import DataDims, ModelConfig, resolve_interest_loss
from rec.recommender import Recommender
from serve.engine import QueryTower
from tests.test_model import make_batch, make_categories

N_ITEMS = 300


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model_and_rows(seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(size="tiny", hidden_size=32, max_len=16, dropout=0.0)
    dims = DataDims(n_items=N_ITEMS, n_categories=6)
    model = Recommender(cfg, dims, make_categories(N_ITEMS, seed)).eval()
    with torch.no_grad():
        model.set_repeat_logit(0.8)  # the repeat logit must be scored in every chunk
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(70):
        seq = torch.randint(1, N_ITEMS + 1, (int(torch.randint(3, 14, (1,), generator=gen)),))
        seq = seq.tolist()
        if len(seqs) % 3 == 0:
            seq[-1] = seq[0]  # a repeated target: in its own history
        seqs.append(seq)
    rows = make_batch(seqs, max_len=16, seed=seed)
    counts = np.random.default_rng(seed).integers(0, 50, N_ITEMS + 1)
    tables = ItemTables(make_categories(N_ITEMS, seed).numpy(), counts, {})
    return model, rows, tables


@pytest.mark.parametrize("item_chunk", [1, 37, 299])
def test_chunked_evaluation_equals_full_ranking(item_chunk: int) -> None:
    model, rows, tables = _model_and_rows()
    full = evaluate(model, length_batches(rows, 16), tables, "test", popular=True)
    chunked = evaluate(
        model, length_batches(rows, 16), tables, "test", popular=True, item_chunk=item_chunk
    )
    assert full.keys() == chunked.keys()
    for key, value in full.items():
        assert chunked[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_user_sample_is_seeded_and_bounded() -> None:
    _, rows, _ = _model_and_rows()
    a, b = sample_users(rows, 20, seed=3), sample_users(rows, 20, seed=3)
    assert a.size == 20 and torch.equal(a.items, b.items)
    assert not torch.equal(a.items, sample_users(rows, 20, seed=4).items)
    assert sample_users(rows, None, 0) is rows and sample_users(rows, 500, 0) is rows


def test_auto_choices_switch_at_the_threshold() -> None:
    cfg = ModelConfig(interest_loss="auto", sampled_above_items=1000)
    assert resolve_interest_loss(cfg, DataDims(n_items=999, n_categories=3)) == "full"
    assert resolve_interest_loss(cfg, DataDims(n_items=1000, n_categories=3)) == "sampled"
    fixed = ModelConfig(interest_loss="full", sampled_above_items=10)
    assert resolve_interest_loss(fixed, DataDims(n_items=10**6, n_categories=3)) == "full"
    # The Recommender trains with what "auto" resolves to (no (positions x items) logits).
    dims = DataDims(n_items=N_ITEMS, n_categories=6)
    small = ModelConfig(size="tiny", hidden_size=32, max_len=16, interest_loss="auto")
    big = ModelConfig(**{**small.__dict__, "sampled_above_items": N_ITEMS, "n_negatives": 8})
    for cfg_, want in ((small, "full"), (big, "sampled")):
        model = Recommender(cfg_, dims, make_categories(N_ITEMS))
        assert model.interest_loss == want
        total, _ = model.loss(make_batch([[1, 2, 3, 4], [5, 6, 7]], max_len=16))
        assert torch.isfinite(total)
    ev = EvalConfig(sample_above_items=1000, auto_users=50)
    assert resolve_max_users(ev, 999) is None and resolve_max_users(ev, 1000) == 50
    assert resolve_max_users(EvalConfig(max_users=7), 10) == 7
    assert resolve_max_users(EvalConfig(max_users=None, sample_above_items=1), 10**6) is None
    with pytest.raises(ValueError, match="max_users"):
        EvalConfig(max_users="some")


def _clustered(n: int, d: int, n_clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Item vectors around category centroids (the shape a trained table has) and queries
    that mix a few centroids."""
    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(n_clusters, d)).astype(np.float32)
    items = centroids[rng.integers(0, n_clusters, n)] + 0.5 * rng.normal(size=(n, d))
    mix = centroids[rng.integers(0, n_clusters, (64, 3))].mean(1)
    return items.astype(np.float32), (mix + 0.3 * rng.normal(size=mix.shape)).astype(np.float32)


def test_ann_recall_against_exact() -> None:
    items, queries = _clustered(6000, 16, 60, seed=0)
    index = ann.build_index(items)
    got, _ = ann.search(index, queries, 100)
    exact = np.argsort(-(queries @ items.T), axis=1)[:, :100] + 1
    recall = np.mean([len(np.intersect1d(g, e)) / 100 for g, e in zip(got, exact, strict=True)])
    assert recall >= 0.9, recall
    assert ann.resolve_retrieval("auto", 199, 200) == "exact"
    assert ann.resolve_retrieval("auto", 200, 200) == "ann"
    assert ann.resolve_retrieval("exact", 10**7, 200) == "exact"
    with pytest.raises(ValueError, match="serve.retrieval"):
        ann.resolve_retrieval("fast", 10, 200)


def test_retriever_with_an_exhaustive_index_equals_exact() -> None:
    model, rows, _ = _model_and_rows()
    table = model.item_table()
    index = ann.build_index(table[1:].numpy(), nlist=4, nprobe=4)  # every cell: exact order
    hists = [r[r > 0].numpy() for r in rows.items[:12]]
    excludes = [h[: len(h) // 2] if i % 2 else None for i, h in enumerate(hists)]
    exact = QueryTower(model, behavior=1).retrieve(hists, excludes, n=25)
    approx = QueryTower(model, behavior=1, index=index).retrieve(hists, excludes, n=25)
    for e, a, x in zip(exact, approx, excludes, strict=True):
        assert np.array_equal(e.candidates, a.candidates)
        np.testing.assert_allclose(e.interest, a.interest, rtol=1e-5, atol=1e-6)
        assert x is None or not set(x) & set(a.candidates.tolist())


def test_index_is_written_at_export_time_and_verified(tmp_path) -> None:
    model, _, _ = _model_and_rows()
    build = save_export(model, tmp_path / "build")
    assert not ann.add_to_export(build, "auto", min_items=N_ITEMS + 1)  # small: exact
    assert not (build / ann.INDEX_FILE).exists()
    assert ann.add_to_export(build, "auto", min_items=N_ITEMS)
    dest = str(tmp_path / "export")
    artifacts.publish(build, dest, kind="export", producer="test", config={})
    m = artifacts.verify(dest)
    assert ann.INDEX_FILE in {f.path for f in m.files}
    index = ann.read_index(m.path)
    assert index.ntotal == N_ITEMS
    served = ann.index_for_serving(m.path, "auto", N_ITEMS, model)
    assert served is not None and served.ntotal == N_ITEMS
    assert ann.index_for_serving(m.path, "exact", 1, model) is None
    path = Path(m.path) / ann.INDEX_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(artifacts.ArtifactError, match="ann.faiss"):
        artifacts.verify(dest)


def test_taobao_scale_config_one_knob_and_the_real_file() -> None:
    cfg = load_config(RunConfig, "jobs/configs/taobao_scale.yaml", ["data.synthetic.scale=0.001"])
    small = cfg.data.synthetic.scaled()
    assert (small.n_users, small.n_items, small.n_categories) == (988, 4162, 4162)
    full = load_config(RunConfig, "jobs/configs/taobao_scale.yaml", ["data.synthetic.scale=1"])
    shape = full.data.synthetic.scaled()
    assert (shape.n_users, shape.n_items, shape.n_categories) == (987_994, 4_162_024, 9_439)
    assert (full.model.interest_loss, full.eval.max_users, full.serve.retrieval) == ("auto",) * 3
    real = ["data.format=taobao", "data.path=/data/UserBehavior.csv"]
    assert load_config(RunConfig, "jobs/configs/taobao_scale.yaml", real).data.format == "taobao"


def test_scaled_log_has_taobao_shape(tmp_path) -> None:
    cfg = load_config(RunConfig, "jobs/configs/taobao_scale.yaml", ["data.synthetic.scale=0.0005"])
    paths = generate(cfg.data.synthetic, tmp_path)
    log = pa.concat_tables([pq.read_table(p) for p in paths])
    assert log.column("user_id").to_numpy().max() <= 2 * 494 + 1  # 494 users, ids 1 + 2u (+1)
    assert len(np.unique(log.column("item_id").to_numpy())) <= 2081
    per_user = log.num_rows / len(np.unique(log.column("user_id").to_numpy()))
    assert 85 < per_user < 120, per_user  # Taobao: 101.4 events per user
    kinds, counts = np.unique(log.column("behavior_type").to_numpy(zero_copy_only=False),
                              return_counts=True)  # fmt: skip
    share = dict(zip(kinds.tolist(), (counts / counts.sum()).tolist(), strict=True))
    for kind, want in {"pv": 0.895, "cart": 0.055, "fav": 0.029, "buy": 0.021}.items():
        assert share[kind] == pytest.approx(want, abs=0.01), (kind, share)
