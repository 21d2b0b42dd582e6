"""Large-catalogue training paths at small sizes (issue 13.3): the shared-negative repeat
lookup, the row-sparse item table (rec/sparse_table.py: train.item_table), the benchmark's
Taobao-shaped rows and the MFU count."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.gpu_report import _sampled_negatives, flops_per_token
from bench.gpu_taobao import overrides
from bench.scale_train import build_model, rows_batch, scale_configs, sequences
from rec.config_loader import ConfigError
from rec.heads import in_history, in_history_shared
from rec.schedule import lr_lambda
from rec.sparse_table import (
    SparseItemTable,
    all_reduce_rows,
    check_resume,
    dense_parameters,
    resolve_item_table,
    sparse_item_table,
)
from rec.train_config import DeepSpeedConfig, TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("n_items", [5, 40, 3000])
def test_shared_negative_lookup_equals_the_per_row_one(n_items: int) -> None:
    gen = torch.Generator().manual_seed(n_items)
    history = torch.randint(0, n_items + 1, (37, 9), generator=gen)  # zeros: no item
    ids = torch.randint(1, n_items + 1, (64,), generator=gen)  # repeats when n_items is small
    ids[:3] = history[0, -3:].clamp(min=1)  # some certain hits
    want = in_history(history, ids.expand(len(history), -1))
    got = in_history_shared(history, ids)
    assert got.dtype == torch.bool and got.shape == (37, 64)
    assert torch.equal(got, want) and bool(want.any())


def test_mfu_counts_sampled_negatives_not_the_catalogue() -> None:
    full = flops_per_token(64, 2, 256, 100_000)
    sampled = flops_per_token(64, 2, 256, 100_000, n_negatives=2047)
    assert full - sampled == 6 * 64 * (100_000 - 2048)
    cfg = {"model": {"interest_loss": "auto", "sampled_above_items": 1000, "n_negatives": 7}}
    assert _sampled_negatives(cfg | {"data": {"n_items": 999}}) is None
    assert _sampled_negatives(cfg | {"data": {"n_items": 1000}}) == 7


def test_gpu_run_overrides_are_valid_config() -> None:
    for dry in (True, False):
        args = argparse.Namespace(dry=dry, size="large", batch=256)
        model_cfg, train_cfg = scale_configs(overrides(args))
        assert model_cfg.size == ("tiny" if dry else "large")
        assert train_cfg.use_gpu is not dry and model_cfg.interest_loss == "sampled"
        if not dry:
            assert train_cfg.deepspeed.precision == "bf16" and train_cfg.num_workers == 1


def test_taobao_shaped_rows() -> None:
    seqs = sequences(500, 64, max_len=10, seed=0)
    assert seqs.shape == (64, 11) and seqs.min() >= 0 and seqs.max() <= 500
    lengths = (seqs > 0).sum(1)
    assert lengths.min() >= 2 and (lengths == 11).mean() > 0.5  # mostly full windows
    assert all((row[: 11 - n] == 0).all() for row, n in zip(seqs, lengths, strict=True))
    batch = rows_batch(seqs, seed=0)
    real = batch.items > 0
    assert torch.equal(batch.targets[real], torch.as_tensor(seqs[:, 1:])[real])
    assert int((batch.targets[~real] > 0).sum()) == 0
    assert torch.equal(batch.behaviors > 0, real)


def test_auto_loss_is_sampled_from_the_threshold() -> None:
    model_cfg, _ = scale_configs(["model.sampled_above_items=300"])
    assert build_model(model_cfg, 299).interest_loss == "full"
    assert build_model(model_cfg, 300).interest_loss == "sampled"


def test_sparse_item_table_updates_only_touched_rows() -> None:
    model_cfg, train_cfg = scale_configs(["model.sampled_above_items=100", "model.n_negatives=16"])
    torch.manual_seed(0)
    model = build_model(model_cfg, 400)
    table = sparse_item_table(model, train_cfg, steps_per_epoch=10)  # item_table auto: sparse
    assert table is not None and table.param is model.model.item_emb.weight
    dense = torch.optim.AdamW(dense_parameters(model, table), lr=0.01)
    assert all(p is not table.param for p in dense_parameters(model, table))
    assert len(dense_parameters(model, table)) == len(list(model.parameters())) - 1
    before = table.param.detach().clone()
    batch = rows_batch(sequences(400, 8, max_len=10, seed=1), seed=1)
    loss, _ = model.loss(batch)
    loss.backward()
    assert table.param.grad.is_sparse
    touched = table.param.grad.coalesce().indices()[0]
    dense.step()
    table.step()
    changed = (table.param.detach() != before).any(1).nonzero().flatten()
    assert table.param.grad is None
    assert set(changed.tolist()) == set(touched.tolist()) - {0}  # padding row stays zero
    assert len(changed) < 400


def test_item_table_resolves_by_interest_loss_and_refuses_what_cannot_work() -> None:
    auto, sparse = TrainConfig(), TrainConfig(item_table="sparse")
    assert auto.item_table == "auto"
    assert resolve_item_table(auto, "sampled") == "sparse"
    assert resolve_item_table(auto, "full") == "dense"  # full softmax touches every row
    assert resolve_item_table(TrainConfig(item_table="dense"), "sampled") == "dense"
    assert resolve_item_table(sparse, "sampled") == "sparse"
    with pytest.raises(ConfigError, match="train.item_table=sparse needs the sampled"):
        resolve_item_table(sparse, "full")
    bf16 = TrainConfig()
    bf16.deepspeed.precision = "bf16"
    assert resolve_item_table(bf16, "sampled") == "dense"  # auto falls back
    with pytest.raises(ValueError, match="zero_stage 1 or 2, got 3"):
        TrainConfig(item_table="sparse", deepspeed=DeepSpeedConfig(zero_stage=3))
    with pytest.raises(ValueError, match="must be dense, sparse or auto"):
        TrainConfig(item_table="rows")


def _touch_all(emb: torch.nn.Embedding, step: int) -> torch.Tensor:
    """A loss whose gradient reaches every row of `emb`, different at every step."""
    gen = torch.Generator().manual_seed(step)
    idx = torch.cat([torch.arange(emb.num_embeddings), torch.randint(0, 6, (5,), generator=gen)])
    return (emb(idx) * torch.randn(len(idx), emb.embedding_dim, generator=gen)).sum()


def test_sparse_rows_touched_every_step_get_dense_adams_update() -> None:
    """SparseAdam under the job's LR schedule (warm-up then cosine) equals torch's dense Adam
    under the same schedule on rows touched at every step."""
    cfg = TrainConfig(lr=0.05, warmup_steps=3, lr_schedule="cosine", epochs=2)
    torch.manual_seed(0)
    sparse_emb = torch.nn.Embedding(6, 4)
    dense_emb = torch.nn.Embedding(6, 4)
    dense_emb.load_state_dict(sparse_emb.state_dict())
    table = SparseItemTable(sparse_emb, cfg, steps_per_epoch=4)
    adam = torch.optim.Adam(dense_emb.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(adam, lr_lambda(cfg, 4))
    for step in range(8):
        _touch_all(sparse_emb, step).backward()
        assert sparse_emb.weight.grad.is_sparse
        table.step()
        _touch_all(dense_emb, step).backward()
        adam.step()
        adam.zero_grad()
        sched.step()
        assert table.opt.param_groups[0]["lr"] == pytest.approx(adam.param_groups[0]["lr"])
    assert adam.param_groups[0]["lr"] < cfg.lr  # the cosine did decay
    torch.testing.assert_close(sparse_emb.weight, dense_emb.weight, rtol=1e-5, atol=1e-6)


def test_sparse_table_state_round_trips_through_a_checkpoint(tmp_path) -> None:
    """3 steps, save, a fresh table loaded at step 3, 3 more: the weights equal 6 steps in
    one go (moments, step count and LR schedule restored); without the saved state the
    moments restart and the weights differ."""
    cfg = TrainConfig(lr=0.05, warmup_steps=2, lr_schedule="cosine", epochs=2)

    def train(emb, table, steps) -> None:
        for step in steps:
            gen = torch.Generator().manual_seed(step)
            idx = torch.randint(0, 6, (4,), generator=gen)  # some rows untouched: lazy Adam
            (emb(idx) * torch.randn(4, 3, generator=gen)).sum().backward()
            table.step()

    torch.manual_seed(0)
    straight = torch.nn.Embedding(6, 3)
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    train(straight, SparseItemTable(straight, cfg, 3), range(6))

    first = torch.nn.Embedding(6, 3)
    first.load_state_dict(init)
    table = SparseItemTable(first, cfg, 3)
    train(first, table, range(3))
    table.save(tmp_path)
    for saved in (tmp_path, tmp_path / "none"):  # the checkpoint, then one without the file
        resumed = torch.nn.Embedding(6, 3)
        resumed.load_state_dict(first.state_dict())
        again = SparseItemTable(resumed, cfg, 3)
        again.load(saved, step=3)
        assert again.opt.param_groups[0]["lr"] == pytest.approx(cfg.lr * lr_lambda(cfg, 3)(3))
        train(resumed, again, range(3, 6))
        same = torch.equal(resumed.weight, straight.weight)
        assert same == (saved == tmp_path), saved


def test_resume_needs_the_item_table_the_checkpoint_was_trained_with(tmp_path) -> None:
    dense_ckpt, sparse_ckpt = tmp_path / "dense", tmp_path / "sparse"
    dense_ckpt.mkdir()
    emb = torch.nn.Embedding(4, 2)
    table = SparseItemTable(emb, TrainConfig(), steps_per_epoch=2)
    emb(torch.tensor([1, 2])).sum().backward()
    table.step()
    sparse_ckpt.mkdir()
    table.save(sparse_ckpt)
    check_resume(str(dense_ckpt), "dense")
    check_resume(str(sparse_ckpt), "sparse")
    with pytest.raises(ConfigError, match="set train.item_table=sparse"):
        check_resume(str(sparse_ckpt), "dense")
    with pytest.raises(ConfigError, match="set train.item_table=dense"):
        check_resume(str(dense_ckpt), "sparse")


def _gather_rows(rank: int, path: str, out: dict) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(path, 2), rank=rank, world_size=2)
    idx = torch.tensor([[1, 3, 3]]) if rank == 0 else torch.tensor([[3, 5]])
    val = torch.arange(len(idx[0]) * 2, dtype=torch.float32).view(-1, 2) + 10 * rank
    summed = all_reduce_rows(torch.sparse_coo_tensor(idx, val, (6, 2)).coalesce())
    out[rank] = summed.to_dense()
    dist.destroy_process_group()


def test_row_gradients_are_summed_across_ranks(tmp_path) -> None:
    out = mp.Manager().dict()
    mp.spawn(_gather_rows, args=(str(tmp_path / "store"), out), nprocs=2)
    want = torch.zeros(6, 2)
    want[1] = torch.tensor([0.0, 1.0])
    want[3] = torch.tensor([2.0 + 4.0, 3.0 + 5.0]) + torch.tensor([10.0, 11.0])
    want[5] = torch.tensor([12.0, 13.0])
    for rank in (0, 1):
        np.testing.assert_allclose(out[rank].numpy(), want.numpy())


def test_served_catalogue_extends_the_log_to_n_items(tmp_path) -> None:
    from bench.scale_serve import EXTRA_ID, build_model_dir
    from rec.export import load_export
    from serve.catalog import Catalog

    out = build_model_dir(tmp_path, n_items=3000, n_users=60)
    assert out["items"] == 3000 and out["index"] is False  # "auto": exact below 200k
    catalog = Catalog.load(tmp_path / "export")
    assert catalog.n_items == 3000
    ids = catalog.item_ids[1:]
    assert len(np.unique(ids)) == 3000 and (ids >= EXTRA_ID).sum() > 0
    assert (catalog.categories[1:] > 0).any(1).all()  # every item has a category
    assert load_export(tmp_path / "export").dims.n_items == 3000
