"""The item table trained row-sparse beside DeepSpeed: `train.item_table` (issue 13.3). No Ray.

Under DeepSpeed every step of a dense item table (4.16M x 64 fp32: 1.07 GB) costs a dense
gradient of the same size, its reduce across ranks and an Adam pass over all 266M weights,
though one Taobao-shaped step touches ~8k rows (128 x 50 inputs and targets + 2,048 shared
negatives): 13 s a step on 2 CPU workers against 0.7 s row-sparse (bench/README.md, training
at scale). Row-sparse, the item embedding emits a sparse gradient (`nn.Embedding(sparse=True)`),
the ranks exchange only the touched rows (all-gather of indices and values) and
`torch.optim.SparseAdam` updates them; DeepSpeed keeps everything else (backbone, heads,
the category table) under its ZeRO stage.

    table = sparse_item_table(recommender, cfg, steps_per_epoch)   # None: the table is dense
    engine = deepspeed_engine(recommender, cfg, steps, dense_parameters(recommender, table))
    loss, _ = engine(batch); engine.backward(loss)
    if optimizer_step(engine, table): ...                          # an optimizer step was taken

What differs from the dense path, said plainly:
  - the LR schedule is the same (rec.schedule.lr_lambda: warm-up, constant or cosine), stepped
    on the same optimizer steps;
  - the item rows are outside DeepSpeed's global-norm clipping (train.deepspeed.
    gradient_clipping clips the other parameters' norm only) and get no weight decay
    (SparseAdam has none);
  - Adam is "lazy": a row no batch touched keeps its weights and moments (dense Adam would
    still move it by its decaying momentum); rows touched at every step get dense Adam's update.

Checkpoints: the weights are part of the module (DeepSpeed saves and loads them); SparseAdam's
moments and step count are saved beside them as safetensors (`save` / `load`), replicated on
every rank (every rank applies the same all-reduced rows), so rank 0 writes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from rec.config_loader import ConfigError
from rec.logs import get_logger
from rec.schedule import lr_lambda
from rec.train_config import TrainConfig

log = get_logger("train")
STATE_FILE = "sparse_item_table.safetensors"  # in a checkpoint directory, beside state.json


def sparse_unsupported(cfg: TrainConfig) -> str | None:
    """Why the DeepSpeed settings cannot train the table row-sparse (None: they can)."""
    ds = cfg.deepspeed
    if ds.zero_stage not in (1, 2):
        return (
            f"needs train.deepspeed.zero_stage 1 or 2, got {ds.zero_stage} (ZeRO-3 partitions "
            "the table itself; stage 0 all-reduces every gradient, the table's too)"
        )
    if ds.precision != "fp32":
        return (
            "needs train.deepspeed.precision=fp32 (under bf16 DeepSpeed casts the table to "
            "bf16 and SparseAdam would update the rounded copy)"
        )
    if ds.offload_optimizer:
        return "does not combine with train.deepspeed.offload_optimizer (untested)"
    return None


def resolve_item_table(cfg: TrainConfig, interest_loss: str) -> Literal["dense", "sparse"]:
    """`train.item_table` -> "dense" or "sparse". "auto": sparse iff the interest loss resolved
    to sampled softmax (a step then touches a few rows of a large catalogue; full softmax
    touches every row) and the DeepSpeed settings allow it; else dense. An explicit "sparse"
    that cannot work is a ConfigError naming the key."""
    if cfg.item_table == "dense":
        return "dense"
    why = sparse_unsupported(cfg)
    if why is None and interest_loss != "sampled":
        why = (
            "needs the sampled interest loss (model.interest_loss=sampled, or auto at >= "
            "model.sampled_above_items items): full softmax touches every row at every step"
        )
    if cfg.item_table == "auto":
        return "dense" if why else "sparse"
    if why:
        raise ConfigError(f"train.item_table=sparse {why}")
    return "sparse"


class SparseItemTable:
    """An item embedding on a sparse gradient, its own SparseAdam and LR schedule."""

    def __init__(self, emb: nn.Embedding, cfg: TrainConfig, steps_per_epoch: int) -> None:
        emb.sparse = True  # read by every forward (F.embedding(..., sparse=self.sparse))
        self.param = emb.weight
        self.opt = torch.optim.SparseAdam([self.param], lr=cfg.lr)
        self.factor = lr_lambda(cfg, steps_per_epoch)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.factor)

    def step(self) -> None:
        """One optimizer step: the touched rows' gradients averaged over ranks (as DeepSpeed
        averages the dense ones), SparseAdam, the gradient cleared, the schedule advanced."""
        grad = self.param.grad
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        if grad is None and distributed:  # every rank joins the exchange, even with no rows
            rows = torch.empty(1, 0, dtype=torch.long, device=self.param.device)
            empty = self.param.new_zeros(0, self.param.shape[1])
            grad = torch.sparse_coo_tensor(rows, empty, self.param.shape, check_invariants=True)
        if grad is not None:
            grad = grad.coalesce()
            if distributed:
                grad = all_reduce_rows(grad) / dist.get_world_size()
            self.param.grad = grad
            self.opt.step()
            self.param.grad = None
        self.sched.step()

    def save(self, directory: str | Path) -> None:
        """SparseAdam's state as safetensors in `directory` (nothing before its first step)."""
        from safetensors.torch import save_file

        state = self.opt.state.get(self.param)
        if state:
            tensors = {k: state[k].detach().cpu().contiguous() for k in ("exp_avg", "exp_avg_sq")}
            tensors["step"] = torch.tensor([int(state["step"])], dtype=torch.int64)
            save_file(tensors, str(Path(directory) / STATE_FILE))

    def load(self, directory: str | Path, step: int) -> None:
        """SparseAdam's state from `directory` (written by `save`), and the LR schedule at
        optimizer step `step`. A checkpoint without the file (saved by the dense path, or
        before the first step) leaves the moments at zero: they restart, and the log says so."""
        from safetensors.torch import load_file

        path = Path(directory) / STATE_FILE
        if path.exists():
            saved = load_file(str(path), device=str(self.param.device))
            self.opt.state[self.param] = {
                "step": int(saved["step"][0]),
                "exp_avg": saved["exp_avg"],
                "exp_avg_sq": saved["exp_avg_sq"],
            }
        elif step > 0:
            log.warning("no %s in the checkpoint: the item rows' Adam moments restart", STATE_FILE)
        self.sched.last_epoch = step
        for group, base in zip(self.opt.param_groups, self.sched.base_lrs, strict=True):
            group["lr"] = base * self.factor(step)


