"""The model's switchable parts (issue 19's search and ablations): the contrastive view, label
smoothing, and the category / behavior inputs switched off."""

from __future__ import annotations

import pytest
import torch

from rec.heads import contrastive_loss, interest_full_loss
from rec.model import LossWeights
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
