"""`model.members`: K independent towers behind one network's interface (rec/ensemble.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rec.ensemble import TowerEnsemble
from rec.export import load_export, plain_llama, save_export
from rec.heads import causal_history
from rec.model import LossWeights, ModelConfig, model_summary
from tests.test_model import N_ITEMS, make_batch, random_sequences, tiny_recommender

pytestmark = pytest.mark.usefixtures("one_torch_thread")

INTEREST_ONLY = LossWeights(interest=1.0, relevance=0.0, diversity=0.0)


def test_scores_are_the_mean_of_the_towers_own_scores() -> None:
    rec = tiny_recommender(seed=4, members=3).eval()
    assert isinstance(rec.model, TowerEnsemble) and len(rec.model.towers) == 3
    with torch.no_grad():
        rec.set_repeat_logit(-1.5)  # the shared repeat logit enters every tower's score
    batch = make_batch(random_sequences(5, seed=3), max_len=12)
    scores = rec.score_next(batch)  # (B, N + 1)
    per_tower = []
    for tower in rec.model.towers:
        h = tower(batch)[:, -1]  # (B, D): the tower alone
        own = h @ tower.item_embeddings().T  # (B, N + 1)
        seen = torch.zeros_like(own).scatter_(1, batch.items, 1.0)
        per_tower.append(own + rec.repeat_logit * seen)
    expected = torch.stack(per_tower).mean(0)
    torch.testing.assert_close(scores[:, 1:], expected[:, 1:], rtol=1e-4, atol=1e-5)
    assert torch.isinf(scores[:, 0]).all()
    # The towers start from different weights: an ensemble of copies would be one network.
    first, second = (t.item_emb.weight for t in rec.model.towers[:2])
    assert not torch.allclose(first, second)


def test_each_tower_learns_from_its_own_softmax() -> None:
    rec = tiny_recommender(seed=5, members=2, dropout=0.0, loss_weights=INTEREST_ONLY)
    batch = make_batch(random_sequences(6, seed=9), max_len=12)
    _, metrics = rec.loss(batch)
    mask = batch.targets > 0
    history = causal_history(batch.items, mask)
    losses = []
    for tower in rec.model.towers:
        h = tower(batch)[mask]
        logits = h @ tower.item_embeddings()[1:].T  # (P, N)
        logits = logits + rec.repeat_logit * torch.zeros_like(logits).scatter_(
            1, (history - 1).clamp(min=0), (history > 0).float()
        )
        losses.append(F.cross_entropy(logits, batch.targets[mask] - 1))
    expected = float(torch.stack(losses).mean().detach())
    assert metrics["loss_interest"] == pytest.approx(expected, rel=1e-5)
    # Independent: tower 1's loss sends no gradient into tower 0.
    rec.zero_grad()
    losses[1].backward()
    assert all(p.grad is None or not p.grad.any() for p in rec.model.towers[0].parameters())
    assert rec.model.towers[1].backbone.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_one_member_is_the_plain_network() -> None:
    """members=1 keeps SeqRecModel itself: the same parameter names (old exports load)."""
    plain, one = tiny_recommender(seed=2), tiny_recommender(seed=2, members=1)
    assert list(plain.state_dict()) == list(one.state_dict())
    batch = make_batch(random_sequences(3, seed=1), max_len=12)
    torch.testing.assert_close(plain.eval().score_next(batch), one.eval().score_next(batch))


def test_ensemble_export_round_trip(tmp_path: Path) -> None:
    rec = tiny_recommender(seed=6, members=2).eval()
    names = list(rec.state_dict())
    assert names.count("model.item_categories") == 1  # the towers share it, unsaved
    assert not any(n.endswith(".item_categories") and "towers" in n for n in names)
    save_export(rec, tmp_path / "export")
    back = load_export(tmp_path / "export")
    assert isinstance(back.model, TowerEnsemble)
    batch = make_batch(random_sequences(4, seed=8), max_len=12)
    torch.testing.assert_close(back.score_next(batch), rec.score_next(batch))
    assert not plain_llama(rec.cfg)  # two decoders: no single transformers backbone/
    assert "members=2" in model_summary(rec.model, rec)
    assert rec.model.item_embeddings().shape == (N_ITEMS + 1, 64)  # 2 towers x 32


def test_ensemble_refuses_what_it_cannot_train() -> None:
    with pytest.raises(ValueError, match="full softmax"):
        tiny_recommender(members=2, interest_loss="sampled")
    with pytest.raises(ValueError, match="members"):
        ModelConfig(members=0)
    with pytest.raises(ValueError, match="members=1"):
        ModelConfig(members=2, loss_weights=LossWeights(attributes=0.5))