def check_resume(resume_from: str, item_table: str) -> None:
    """A checkpoint resumes only under the item table it was trained with: DeepSpeed's
    optimizer state holds the table's moments (dense) or does not (sparse), so the other
    setting cannot load it. A ConfigError in the driver, before Ray Train starts."""
    from rec import storage

    saved = "sparse" if storage.exists(storage.join(resume_from, STATE_FILE)) else "dense"
    if saved != item_table:
        raise ConfigError(
            f"train.resume_from {resume_from} was trained with a {saved} item table, this run's "
            f"train.item_table resolves to {item_table}: set train.item_table={saved}"
        )


def sparse_item_table(recommender: nn.Module, cfg: TrainConfig, steps_per_epoch: int):
    """The recommender's item table as a SparseItemTable when `train.item_table` resolves to
    sparse for it (`resolve_item_table`), else None (DeepSpeed trains it with the rest)."""
    if resolve_item_table(cfg, recommender.interest_loss) == "dense":
        return None
    return SparseItemTable(recommender.model.item_emb, cfg, steps_per_epoch)


def dense_parameters(model: nn.Module, table: SparseItemTable | None) -> list[nn.Parameter]:
    """The parameters DeepSpeed's optimizer owns: all but a sparse table's."""
    return [p for p in model.parameters() if table is None or p is not table.param]


def optimizer_step(engine, table: SparseItemTable | None) -> bool:
    """`engine.step()`, then the table's where DeepSpeed took an optimizer step (the end of a
    gradient accumulation); True iff it did. Read from DeepSpeed's step count: its
    `is_gradient_accumulation_boundary()` describes the next micro-batch once `step()` ran."""
    before = engine.global_steps
    engine.step()
    took = engine.global_steps > before
    if took and table is not None:
        table.step()
    return took


def all_reduce_rows(grad: torch.Tensor) -> torch.Tensor:
    """Sum of every rank's sparse row gradient (coalesced), exchanging only touched rows."""
    world = dist.get_world_size()
    idx, val = grad.indices()[0], grad.values()  # (R,), (R, D)
    dev = idx.device  # the backend's: gloo on CPU, nccl on a GPU
    sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(idx)], dtype=torch.long, device=dev))
    most = int(max(s.item() for s in sizes))
    pad_idx = torch.zeros(most, dtype=idx.dtype, device=dev)
    pad_val = torch.zeros(most, val.shape[1], dtype=val.dtype, device=dev)
    pad_idx[: len(idx)], pad_val[: len(idx)] = idx, val
    all_idx = [torch.empty_like(pad_idx) for _ in range(world)]
    all_val = [torch.empty_like(pad_val) for _ in range(world)]
    dist.all_gather(all_idx, pad_idx)
    dist.all_gather(all_val, pad_val)
    keep = [slice(0, int(s.item())) for s in sizes]
    rows = torch.cat([i[k] for i, k in zip(all_idx, keep, strict=True)])
    vals = torch.cat([v[k] for v, k in zip(all_val, keep, strict=True)])
    # Indices checked against the shape (one pass over ~16k rows a step): a bad gather raises
    # here instead of corrupting memory in SparseAdam.
    size = grad.shape
    return torch.sparse_coo_tensor(rows.unsqueeze(0), vals, size, check_invariants=True).coalesce()
