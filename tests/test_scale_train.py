"""Large-catalogue training paths at small sizes (issue 13.3): the shared-negative repeat
lookup, the row-sparse item table, the benchmark's Taobao-shaped rows and the MFU count."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.gpu_report import _sampled_negatives, flops_per_token
from bench.gpu_taobao import overrides
from bench.scale_sparse import SparseItemTable, all_reduce_rows
from bench.scale_train import build_model, rows_batch, scale_configs, sequences
from rec.heads import in_history, in_history_shared

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
    model_cfg, _ = scale_configs(["model.sampled_above_items=100", "model.n_negatives=16"])
    torch.manual_seed(0)
    model = build_model(model_cfg, 400)
    table = SparseItemTable(model, lr=0.01)
    dense = torch.optim.AdamW(table.dense_parameters(), lr=0.01)
    assert all(p is not table.param for p in table.dense_parameters())
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
