"""The item table trained row-sparse beside DeepSpeed (the alternative measured in issue 13.3).

Under DeepSpeed every step of a dense item table (4.16M x 64 fp32: 1.07 GB) costs a dense
gradient of the same size, its reduce across ranks and an Adam pass over all 266M weights,
though one Taobao-shaped step touches ~8k rows (128 x 50 inputs and targets + 2,048 shared
negatives). Here the item embedding emits a sparse gradient (`nn.Embedding(sparse=True)`),
the ranks exchange only the touched rows (all-gather of indices and values), and
`torch.optim.SparseAdam` ("lazy" Adam: moments of untouched rows stay as they are) updates
them; DeepSpeed keeps everything else (the backbone, heads and the category table).

    table = SparseItemTable(recommender, lr)
    engine = deepspeed_engine(recommender, cfg, steps, params=table.dense_parameters())
    loss, _ = engine(batch); engine.backward(loss); engine.step(); table.step()

Differences from the dense path, said plainly: the item rows are outside DeepSpeed's gradient
clipping and LR schedule (constant lr), and weight decay does not reach them. A benchmark
path only (bench/scale_train.py `zero_stage="sparse"`): the training job's checkpoints do
not hold SparseAdam's state.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class SparseItemTable:
    """The Recommender's item embedding on a sparse gradient and its own SparseAdam."""

    def __init__(self, recommender: nn.Module, lr: float) -> None:
        emb = recommender.model.item_emb
        emb.sparse = True  # read by every forward (F.embedding(..., sparse=self.sparse))
        self.param = emb.weight
        self.model = recommender
        self.opt = torch.optim.SparseAdam([self.param], lr=lr)

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the item table: what DeepSpeed's optimizer should own."""
        return [p for p in self.model.parameters() if p is not self.param]

    def step(self) -> None:
        """Average the touched rows' gradients over ranks, update them, clear the gradient."""
        grad = self.param.grad
        if grad is None:
            return
        grad = grad.coalesce()
        if dist.is_initialized() and dist.get_world_size() > 1:
            grad = all_reduce_rows(grad) / dist.get_world_size()
        self.param.grad = grad
        self.opt.step()
        self.param.grad = None


def all_reduce_rows(grad: torch.Tensor) -> torch.Tensor:
    """Sum of every rank's sparse row gradient (coalesced), exchanging only touched rows."""
    world = dist.get_world_size()
    idx, val = grad.indices()[0], grad.values()  # (R,), (R, D)
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(idx)], dtype=torch.long))
    most = int(max(s.item() for s in sizes))
    pad_idx = torch.zeros(most, dtype=idx.dtype)
    pad_val = torch.zeros(most, val.shape[1], dtype=val.dtype)
    pad_idx[: len(idx)], pad_val[: len(idx)] = idx, val
    all_idx = [torch.empty_like(pad_idx) for _ in range(world)]
    all_val = [torch.empty_like(pad_val) for _ in range(world)]
    dist.all_gather(all_idx, pad_idx)
    dist.all_gather(all_val, pad_val)
    keep = [slice(0, int(s.item())) for s in sizes]
    rows = torch.cat([i[k] for i, k in zip(all_idx, keep, strict=True)])
    vals = torch.cat([v[k] for v, k in zip(all_val, keep, strict=True)])
    return torch.sparse_coo_tensor(rows.unsqueeze(0), vals, grad.shape).coalesce()
