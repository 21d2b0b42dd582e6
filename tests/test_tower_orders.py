"""`model.tower_orders`: each tower of an ensemble learns from its own batch order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs.config import RunConfig
from rec.config_loader import load_config
from rec.data.batch import Batch, length_batches, tower_batches
from rec.model import ModelConfig
from rec.resume import epoch_rng, tower_rng
from tests.test_model import make_batch, random_sequences, tiny_recommender

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rows(n: int = 40, seed: int = 0) -> Batch:
    return make_batch(random_sequences(n, seed=seed), max_len=12)


def test_each_tower_gets_every_row_once_in_its_own_order() -> None:
    data = rows()
    rngs = [tower_rng(7, 3, k) for k in range(3)]
    steps = list(tower_batches(data, 8, rngs, bucket_rows=16))
    # tower 0's order is the run's own (what a single network would train on)
    plain = list(length_batches(data, 8, epoch_rng(7, 3), 16))
    assert len(steps) == len(plain) == 5
    for (idx, batches), (want_idx, want) in zip(steps, plain, strict=True):
        assert np.array_equal(idx, want_idx) and torch.equal(batches[0].items, want.items)
    per_tower = [
        torch.cat([batches[k].items for _, batches in steps]) for k in range(3)
    ]  # (40, 12) each: every row once
    keys = [sorted(map(tuple, t.tolist())) for t in per_tower]
    assert keys[0] == keys[1] == keys[2] == sorted(map(tuple, data.items.tolist()))
    assert not torch.equal(per_tower[0], per_tower[1])  # different orders
    assert not torch.equal(per_tower[1], per_tower[2])
    with pytest.raises(ValueError, match="in memory"):
        next(tower_batches(iter([data]), 8, rngs))


def test_shared_batches_give_the_shared_batch_loss() -> None:
    """The same batch for every tower is exactly the ensemble's usual loss (eval: no dropout)."""
    model = tiny_recommender(seed=2, members=3, aux_detach=True, tower_orders=True).eval()
    batch = rows(12, seed=5)
    total, logs = model.loss(batch)
    total_k, logs_k = model.loss([batch, batch, batch])
    torch.testing.assert_close(total_k, total)
    for name in ("loss_interest", "loss_relevance", "loss_diversity"):
        assert abs(logs_k[name] - logs[name]) < 1e-5, (name, logs_k[name], logs[name])


def test_a_tower_learns_only_from_its_own_batch() -> None:
    """Changing tower 1's batch changes tower 1's gradients only; the heads learn from batch 0."""
    model = tiny_recommender(seed=3, members=3, aux_detach=True, tower_orders=True).eval()
    b0, b1, b2 = rows(10, seed=1), rows(10, seed=2), rows(10, seed=3)

    def grads(batches: list[Batch]) -> list[dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        model.loss(batches)[0].backward()
        towers = [
            {n: p.grad.clone() for n, p in t.named_parameters() if p.grad is not None}
            for t in model.model.towers
        ]
        heads = {n: p.grad.clone() for n, p in model.relevance_head.named_parameters()}
        return [*towers, heads]

    before, after = grads([b0, b1, b2]), grads([b0, rows(10, seed=9), b2])
    for k, same in ((0, True), (1, False), (2, True), (3, True)):  # 3: the relevance head
        equal = all(torch.equal(before[k][n], after[k][n]) for n in before[k])
        assert equal == same, k
    assert before[1], "tower 1 got no gradient"


def test_tower_orders_refuses_what_it_cannot_train() -> None:
    with pytest.raises(ValueError, match="tower_orders needs"):
        ModelConfig(members=1, aux_detach=True, tower_orders=True)
    with pytest.raises(ValueError, match="tower_orders needs"):
        ModelConfig(members=2, aux_detach=False, tower_orders=True)
    model = tiny_recommender(seed=0, members=2, aux_detach=True, tower_orders=True)
    with pytest.raises(ValueError, match="one batch per tower"):
        model.loss([rows(4)])
    over = ["model.members=2", "model.aux_detach=true", "model.tower_orders=true"]
    with pytest.raises(ValueError, match="shard_in_memory"):
        load_config(RunConfig, None, [*over, "train.shard_in_memory=false"])
    assert load_config(RunConfig, None, over).model.tower_orders
