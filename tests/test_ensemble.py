"""`model.members`: K independent towers behind one network's interface (rec/ensemble.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rec.ensemble import TowerEnsemble, model_summary, tower_clip, weight_decay_groups
from rec.export import load_export, plain_llama, save_export
from rec.heads import causal_history
from rec.model import LossWeights, ModelConfig
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
    rec = tiny_recommender(seed=6, members=2, tower_residual_dropout=[0.0, 0.2]).eval()
    names = list(rec.state_dict())
    assert names.count("model.item_categories") == 1  # the towers share it, unsaved
    assert not any(n.endswith(".item_categories") and "towers" in n for n in names)
    save_export(rec, tmp_path / "export")
    back = load_export(tmp_path / "export")
    assert isinstance(back.model, TowerEnsemble)
    assert back.cfg.tower_residual_dropout == [0.0, 0.2]  # the per-tower recipe travels
    assert back.model.towers[1].residual_dropout.p == 0.2
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


def test_per_tower_regularisation() -> None:
    """model.tower_residual_dropout / tower_weight_decay: each tower its own recipe."""
    rec = tiny_recommender(
        seed=7, members=3, tower_residual_dropout=[0.0, 0.3, 0.1], tower_weight_decay=[0, 0.5, 0]
    )
    drops = [t.residual_dropout.p if t.residual_dropout else 0.0 for t in rec.model.towers]
    assert drops == [0.0, 0.3, 0.1]
    params = list(rec.parameters())
    groups = weight_decay_groups(rec, params)
    assert [g.get("weight_decay") for g in groups] == [0, 0.5, 0, None]  # None: train's decay
    flat = [id(p) for g in groups for p in g["params"]]
    assert sorted(flat) == sorted(id(p) for p in params)  # every parameter exactly once
    # With zero gradients AdamW's step is the decoupled decay alone: tower 1 shrinks by
    # 1 - lr * 0.5, towers 0 and 2 keep their weights, the heads take the default decay 0.1.
    opt = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.1)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    towers = [{id(p) for p in t.parameters()} for t in rec.model.towers]
    for p, old in zip(params, before, strict=True):
        factor = 0.95 if id(p) in towers[1] else 1.0 if id(p) in towers[0] | towers[2] else 0.99
        torch.testing.assert_close(p.detach(), old * factor)
    # No per-tower decay: the parameters go to the optimizer as they are.
    assert weight_decay_groups(tiny_recommender(members=2), params) is params


def test_per_tower_lists_cycle_and_are_checked() -> None:
    rec = tiny_recommender(seed=1, members=3, tower_residual_dropout=[0.2, 0.0])
    drops = [t.residual_dropout.p if t.residual_dropout else 0.0 for t in rec.model.towers]
    assert drops == [0.2, 0.0, 0.2]  # tower k takes values[k % len(values)]
    one = tiny_recommender(seed=1, tower_residual_dropout=[0.2, 0.0], tower_weight_decay=[0.3])
    assert one.model.residual_dropout.p == 0.2  # members=1: the network is tower 0
    groups = weight_decay_groups(one, list(one.parameters()))
    assert groups[0]["weight_decay"] == 0.3 and "weight_decay" not in groups[1]
    with pytest.raises(ValueError, match="tower_residual_dropout values"):
        ModelConfig(members=2, tower_residual_dropout=[0.0, 1.0])
    with pytest.raises(ValueError, match="tower_weight_decay values"):
        ModelConfig(members=2, tower_weight_decay=[0.1, -0.1])


def test_tower_clip_clips_each_tower_as_a_lone_network() -> None:
    """K like towers under the mean loss, clipped globally at tower_clip(c, K), take the step a
    lone network clipped at c takes, divided by K (which Adam does not see)."""
    k, clip = 4, 0.05
    lone = tiny_recommender(seed=3, dropout=0.0, loss_weights=INTEREST_ONLY)
    ens = tiny_recommender(seed=3, members=k, dropout=0.0, loss_weights=INTEREST_ONLY)
    for tower in ens.model.towers:  # k copies of the lone network
        tower.load_state_dict(lone.model.state_dict(), strict=False)
    batch = make_batch(random_sequences(6, seed=2), max_len=12)
    for net, c in ((lone, clip), (ens, tower_clip(clip, k))):
        net.zero_grad()
        net.loss(batch)[0].backward()
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), c)
        assert norm > c  # clipping is in force in both
    weight = lone.model.backbone.layers[0].mlp.up_proj.weight.grad
    for tower in ens.model.towers:
        got = tower.backbone.layers[0].mlp.up_proj.weight.grad
        torch.testing.assert_close(got * k, weight, rtol=1e-3, atol=1e-7)
    assert tower_clip(1.0, 1) == 1.0 and tower_clip(0.0, 4) == 0.0  # one network; clip off
