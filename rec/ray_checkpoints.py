"""Checkpoints of the Ray Train + DeepSpeed loop (part of the distributing layer: Ray Train).

A checkpoint directory holds

    deepspeed/   every rank's DeepSpeed shard (tag CKPT_TAG), what a restarted run resumes from
    state.json   the loop's counters {"epoch", "step", "best", "bad_evals"} (rank 0)
    export/      the consolidated serving export: safetensors + config (rank 0, rec.export)

`save_and_report` writes one and hands it to `ray.train.report` with the epoch's metrics;
`restore` reads the latest one after a failure (or `train.resume_from`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import ray.train
import torch
from ray.train import Checkpoint

from rec import storage
from rec.export import save_export

CKPT_TAG = "ds"  # DeepSpeed checkpoint tag (a subdirectory; "latest" is its pointer file)


def restore(engine, resume_from: str | None) -> dict:
    """Latest checkpoint of this run (after a failure), else `resume_from`, else fresh: the
    loop's counters, with the engine's weights and optimizer state loaded in place."""
    state = {"epoch": 0, "step": 0, "best": float("-inf"), "bad_evals": 0}
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and resume_from:
        path, fs = storage.for_ray(resume_from)  # a local path or a URI
        ckpt = Checkpoint(path, filesystem=fs)
    if ckpt is None:
        return state
    with ckpt.as_directory() as d:
        engine.load_checkpoint(str(Path(d) / "deepspeed"), tag=CKPT_TAG)
        state |= json.loads((Path(d) / "state.json").read_text())
    print(f"[train] resumed at epoch {state['epoch']} step {state['step']}", flush=True)
    return state


def save_and_report(engine, state: dict, metrics: dict, rank: int, zero_stage: int) -> None:
    """Every rank saves its DeepSpeed shard; rank 0 adds the serving export and the state."""
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(str(Path(tmp) / "deepspeed"), tag=CKPT_TAG)
        weights = consolidated_state_dict(engine, zero_stage, keep=rank == 0)
        if rank == 0:
            (Path(tmp) / "state.json").write_text(json.dumps(state))
            save_export(
                engine.module, Path(tmp) / "export", extra={"metrics": metrics}, state_dict=weights
            )
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def consolidated_state_dict(engine, zero_stage: int, keep: bool) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights of the module on the rank that keeps them (None elsewhere).

    ZeRO-3 gathers its parameter shards, which every rank must join; below stage 3 each rank
    already holds the full weights and only the keeping rank copies them.
    """
    module = engine.module
    if zero_stage < 3:
        return (
            {k: v.detach().float().cpu() for k, v in module.state_dict().items()} if keep else None
        )
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        if not keep:
            return None
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
