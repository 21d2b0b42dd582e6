"""DeepSpeed for one training worker (no Ray): process settings, the config dict, the engine.

    worker_env(cfg, extensions_dir)                        # before DeepSpeed is imported
    engine = deepspeed_engine(model, cfg, steps_per_epoch)  # AdamW + LR schedule, ZeRO stage

With `train.deepspeed.offload_optimizer` DeepSpeed builds the optimizer itself
(DeepSpeedCPUAdam, the step on the CPU) from the config dict, with its WarmupLR schedule;
otherwise the engine wraps torch's AdamW and `rec.schedule.lr_lambda`.
"""

from __future__ import annotations

import contextlib
import os

import torch

from rec.schedule import lr_lambda
from rec.train_config import TrainConfig


def full_parameters(engine, zero_stage: int) -> contextlib.AbstractContextManager:
    """Every parameter whole on every rank for code that is not the module's forward.

    ZeRO-3 gathers a partitioned parameter only inside the forward hooks of the module that
    owns it; validation calls other methods (`next_item_scores` reads `repeat_logit` and the
    item table directly), which would see empty shards. Below stage 3 nothing is partitioned.
    """
    if zero_stage < 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


def fp32_state_dict(engine, zero_stage: int, keep: bool) -> dict[str, torch.Tensor] | None:
    """The module's full weights in fp32 on the rank that keeps them (None elsewhere): the
    optimizer's fp32 master weights wherever DeepSpeed keeps them (bf16, every ZeRO stage),
    else the parameters themselves (plain fp32 without a ZeRO optimizer), plus the buffers.

    Under bf16 the module's parameters are bf16 copies rounded from the master weights; an
    export of those would lose the low mantissa bits training kept. Every rank must call it:
    assembling a master weight is a collective (all-reduce of ZeRO 1/2 fragments, all-gather
    of ZeRO-3 partitions), as is ZeRO-3's gather of the parameters themselves."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    out: dict[str, torch.Tensor] = {}
    with full_parameters(engine, zero_stage):  # ZeRO-3: a whole parameter if no master copy
        for name, param in module.named_parameters(remove_duplicate=False):
            master = safe_get_full_fp32_param(param)  # None: no master copy of this one
            if keep:
                out[name] = (param if master is None else master).detach().float().cpu().clone()
        if not keep:
            return None
        for name, tensor in module.state_dict().items():
            if name not in out:  # buffers (item_categories): whole on every rank
                out[name] = tensor.detach().cpu().clone()
    return out


def worker_env(cfg: TrainConfig, extensions_dir: str) -> None:
    """DeepSpeed's accelerator and compiled-ops cache, and this worker's torch threads."""
    if not cfg.use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # read once, when deepspeed is first imported
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir)
    torch.set_num_threads(cfg.threads_per_worker or max(1, round(cfg.cpus_per_worker + 0.49)))


def deepspeed_config(cfg: TrainConfig) -> dict:
    """The DeepSpeed config dict: micro-batch, accumulation, clipping, ZeRO stage, precision."""
    ds = cfg.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage == 3 and ds.param_persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = ds.param_persistence_threshold
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.use_gpu}
    out = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer:  # DeepSpeed builds DeepSpeedCPUAdam for an offloaded AdamW
        out["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay},
        }
        out["scheduler"] = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0,
                "warmup_max_lr": cfg.lr,
                "warmup_num_steps": max(1, cfg.warmup_steps),
            },
        }
    return out


def deepspeed_engine(model: torch.nn.Module, cfg: TrainConfig, steps_per_epoch: int, params=None):
    """`deepspeed.initialize` on the process group Ray Train set up -> the engine (which calls
    model.forward, backward and the optimizer step). Call `worker_env` first.

    params: the parameters DeepSpeed's optimizer owns (default: all of the model's); others
    are left to the caller (rec/sparse_table.py: the item table trained row-sparse)."""
    import deepspeed  # here, after worker_env: DeepSpeed picks its accelerator at import

    params = list(model.parameters()) if params is None else list(params)
    offload = cfg.deepspeed.offload_optimizer
    # On a GPU torch's fused AdamW: one kernel over all parameters instead of ~10 per tensor
    # (ZeRO hands it its flat fp32 partitions; DeepSpeed's own FusedAdam needs a CUDA build).
    fused = {"fused": True} if cfg.use_gpu and torch.cuda.is_available() else {}
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, steps_per_epoch))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=None if offload else opt,
        lr_scheduler=None if offload else sched,
        model_parameters=params if offload else None,
        config=deepspeed_config(cfg),
    )
    return engine
