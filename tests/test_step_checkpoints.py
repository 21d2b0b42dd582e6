"""Step-level checkpoints (`train.checkpoint_every_steps`) and the mid-epoch resume they allow:
the bookkeeping in rec/resume.py as pure functions, then one killed worker on a local Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.config import RunConfig
from rec.config_loader import ConfigError, load_config
from rec.data.batch import length_batches
from rec.resume import (
    after_epoch,
    batch_seed,
    checkpoint_due,
    epoch_rng,
    fresh_state,
    resume_batches,
)
from tests.conftest import ROOT
from tests.test_batch import row_ids, rows_with_ids
from tests.test_train_ray import engine_steps

SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"


# --- the bookkeeping, without Ray ---------------------------------------------------------


def epoch_order(lengths: list[int], seed: int, epoch: int, batch_size: int, bucket: int):
    """An epoch's batches as lists of row ids, in the order training takes them."""
    rows = rows_with_ids(lengths)
    return [row_ids(b) for _, b in length_batches(rows, batch_size, epoch_rng(seed, epoch), bucket)]


@settings(max_examples=40)
@given(
    st.lists(st.integers(0, 8), min_size=1, max_size=40),
    st.integers(1, 6),
    st.integers(1, 20),
    st.integers(0, 2**16),
    st.integers(0, 50),
    st.data(),
)
def test_resume_takes_exactly_the_batches_an_uninterrupted_epoch_had_left(
    lengths, batch_size, bucket, seed, epoch, data
):
    """A fresh process (a new generator from (seed, epoch) alone) that skips the k batches
    its checkpoint had trained gets the rest of the epoch: same batches, same order, each
    with its index in the epoch; `last` marks only the final one."""
    full = epoch_order(lengths, seed, epoch, batch_size, bucket)
    skip = data.draw(st.integers(0, len(full)))
    rows = rows_with_ids(lengths)
    fresh = length_batches(rows, batch_size, epoch_rng(seed, epoch), bucket)
    rest = list(resume_batches(fresh, skip))
    assert [k for k, _, _ in rest] == list(range(skip, len(full)))
    assert [row_ids(b) for _, (_, b), _ in rest] == full[skip:]
    assert [last for _, _, last in rest] == [k == len(full) - 1 for k in range(skip, len(full))]


def test_epoch_order_depends_on_seed_and_epoch_only():
    lengths = [i % 7 for i in range(60)]
    a = epoch_order(lengths, 3, 4, 5, 20)
    assert a == epoch_order(lengths, 3, 4, 5, 20)  # another attempt: the same order
    assert a != epoch_order(lengths, 3, 5, 5, 20)  # another epoch: another order
    assert a != epoch_order(lengths, 4, 4, 5, 20)  # another seed: another order


def test_resume_batches_on_a_stream_and_past_its_end():
    stream = (x for x in "abcd")  # a one-pass iterator, as Ray Data's streams are
    assert list(resume_batches(stream, 1)) == [(1, "b", False), (2, "c", False), (3, "d", True)]
    assert list(resume_batches(iter("ab"), 2)) == []
    assert list(resume_batches([], 0)) == []
    with pytest.raises(ValueError, match="skip"):
        list(resume_batches("ab", -1))


def test_batch_seed_is_a_function_of_its_arguments_and_differs_between_them():
    seeds = {batch_seed(0, r, e, k) for r in range(2) for e in range(3) for k in range(50)}
    assert len(seeds) == 2 * 3 * 50
    assert batch_seed(7, 1, 2, 3) == batch_seed(7, 1, 2, 3)
    torch.manual_seed(batch_seed(7, 1, 2, 3))  # a valid torch seed
    a = torch.rand(3)
    torch.manual_seed(batch_seed(7, 1, 2, 3))
    assert torch.equal(a, torch.rand(3))


@pytest.mark.parametrize(
    ("step", "every", "ends", "due"),
    [
        (4, 2, False, True),
        (5, 2, False, False),
        (4, 2, True, False),  # the epoch ends here: its own checkpoint follows
        (4, None, False, False),  # off
        (1, 1, False, True),
    ],
)
def test_checkpoint_due(step, every, ends, due):
    assert checkpoint_due(step, every, ends) is due


