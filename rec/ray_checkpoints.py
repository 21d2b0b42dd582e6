"""Checkpoints of the Ray Train + DeepSpeed loop (part of the distributing layer: Ray Train).

A checkpoint directory holds

    deepspeed/   every rank's DeepSpeed shard (tag CKPT_TAG), what a restarted run resumes from
    state.json   the loop's counters (rec/resume.py: epoch, step, epoch_batches, ...) (rank 0)
    sparse_item_table.safetensors  with train.item_table sparse: the item rows' SparseAdam
                 moments and step (rank 0; rec/sparse_table.py; the rows are in deepspeed/)
    export/      the consolidated serving export: safetensors + config (rank 0, rec.export);
                 epoch ends only: a mid-epoch checkpoint is for resuming, never served

`save_and_report` writes one and hands it to `ray.train.report` with its metrics;
`restore` reads the latest one after a failure (or `train.resume_from`).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import ray.train
from ray.train import Checkpoint

from rec import artifacts, storage
from rec.deepspeed_setup import fp32_state_dict
from rec.export import save_export
from rec.logs import get_logger
from rec.resume import fresh_state
from rec.train_config import TrainConfig

log = get_logger("train")
CKPT_TAG = "ds"  # DeepSpeed checkpoint tag (a subdirectory; "latest" is its pointer file)


def restore(engine, resume_from: str | None, table=None) -> dict:
    """Latest checkpoint of this run (after a failure), else `resume_from`, else fresh: the
    loop's counters, with the engine's weights and optimizer state loaded in place (and a
    SparseItemTable's optimizer state and LR schedule, `table`)."""
    state = fresh_state()  # older checkpoints lack epoch_batches: they are epoch ends
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        ckpt = newest_persisted(ckpt)
    if ckpt is None and resume_from:
        path, fs = storage.for_ray(resume_from)  # a local path or a URI
        ckpt = Checkpoint(path, filesystem=fs)
    if ckpt is None:
        return state
    with ckpt.as_directory() as d:
        artifacts.verify(str(d))  # every rank's files complete and unaltered, else one line
        engine.load_checkpoint(str(Path(d) / "deepspeed"), tag=CKPT_TAG)
        state |= json.loads((Path(d) / "state.json").read_text())
        if table is not None:
            table.load(d, state["step"])
    log.info(
        "resumed at epoch %d step %d (batches done in the epoch: %d)",
        state["epoch"],
        state["step"],
        state["epoch_batches"],
    )
    return state


def newest_persisted(registered: Checkpoint) -> Checkpoint:
    """The newest complete checkpoint of this run: `registered` (Ray Train's latest), or one
    saved after it in the same run directory whose manifest verifies and whose state.json
    step is larger. Ray Train's controller registers a report up to ~2 s after a worker made
    it; a worker killed in that window leaves a fully persisted checkpoint that Ray does not
    know, and resuming from the registered one would redo up to another interval of steps.
    Later means a later name (checkpoint_<date-time>): an older fit's checkpoints in the
    same directory never count. Every rank lists the same directory after the old group is
    gone, so all pick the same one. The pick is not Ray's: it never prunes it."""
    try:
        uri = storage.to_uri(registered.filesystem, registered.path).rstrip("/")
    except storage.StorageError:  # a filesystem without a URI scheme: Ray's pick
        return registered
    parent, name = uri.rsplit("/", 1)
    best_step, best = _saved_step(uri), registered
    for d in storage.listdir(parent):
        later = d.rstrip("/").rsplit("/", 1)[-1]
        if not later.startswith("checkpoint_2") or later <= name:  # not checkpoint_manager_*
            continue
        step = _saved_step(d)
        if step is None or best_step is None or step <= best_step:
            continue
        try:
            artifacts.verify(d)  # rare (only after such a kill): hashes too, or a torn file
            # would fail every restart's load in turn
        except (ValueError, OSError):  # ArtifactError, StorageError: half-written
            continue
        path, fs = storage.for_ray(d)
        best_step, best = step, Checkpoint(path, filesystem=fs)
    return best


def _saved_step(checkpoint_dir: str) -> int | None:
    """The loop's step count saved in a checkpoint (None: no readable state.json)."""
    try:
        return int(
            json.loads(storage.read_text(storage.join(checkpoint_dir, "state.json")))["step"]
        )
    except (OSError, ValueError, KeyError):
        return None


def lineage(resume_from: str | None) -> list[tuple[Checkpoint, dict]]:
    """The epoch-end checkpoints (with an export) of the run `resume_from` came from, up to
    its step, each with the metrics its export recorded. A run continued with
    `train.resume_from` carries that run's best score in state.json, so its best validated
    epoch may be one of these, not one of its own."""
    if not resume_from:
        return []
    upto = json.loads(storage.read_text(storage.join(resume_from, "state.json")))["step"]
    found = []
    for d in storage.listdir(resume_from.rstrip("/").rsplit("/", 1)[0]):
        config, state = (
            storage.join(d, "export", "model_config.json"),
            storage.join(d, "state.json"),
        )
        if not (storage.exists(config) and storage.exists(state)):
            continue  # a mid-epoch checkpoint, or one a killed run left half-written
        if json.loads(storage.read_text(state))["step"] <= upto:
            path, fs = storage.for_ray(d)
            metrics = json.loads(storage.read_text(config))["extra"]["metrics"]
            found.append((Checkpoint(path, filesystem=fs), metrics))
    return found


def save_and_report(
    engine, state: dict, metrics: dict, cfg: TrainConfig, export: bool = True, table=None
):
    """Every rank saves its DeepSpeed shard and a manifest of what it wrote (rank 0's
    MANIFEST.json names the other ranks' parts: rec/artifacts.py); rank 0 adds the state (and
    a SparseItemTable's optimizer state, `table`: the same on every rank) and, with `export`,
    the serving export (every rank joins its ZeRO-3 gather)."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(str(Path(tmp) / "deepspeed"), tag=CKPT_TAG)
        zero_stage = cfg.deepspeed.zero_stage
        weights = fp32_state_dict(engine, zero_stage, keep=rank == 0) if export else None
        if rank == 0:
            (Path(tmp) / "state.json").write_text(json.dumps(state))
            if table is not None:
                table.save(tmp)
        if rank == 0 and export:
            save_export(
                engine.module, Path(tmp) / "export", extra={"metrics": metrics}, state_dict=weights
            )
        parts = {"parts": tuple(f"rank-{r}" for r in range(1, world))} if rank == 0 else {}
        artifacts.write_manifest(
            tmp,
            kind="checkpoint",
            producer="jobs.train",
            config=asdict(cfg),
            part=None if rank == 0 else f"rank-{rank}",
            **parts,
        )
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
