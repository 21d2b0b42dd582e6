"""The model's switchable parts (issue 19's search and ablations): the contrastive view, label
smoothing, the future-item and next-attribute objectives, and the category / behavior inputs
switched off."""

from __future__ import annotations

import pytest
import torch

from rec.heads import (
    attribute_loss,
    causal_history,
    contrastive_loss,
    future_loss,
    future_targets,
    interest_full_logits,
    interest_full_loss,
)
from rec.model import LossWeights, ModelConfig
from tests.test_model import make_batch, random_sequences, tiny_recommender

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_contrastive_loss_rewards_agreeing_views() -> None:
    """Matching views score below shuffled ones; the minimum is log(1) only in the limit."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(16, 8, generator=gen)
    noisy = z + 0.05 * torch.randn(16, 8, generator=gen)
    agree = contrastive_loss(z, noisy, temperature=0.1)
    shuffled = contrastive_loss(z, noisy[torch.randperm(16, generator=gen)], temperature=0.1)
    assert agree < 0.1 < shuffled
    # Permuting the batch permutes anchors and positives together: the mean is unchanged.
    perm = torch.randperm(16, generator=gen)
    torch.testing.assert_close(contrastive_loss(z[perm], noisy[perm], 0.1), agree)


def test_contrastive_weight_adds_a_trained_term() -> None:
    batch = make_batch(random_sequences(6, seed=2), max_len=12)
    rec = tiny_recommender(seed=1, loss_weights=LossWeights(contrastive=0.5))
    total, metrics = rec.loss(batch)
    assert metrics["loss_contrastive"] > 0
    total.backward()
    assert rec.model.backbone.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    # Without dropout both views are identical: the loss is the floor for this batch.
    still = tiny_recommender(seed=1, dropout=0.0, loss_weights=LossWeights(contrastive=0.5))
    _, quiet = still.loss(batch)
    assert quiet["loss_contrastive"] < metrics["loss_contrastive"]


def test_label_smoothing_moves_mass_off_the_target() -> None:
    gen = torch.Generator().manual_seed(3)
    h, table = torch.randn(5, 4, generator=gen), torch.randn(11, 4, generator=gen)
    targets = torch.tensor([1, 2, 3, 4, 5])
    plain = interest_full_loss(h, table, targets, 1.0)
    smooth = interest_full_loss(h, table, targets, 1.0, label_smoothing=0.2)
    logp = torch.log_softmax(h @ table[1:].T, dim=-1)
    expected = 0.8 * plain - 0.2 * logp.mean(-1).mean()
    torch.testing.assert_close(smooth, expected)


@pytest.mark.parametrize("switch", ["use_categories", "use_behaviors"])
def test_an_input_switched_off_is_not_built_and_changes_the_states(switch) -> None:
    batch = make_batch(random_sequences(4, seed=7), max_len=12)
    full, ablated = tiny_recommender(seed=3).eval(), tiny_recommender(seed=3, **{switch: False})
    table = {"use_categories": "category_emb", "use_behaviors": "behavior_emb"}[switch]
    assert getattr(ablated.model, table) is None
    assert not any(n.startswith(f"model.{table}") for n, _ in ablated.named_parameters())
    missing, unexpected = ablated.load_state_dict(full.state_dict(), strict=False)
    assert not missing and all(k.startswith(f"model.{table}") for k in unexpected)
    ablated.eval()
    with torch.no_grad():  # every other weight equal: the difference is the term switched off
        differ = (full.model(batch) - ablated.model(batch)).abs().amax()
        if switch == "use_behaviors":  # zero its table instead: the same states again
            full.model.behavior_emb.weight.zero_()
            torch.testing.assert_close(full.model(batch), ablated.model(batch))
    assert differ > 1e-4
    total, _ = tiny_recommender(seed=3, **{switch: False}).loss(batch)
    total.backward()  # trains with the input gone


def test_future_targets_are_the_items_further_ahead() -> None:
    # Left-padded rows: inputs a b c d -> targets b c d e; a shorter row behind padding.
    targets = torch.tensor([[2, 3, 4, 5], [0, 0, 7, 8]])
    ahead = future_targets(targets, steps=3)  # (2, 4, 2): 2 and 3 events ahead
    assert ahead[0].tolist() == [[3, 4], [4, 5], [5, 0], [0, 0]]
    # Padding positions (no next-item target) may see real items ahead; the loss drops them.
    assert ahead[1].tolist() == [[0, 7], [7, 8], [8, 0], [0, 0]]


def test_future_loss_is_the_mean_nll_of_the_existing_pairs() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 6, generator=gen)
    ahead = torch.tensor([[2, 5], [6, 0], [0, 0]])  # item ids; 0 = no target there
    logp = logits.log_softmax(-1)
    expected = -(logp[0, 1] + logp[0, 4] + logp[1, 5]) / 3
    torch.testing.assert_close(future_loss(logits, ahead), expected)
    # No pair at all: zero, still attached to the graph.
    none = future_loss(logits.requires_grad_(), torch.zeros(3, 2, dtype=torch.long))
    assert none.item() == 0.0 and none.requires_grad


def test_future_weight_trains_on_the_same_softmax() -> None:
    batch = make_batch(random_sequences(6, seed=5), max_len=12)
    rec = tiny_recommender(seed=2, dropout=0.0, loss_weights=LossWeights(future=1.0))
    _, metrics = rec.loss(batch)
    # Recompute by hand: the interest logits at every target position, scored 2 and 3 ahead.
    mask = batch.targets > 0
    table = rec.model.item_embeddings()
    h = rec.model(batch, table)[mask]
    logits = interest_full_logits(
        h, table, 1.0, causal_history(batch.items, mask), rec.repeat_logit
    )
    expected = future_loss(logits, future_targets(batch.targets, 3)[mask]).detach()
    assert metrics["loss_future"] == pytest.approx(float(expected), rel=1e-5)
    assert metrics["loss"] == pytest.approx(
        metrics["loss_interest"] + 0.5 * metrics["loss_relevance"]
        + 0.2 * metrics["loss_diversity"] + metrics["loss_future"], rel=1e-5
    )  # fmt: skip


def test_attribute_loss_targets_every_attribute_of_the_item_once() -> None:
    gen = torch.Generator().manual_seed(6)
    h, table = torch.randn(3, 4, generator=gen), torch.randn(6, 4, generator=gen)
    # Row 0: attributes 1 and 3 (1 twice); row 1: attribute 1 only, beside padding slots (a
    # padding 0 must not erase attribute 1); row 2: none (left out).
    wanted = torch.tensor([[1, 3, 1], [0, 1, 0], [0, 0, 0]])
    logp = (h @ table[1:].T).log_softmax(-1)
    expected = (-(logp[0, 0] + logp[0, 2]) / 2 - logp[1, 0]) / 2
    torch.testing.assert_close(attribute_loss(h, table, wanted), expected)


def test_attribute_weight_trains_the_backbone_and_the_category_table() -> None:
    batch = make_batch(random_sequences(6, seed=8), max_len=12)
    weights = LossWeights(interest=1.0, relevance=0.0, diversity=0.0, attributes=1.0)
    rec = tiny_recommender(seed=1, loss_weights=weights)
    total, metrics = rec.loss(batch)
    assert metrics["loss_attributes"] > 0
    only = tiny_recommender(seed=1, loss_weights=LossWeights(0.0, 0.0, 0.0, attributes=1.0))
    total_only, _ = only.loss(batch)
    total_only.backward()
    assert only.model.category_emb.weight.grad.abs().sum() > 0
    assert only.model.backbone.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    assert (
        only.model.item_emb.weight.grad is None or only.model.item_emb.weight.grad.abs().sum() > 0
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"loss_weights": LossWeights(future=0.5), "future_steps": 1}, "future_steps >= 2"),
        ({"loss_weights": LossWeights(attributes=0.5), "use_categories": False}, "use_categories"),
    ],
)
def test_the_new_objectives_refuse_configs_they_cannot_train(fields, message) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**fields)


def test_future_objective_refuses_the_sampled_softmax() -> None:
    with pytest.raises(ValueError, match="full softmax"):
        tiny_recommender(interest_loss="sampled", loss_weights=LossWeights(future=0.5))