def test_state_counters_across_an_epoch_end():
    state = fresh_state() | {"step": 9, "epoch_batches": 4, "best": 0.2}
    assert after_epoch(state, 1) == state | {"epoch": 2, "epoch_batches": 0}
    assert fresh_state()["epoch_batches"] == 0 and state["epoch_batches"] == 4  # not mutated


def test_checkpoint_every_steps_must_be_positive():
    with pytest.raises(ConfigError, match="checkpoint_every_steps"):
        load_config(RunConfig, SMOKE, ["train.checkpoint_every_steps=0"])
    cfg = load_config(RunConfig, SMOKE, ["train.checkpoint_every_steps=3"])
    assert cfg.train.checkpoint_every_steps == 3


def test_lineage_offers_the_earlier_runs_epoch_ends_up_to_the_resume_point(tmp_path):
    """A run continued with train.resume_from picks its best export among these too."""
    from rec.ray_checkpoints import lineage

    def ckpt(name: str, step: int, score: float | None) -> Path:
        d = tmp_path / "train" / name
        (d / "export").mkdir(parents=True)
        (d / "state.json").write_text(json.dumps({"step": step}))
        if score is not None:  # epoch ends carry an export with their metrics
            extra = {"metrics": {"valid.ndcg@10": score}}
            (d / "export" / "model_config.json").write_text(json.dumps({"extra": extra}))
        return d

    ckpt("checkpoint_1", 5, 0.10)
    ckpt("checkpoint_2", 10, 0.30)
    resume = ckpt("checkpoint_3", 12, None)  # mid-epoch: what the killed run saved last
    ckpt("checkpoint_4", 15, 0.20)  # after the resume point: not this run's past
    (tmp_path / "train" / "checkpoint_5").mkdir()  # half-written by a killed driver
    got = sorted((Path(c.path).name, m["valid.ndcg@10"]) for c, m in lineage(str(resume)))
    assert got == [("checkpoint_1", 0.10), ("checkpoint_2", 0.30)]
    assert lineage(None) == []


