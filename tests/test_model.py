"""Model core: shapes, padding invariance, targets, presets, export round trip, overfitting."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from rec.data.batch import Batch
from rec.data.schema import BEHAVIOR_TOKENS
from rec.export import load_export, read_export_config, save_export
from rec.heads import diversity_targets
from rec.layers import CausalFreqMix
from rec.model import DataDims, LossWeights, ModelConfig, SeqRecModel, count_parameters
from rec.recommender import Recommender

N_ITEMS, N_CATS, N_CAT_SLOTS = 40, 6, 3
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_categories(n_items: int = N_ITEMS, seed: int = 0) -> torch.Tensor:
    """(n_items + 1, 3) categories; every 5th item has none, row 0 is padding."""
    gen = torch.Generator().manual_seed(seed)
    cats = torch.randint(1, N_CATS + 1, (n_items + 1, N_CAT_SLOTS), generator=gen)
    cats[:, 1:] *= torch.rand(n_items + 1, N_CAT_SLOTS - 1, generator=gen) < 0.5  # ragged
    cats[::5] = 0
    return cats


def make_batch(sequences: list[list[int]], max_len: int, seed: int = 0) -> Batch:
    """Train-style left-padded batch: inputs seq[:-1], targets seq[1:]."""
    gen = torch.Generator().manual_seed(seed)
    shape = (len(sequences), max_len)
    items, targets = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    behaviors, target_behaviors = torch.zeros_like(items), torch.zeros_like(items)
    gaps = torch.zeros_like(items)
    for row, seq in enumerate(sequences):
        seq = torch.tensor(seq[-(max_len + 1) :])
        beh = torch.randint(1, len(BEHAVIOR_TOKENS) + 1, (len(seq),), generator=gen)
        gap = torch.randint(1, 24, (len(seq),), generator=gen)
        n = len(seq) - 1
        items[row, max_len - n :], targets[row, max_len - n :] = seq[:-1], seq[1:]
        behaviors[row, max_len - n :], target_behaviors[row, max_len - n :] = beh[:-1], beh[1:]
        gaps[row, max_len - n :] = gap[:-1]
    return Batch(items, behaviors, gaps, targets, target_behaviors)


def random_sequences(n: int, seed: int = 0, n_items: int = N_ITEMS) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (n,), generator=gen)
    return [torch.randint(1, n_items + 1, (int(k),), generator=gen).tolist() for k in lengths]


def tiny_recommender(seed: int = 0, **overrides: object) -> Recommender:
    torch.manual_seed(seed)
    fields: dict = {"size": "tiny", "hidden_size": 32, "max_len": 16, **overrides}
    cfg = ModelConfig(**fields)
    return Recommender(cfg, DataDims(n_items=N_ITEMS, n_categories=N_CATS), make_categories())


def test_overfit_one_batch() -> None:
    # Distinct first items make every next item a function of the prefix, so the interest
    # loss can reach ~0.
    gen = torch.Generator().manual_seed(1)
    sequences = [torch.randperm(N_ITEMS, generator=gen)[:9].add(1).tolist() for _ in range(8)]
    sequences = [[i + 1, *seq[1:]] for i, seq in enumerate(sequences)]
    batch = make_batch(sequences, max_len=10)
    rec = tiny_recommender(dropout=0.0, hidden_size=None)
    opt = torch.optim.Adam(rec.parameters(), lr=1e-2)
    for _ in range(300):
        total, metrics = rec.loss(batch)
        opt.zero_grad()
        total.backward()
        opt.step()
        if metrics["loss_interest"] < 0.05:
            break
    assert metrics["loss_interest"] < 0.1, metrics


@pytest.mark.parametrize("interest_loss", ["full", "sampled"])
@pytest.mark.parametrize("relevance_mode", ["graded", "sampled"])
def test_losses_and_inference_shapes(interest_loss: str, relevance_mode: str) -> None:
    rec = tiny_recommender(
        interest_loss=interest_loss, relevance_mode=relevance_mode, n_negatives=16
    )
    rec.set_proposal(torch.arange(N_ITEMS + 1).float())  # popularity-shaped proposal
    batch = make_batch(random_sequences(5), max_len=12)
    total, metrics = rec.loss(batch)
    total.backward()
    assert torch.isfinite(total)
    assert set(metrics) == {"loss", "loss_interest", "loss_relevance", "loss_diversity"}
    assert rec.model.item_emb.weight.grad is not None
    rec.eval()
    scores = rec.score_next(batch)
    assert scores.shape == (5, N_ITEMS + 1)
    assert torch.isneginf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()
    candidates = torch.randint(1, N_ITEMS + 1, (5, 7))
    probs = rec.relevance(batch, candidates)
    assert probs.shape == (5, 7) and ((probs > 0) & (probs < 1)).all()
    assert rec.diversity(batch).shape == (5,)
    assert rec.user_embedding(batch).shape == (5, 32)


@pytest.mark.parametrize("relevance_mode", ["graded", "sampled"])
def test_detached_auxiliary_heads_leave_the_backbone_to_the_interest_loss(relevance_mode) -> None:
    """model.aux_detach: the relevance and diversity losses train their heads only. The backbone
    and item table get exactly the gradients of the interest loss alone, the heads get some."""
    from rec.model import LossWeights

    batch = make_batch(random_sequences(6, seed=4), max_len=12)
    grads = {}
    for name, overrides in {
        "detached": {"aux_detach": True},
        "interest_only": {"loss_weights": LossWeights(relevance=0.0, diversity=0.0)},
    }.items():
        rec = tiny_recommender(seed=5, relevance_mode=relevance_mode, **overrides)
        torch.manual_seed(6)  # the same dropout masks in both
        total, metrics = rec.loss(batch)
        total.backward()
        grads[name] = {n: p.grad for n, p in rec.named_parameters() if p.grad is not None}
        if name == "detached":
            assert metrics["loss_relevance"] > 0 and metrics["loss_diversity"] > 0
    shared = grads["interest_only"]  # backbone, item tables, repeat logit
    assert (
        any(n.startswith("model.backbone.") for n in shared) and "model.item_emb.weight" in shared
    )
    for n, g in shared.items():
        torch.testing.assert_close(grads["detached"][n], g, msg=n)
    heads = [n for n in grads["detached"] if n.startswith(("relevance_head", "diversity_head"))]
    assert heads and all(grads["detached"][n].abs().sum() > 0 for n in heads)


def test_relevance_auto_follows_data() -> None:
    cats = make_categories()
    with torch.device("meta"):
        graded = Recommender(ModelConfig(), DataDims(N_ITEMS, N_CATS, has_engaged=True), cats)
        sampled = Recommender(ModelConfig(), DataDims(N_ITEMS, N_CATS, has_engaged=False), cats)
    assert (graded.relevance_mode, sampled.relevance_mode) == ("graded", "sampled")


@pytest.mark.parametrize("freq_mix", [0.0, 0.7])
def test_left_padding_does_not_change_last_position(freq_mix: float) -> None:
    rec = tiny_recommender(freq_mix=freq_mix).eval()
    sequences = random_sequences(4, seed=3)
    short, long = make_batch(sequences, max_len=11), make_batch(sequences, max_len=16)
    with torch.no_grad():  # the raw model: no padding trimming helps it here
        h_short, h_long = rec.model(short)[:, -1], rec.model(long)[:, -1]
    torch.testing.assert_close(h_short, h_long, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rec.score_next(short), rec.score_next(long), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rec.diversity(short), rec.diversity(long), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("freq_mix", [0.0, 0.7])
def test_causal_no_peeking_at_later_items(freq_mix: float) -> None:
    rec = tiny_recommender(freq_mix=freq_mix).eval()
    batch = make_batch(random_sequences(3, seed=4), max_len=12)
    changed = Batch(**{k: v.clone() for k, v in batch.__dict__.items()})
    changed.items[:, -1] = torch.where(changed.items[:, -1] > 0, 1 + changed.items[:, -1] % 7, 0)
    with torch.no_grad():
        before, after = rec.model(batch), rec.model(changed)
    mask = batch.items[:, :-1] > 0  # earlier real positions must not move
    torch.testing.assert_close(before[:, :-1][mask], after[:, :-1][mask])


def test_freq_mix_is_a_causal_window_mean_and_off_by_default() -> None:
    assert tiny_recommender().model.freq_mix is None  # default: the plain Llama backbone
    mix = CausalFreqMix(d=4, alpha=0.5, window=3)
    with torch.no_grad():
        mix.sqrt_beta.copy_(torch.tensor([0.0, 1.0, 2.0, 0.5]))
    h = torch.randn(2, 6, 4)
    h[0, :2] = float("nan")  # row 0: two padding slots holding junk
    pos = torch.tensor([[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]])
    out = mix(h, pos)
    for b, first in ((0, 2), (1, 0)):
        for t in range(first, 6):
            low = h[b, max(first, t - 2) : t + 1].mean(0)  # the last <= 3 real events
            want = low + mix.sqrt_beta.detach() ** 2 * (h[b, t] - low)
            torch.testing.assert_close(out[b, t], want)
    rec = tiny_recommender(freq_mix=0.7)
    total, _ = rec.loss(make_batch(random_sequences(4), max_len=12))
    total.backward()  # the branch is in the graph: its gain learns
    assert all(m.sqrt_beta.grad.abs().sum() > 0 for m in rec.model.freq_mix)
    with pytest.raises(ValueError, match="freq_mix"):
        ModelConfig(freq_mix=1.5)


def test_residual_dropout_drops_sublayer_outputs_in_training_only() -> None:
    assert tiny_recommender().model.residual_dropout is None  # default: Llama's own behaviour
    batch = make_batch(random_sequences(4), max_len=12)
    # dropout=0: the input and attention-probability dropouts are off, so any randomness in
    # training mode comes from the residual hooks.
    rec = tiny_recommender(residual_dropout=0.5, dropout=0.0)
    plain = tiny_recommender(residual_dropout=0.0, dropout=0.0)
    plain.load_state_dict(rec.state_dict())  # same weights, same names: still a plain Llama
    rec.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(rec.model(batch), plain.model(batch))  # eval: identity
    rec.train(), plain.train()
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        runs.append((rec.model(batch), plain.model(batch)))
    torch.testing.assert_close(runs[0][1], runs[1][1])  # no hooks: deterministic
    assert not torch.allclose(runs[0][0], runs[1][0])  # hooks: sub-layer outputs dropped
    total, _ = rec.loss(batch)
    total.backward()  # still one graph: every backbone weight gets a gradient
    assert all(p.grad is not None for p in rec.model.backbone.parameters())
    with pytest.raises(ValueError, match="residual_dropout"):
        ModelConfig(residual_dropout=1.0)


def test_item_table_padding_row_is_zero() -> None:
    rec = tiny_recommender()
    table = rec.model.item_embeddings()
    assert table.shape == (N_ITEMS + 1, 32)
    assert torch.count_nonzero(table[0]) == 0
    torch.testing.assert_close(table[[3, 7]], rec.model.item_vectors(torch.tensor([3, 7])))


def test_diversity_targets_hand_example() -> None:
    # item: categories   1: {1}   2: {2}   3: {1, 2}   4: {}   5: {3, 1}
    cats = torch.tensor([[0, 0], [1, 0], [2, 0], [1, 2], [0, 0], [3, 1]])
    items = torch.tensor([[0, 1, 2, 1, 4]])
    targets = torch.tensor([[0, 2, 1, 5, 3]])
    # t=1: window {1}, next 2 -> cat 2 new -> 1; t=2: window {1,2}, next 1 -> 0;
    # t=3: window {1,2}, next 5 has 3 -> 1; t=4: window(2) = items 1 and 4 -> {1}, next 3 -> 1
    got = diversity_targets(items, targets, cats, window=2)
    assert got.tolist() == [[0.0, 1.0, 0.0, 1.0, 1.0]]
    assert diversity_targets(items, targets, cats, window=4).tolist() == [[0, 1, 0, 1, 0]]
    no_cats = diversity_targets(items, torch.tensor([[0, 4, 4, 4, 4]]), cats, window=2)
    assert no_cats.sum() == 0  # items without categories are never "new"


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=8),
    window=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_diversity_targets_match_reference(
    data: list[tuple[int, int]], window: int, seed: int
) -> None:
    cats = make_categories(n_items=6, seed=seed)
    items = torch.tensor([[i for i, _ in data]])
    targets = torch.tensor([[t for _, t in data]])
    got = diversity_targets(items, targets, cats, window)[0].tolist()
    for t, (_, target) in enumerate(data):
        recent = [i for i, _ in data[max(0, t - window + 1) : t + 1]]
        seen = {int(c) for i in recent for c in cats[i] if c > 0}
        wanted = {int(c) for c in cats[target] if c > 0}
        assert got[t] == float(target > 0 and bool(wanted - seen)), (t, data)


def test_parameter_presets() -> None:
    n_items = 12_000
    cats = torch.zeros(n_items + 1, 4, dtype=torch.long)
    tiny = Recommender(ModelConfig(size="tiny"), DataDims(n_items, 1_000), cats)
    assert 5e5 < count_parameters(tiny) < 2e6
    with torch.device("meta"):  # never allocate a billion parameters here
        large = SeqRecModel(ModelConfig(size="large"), DataDims(n_items, 1_000), cats)
    assert count_parameters(large) >= 1e9
    assert large.item_emb.weight.is_meta


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(size="tiny", n_heads=3)
    with pytest.raises(ValueError, match="temperature"):
        ModelConfig(temperature=0.0)
    with pytest.raises(ValueError, match="item_categories"):
        SeqRecModel(ModelConfig(), DataDims(N_ITEMS, N_CATS), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="all loss weights"):
        tiny_recommender(loss_weights=LossWeights(0.0, 0.0, 0.0))


def test_uncertainty_weighting_learns_log_variances() -> None:
    rec = tiny_recommender(uncertainty_weighting=True)
    log_vars = rec.multitask.log_vars
    assert log_vars is not None and set(log_vars) == {"interest", "relevance", "diversity"}
    names = {name for name, _ in rec.named_parameters()}
    assert "multitask.log_vars.interest" in names
    total, metrics = rec.loss(make_batch(random_sequences(4), max_len=12))
    total.backward()
    assert all(p.grad is not None and p.grad.abs() > 0 for p in log_vars.values())
    assert "log_var_diversity" in metrics
    assert tiny_recommender().multitask.log_vars is None


def test_export_round_trip_in_fresh_process(tmp_path: Path) -> None:
    rec = tiny_recommender(interest_loss="sampled")
    batch = make_batch(random_sequences(4, seed=5), max_len=12)
    opt = torch.optim.Adam(rec.parameters(), lr=1e-2)
    for _ in range(3):  # move weights away from init so a lost tensor would show
        total, _ = rec.loss(batch)
        opt.zero_grad()
        total.backward()
        opt.step()
    rec.eval()
    save_export(rec, tmp_path / "export", extra={"dataset": "unit"})
    save_file(batch.__dict__, str(tmp_path / "batch.safetensors"))
    snippet = f"""
        import torch
        from safetensors.torch import load_file, save_file
        from rec.data.batch import Batch
        from rec.export import load_export
        torch.set_num_threads(1)
        rec = load_export({str(tmp_path / "export")!r})
        assert not rec.training
        batch = Batch(**load_file({str(tmp_path / "batch.safetensors")!r}))
        save_file({{"scores": rec.score_next(batch)}}, {str(tmp_path / "scores.safetensors")!r})
    """
    subprocess.run(
        [sys.executable, "-c", textwrap.dedent(snippet)], cwd=REPO, check=True, timeout=60
    )
    fresh = load_file(str(tmp_path / "scores.safetensors"))["scores"]
    assert torch.equal(fresh, rec.score_next(batch))
    cfg, dims, extra = read_export_config(tmp_path / "export")
    assert (cfg, dims, extra) == (rec.cfg, rec.dims, {"dataset": "unit"})
    eager = load_export(tmp_path / "export", attn_implementation="eager")
    assert torch.equal(eager.model.item_categories, rec.model.item_categories)
    torch.testing.assert_close(eager.score_next(batch), fresh, atol=1e-5, rtol=1e-5)


def test_export_never_unpickles(tmp_path: Path) -> None:
    """load_export and scoring in a process where pickle.load(s), the Unpickler and torch.load
    raise: the export is safetensors + JSON only, so nothing there can run code on load."""
    rec = tiny_recommender()
    save_export(rec, tmp_path / "export")
    snippet = f"""
        import pickle, _pickle, torch
        def refuse(*args, **kwargs):
            raise RuntimeError("unpickling attempted")
        class Refusing(pickle.Unpickler):  # still subclassable (torch subclasses it)
            load = refuse
        for mod in (pickle, _pickle):
            mod.load, mod.loads, mod.Unpickler = refuse, refuse, Refusing
        torch.load = refuse
        from rec.export import load_export
        rec = load_export({str(tmp_path / "export")!r})
        try:  # the guard is live: a pickle load would have raised
            pickle.loads(pickle.dumps(1))
            raise SystemExit("guard not active")
        except RuntimeError:
            pass
        print("loaded", sum(p.numel() for p in rec.parameters()))
    """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(snippet)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["loaded", str(sum(p.numel() for p in rec.parameters()))]