def test_restore_prefers_a_newer_complete_checkpoint_ray_had_not_registered(tmp_path):
    """A worker killed within ~2 s of a report leaves that checkpoint persisted but unknown
    to Ray Train's controller: restore takes it when it is complete, newer and later."""
    from ray.train import Checkpoint

    from rec import artifacts
    from rec.ray_checkpoints import newest_persisted

    def ckpt(time: str, step: int, manifest: bool = True, parts: tuple = ()) -> Path:
        d = tmp_path / "train" / f"checkpoint_2026-11-29_{time}.000000"
        d.mkdir(parents=True)
        (d / "state.json").write_text(json.dumps({"step": step}))
        if manifest:
            artifacts.write_manifest(d, kind="checkpoint", producer="t", config={}, parts=parts)
        return d

    def pick(registered: Path) -> str:
        return Path(newest_persisted(Checkpoint(str(registered))).path).name[-15:-7]

    ckpt("09-00-00", 90)  # an older fit's, in the same run directory: never
    registered = ckpt("10-00-00", 40)
    (tmp_path / "train" / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's
    assert pick(registered) == "10-00-00"  # nothing newer: Ray's own
    ckpt("10-00-05", 60)  # persisted, its report not yet registered
    ckpt("10-00-07", 80, manifest=False)  # a rank was killed while writing it
    ckpt("10-00-08", 80, parts=("rank-1",))  # rank 1's part missing
    assert pick(registered) == "10-00-05"
    ckpt("10-00-09", 30)  # a later name but an earlier step (a restart's redo): not newer
    assert pick(registered) == "10-00-05"


# --- a worker killed mid-epoch on a local Ray ----------------------------------------------


def report_log(path: Path):
    """A Ray Train callback (it runs in the controller actor) appending each report's rank-0
    metrics to a JSON-lines file: the whole sequence of reports, deleted checkpoints included."""
    from ray.train import UserCallback

    class ReportLog(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            row = {k: metrics[0][k] for k in ("epoch", "step", "epoch_batches") if k in metrics[0]}
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")

    return ReportLog()


def run_fit(tmp_path: Path, prepared: Path, *overrides: str):
    """rec.train.fit on the smoke data (2 workers, 5 steps an epoch), without the job's
    export and test scoring: the checkpoints are what this test reads. -> (result, reports)"""
    from jobs.training import train_spec
    from rec.train import fit

    cfg = load_config(
        RunConfig,
        SMOKE,
        [f"output_dir={tmp_path}", f"train.prepared_dir={prepared}", *overrides],
    )
    log = tmp_path / "reports.jsonl"
    result = fit(train_spec(cfg, storage_dir=tmp_path / "ray"), callbacks=[report_log(log)])
    assert result.error is None, result.error
    reports = [json.loads(line) for line in log.read_text().splitlines()]
    return result, [(r["epoch"], r["step"], r.get("epoch_batches")) for r in reports]


@pytest.mark.ray
def test_killed_worker_resumes_mid_epoch_at_the_saved_step(tmp_path, ray_local):
    """Checkpoints every 2 steps; rank 1 dies at step 7 (epoch 2's second batch: the smoke
    data has 5 steps an epoch). The restarted group must resume from the step-6 checkpoint
    (epoch 1 done, 1 batch of epoch 2 done), skip that batch, report the steps an
    uninterrupted run reports, and end with its weights, bit for bit."""
    from rec.ray_prepare import prepare

    prepared = tmp_path / "data"
    prepare(load_config(RunConfig, SMOKE).data, prepared)
    common = ("train.epochs=2", "train.checkpoint_every_steps=2", "train.early_stop_patience=null")
    killed, reports = run_fit(tmp_path / "run", prepared, *common, "train.inject_failure_at_step=7")
    assert (tmp_path / "run" / "ray" / "injected_failure").read_text() == "7"

    # Reports in order (epoch = epochs done): mid-epoch at steps 2 and 4, epoch 1 at 5,
    # mid-epoch at 6; then the restarted group: 8 with 3 batches of epoch 2 done (the one
    # before the failure was skipped, not trained again), epoch 2 at 10. A restart from the
    # epoch-1 checkpoint would report step 6 again; one that did not skip, 8 with 2 batches.
    assert reports == [(0, 2, 2), (0, 4, 4), (1, 5, None), (1, 6, 1), (1, 8, 3), (2, 10, None)]
    # Steps lost to the failure: 1 (step 7), within the 2-step checkpoint interval.

    # Mid-epoch checkpoints are scored -inf: Ray keeps one only while fewer than 3 validated
    # ones exist (num_to_keep=3), never as the best; they hold no export to publish.
    kept = {m["step"]: m["valid.ndcg@10"] for _, m in killed.best_checkpoints}
    assert kept[5] > 0 and kept[10] > 0 and set(kept) <= {5, 10, 8}, kept
    assert kept.get(8, float("-inf")) == float("-inf")
    best = max(killed.best_checkpoints, key=lambda cm: cm[1]["valid.ndcg@10"])
    assert best[1]["step"] in (5, 10) and (Path(best[0].path) / "export").is_dir()
    for ckpt, m in killed.best_checkpoints:
        assert (Path(ckpt.path) / "export").is_dir() == (m["step"] != 8)

    # The engine resumed from the step-6 checkpoint, not from scratch or epoch 1: DeepSpeed's
    # step count and Adam's in the final checkpoint are the run's 10 (a fresh engine after
    # the restart would count only the 4 steps it trained).
    assert engine_steps(Path(killed.checkpoint.path)) == (10, 10)

    # And it ends where an uninterrupted fit ends, bit for bit: each rank got the same rows
    # in the same order in both fits (seeded hash order, cut by row position: before,
    # random_shuffle + streaming_split gave max |dw| ~5e-3 here), and the resume skipped
    # exactly the trained batches with their random draws.
    whole, whole_reports = run_fit(tmp_path / "whole", prepared, *common)
    assert whole_reports == reports
    a, b = final_weights(killed), final_weights(whole)
    assert a.keys() == b.keys()
    diff = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not diff, diff


def final_weights(result) -> dict[str, torch.Tensor]:
    """The fp32 serving export of a fit's last checkpoint."""
    from safetensors.torch import load_file

    return load_file(Path(result.checkpoint.path) / "export" / "model.safetensors")
