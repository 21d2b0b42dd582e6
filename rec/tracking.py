"""Experiment tracking of a training run (no Ray): per-epoch metrics to MLflow and TensorBoard,
and a `training_curves.png`, written by rank 0 after every epoch.

    tracker = Tracker(cfg.tracking, target, params, state)   # after restoring the checkpoint
    for epoch ...:
        state["history"].append(metrics)                      # then the checkpoint saves it
        tracker.log(state["history"])
    tracker.close()

A run's per-epoch metrics are part of the loop's state (`history` in state.json, saved in every
checkpoint), so a restarted or resumed run holds exactly the epochs of the weights it
continues. `log` hands each backend only the epochs it does not have yet, so no epoch appears
twice after a restart or a `train.resume_from`:
- TensorBoard: an attempt deletes the event files of earlier attempts and writes the history
  it restored, then one epoch at a time (event files are append-only).
- MLflow: the run id is in the state too; a later attempt continues that run and logs the
  epochs after the last one it holds (fits are bit-identical across restarts, so an epoch an
  earlier attempt logged has the values this attempt would log). A store that lacks the run
  (a resume into another output_dir) gets a new run with the whole history.
- The PNG is redrawn from the whole history.

Layout under the target's root (the job's output_dir): `mlruns/` (MLflow file store unless
`train.tracking.mlflow_uri` names another), `tensorboard/<run_name>/`. With a URI root they are
written to a local folder and uploaded after each epoch.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rec import storage

# The curves' panels: (title, metric keys or a key prefix). Relevance and diversity apart: ILD
# is ~10x NDCG and would flatten it on a shared axis.
LOSS_PREFIX = "train.loss"
RELEVANCE = ("valid.ndcg@10", "valid.recall@10")
DIVERSITY = ("valid.ild@10",)


@dataclass
class TrackingConfig:
    # Log every epoch's train/valid metrics to MLflow.
    mlflow: bool = True
    # MLflow tracking URI (http://host:5000, sqlite:///mlflow.db, file:/path); None: a file
    # store at <output_dir>/mlruns (view: MLFLOW_ALLOW_FILE_STORE=true mlflow ui
    # --backend-store-uri <output_dir>/mlruns).
    mlflow_uri: str | None = None
    # MLflow experiment the runs go to (created if missing).
    experiment: str = "raydiv"
    # TensorBoard event files under <output_dir>/tensorboard/<run> (tensorboard --logdir).
    tensorboard: bool = True


@dataclass
class TrackingTarget:
    """Where one training run's tracking goes (picklable; local paths or URIs)."""

    root: str  # the job's output_dir: mlruns/ and tensorboard/<run_name>/ go under it
    run_name: str  # MLflow run name and TensorBoard subfolder: "train", or a Tune trial's id
    curves: str  # the training_curves.png path


def metric_name(key: str) -> str:
    """A loop metric key as MLflow accepts it and TensorBoard groups it: "valid.ndcg@10" ->
    "valid/ndcg_at_10" (MLflow refuses "@"; TensorBoard groups by the part before "/")."""
    return key.replace(".", "/", 1).replace("@", "_at_")


def scalars(entry: dict) -> dict[str, float]:
    """The finite numbers of one epoch's metrics, by `metric_name` (step/epoch are the axis)."""
    return {
        metric_name(k): float(v)
        for k, v in entry.items()
        if k != "epoch"
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
    }


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested config dicts -> {"train.lr": "0.001", ...}, MLflow's string params."""
    out: dict[str, str] = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out |= flat_params(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = str(v)[:6000]  # MLflow's limit on a param value
    return out


def curves_png(history: list[dict]) -> bytes:
    """`curves_figure` as PNG bytes."""
    buf = io.BytesIO()
    curves_figure(history).savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def curves_figure(history: list[dict]):
    """Three panels against the epoch: training loss per head, valid NDCG@10 and Recall@10,
    valid ILD@10 (each over the epochs that have it: validation may skip epochs)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global figure state in a worker

    fig = Figure(figsize=(13, 3.8))
    FigureCanvasAgg(fig)
    losses = sorted({k for e in history for k in e if k.startswith(LOSS_PREFIX)})
    panels = [("training loss per head", losses), ("valid relevance", RELEVANCE)]
    panels.append(("valid diversity", DIVERSITY))
    for ax, (title, keys) in zip(fig.subplots(1, 3), panels, strict=True):
        for key in keys:
            points = [(e["epoch"], e[key]) for e in history if key in e]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", markersize=3, label=key)
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


class Tracker:
    """Rank 0's writer of one run's curves, TensorBoard events and MLflow run."""

    def __init__(
        self, cfg: TrackingConfig, target: TrackingTarget, params: dict, state: dict
    ) -> None:
        self.cfg, self.target = cfg, target
        self.remote = storage.is_uri(target.root)
        # A URI root: written here, uploaded after each epoch.
        self.local = (
            Path(tempfile.mkdtemp(prefix="raydiv-tracking-"))
            if self.remote
            else storage.local_path(target.root)
        )
        # the last epoch each backend holds
        self.tb, self.tb_logged = None, 0
        if cfg.tensorboard:
            self.tb = self._tensorboard()
        self.mlflow, self.run_id, self.mlflow_logged = None, None, 0
        if cfg.mlflow:
            self._mlflow_run(params, state.get("mlflow_run_id"))
            state["mlflow_run_id"] = self.run_id  # saved with the next checkpoint

    def _tensorboard(self):
        from tensorboardX import SummaryWriter

        logdir = self.local / "tensorboard" / self.target.run_name
        for old in logdir.glob("events.out.tfevents.*"):  # earlier attempts: rewritten below
            old.unlink()
        return SummaryWriter(str(logdir), flush_secs=3600)  # flushed after each epoch

    def _mlflow_run(self, params: dict, run_id: str | None) -> None:
        from mlflow.exceptions import MlflowException

        self.mlflow = client = mlflow_client(self.cfg, self.local)
        if run_id:
            try:
                client.update_run(run_id, status="RUNNING")
                steps = [m.step for m in client.get_metric_history(run_id, "step")]
                self.run_id, self.mlflow_logged = run_id, max(steps, default=0)
                return
            except MlflowException:  # not in this store: a new run with the whole history
                pass
        exp_id = experiment_id(client, self.cfg.experiment)
        self.run_id = client.create_run(exp_id, run_name=self.target.run_name).info.run_id
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flat_params(params).items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit on params
            client.log_batch(self.run_id, params=items[i : i + 100])

    def log(self, history: list[dict]) -> None:
        """Bring every backend up to `history` (one entry per finished epoch, in order)."""
        if self.tb is not None:
            for entry in (e for e in history if e["epoch"] > self.tb_logged):
                for name, value in scalars(entry).items():
                    self.tb.add_scalar(name, value, global_step=entry["epoch"])
            self.tb.flush()
            self.tb_logged = max([self.tb_logged, *(e["epoch"] for e in history)])
        if self.mlflow is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            for entry in (e for e in history if e["epoch"] > self.mlflow_logged):
                rows = [Metric(n, v, now, entry["epoch"]) for n, v in scalars(entry).items()]
                self.mlflow.log_batch(self.run_id, metrics=rows)
            self.mlflow_logged = max([self.mlflow_logged, *(e["epoch"] for e in history)])
        storage.write_bytes(self.target.curves, curves_png(history))
        if self.remote:
            storage.upload_dir(self.local, self.target.root)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.set_terminated(self.run_id)
        if self.remote:
            storage.upload_dir(self.local, self.target.root)


def mlflow_client(cfg: TrackingConfig, local_root: Path):
    """An MLflow client on `cfg.mlflow_uri`, else on the file store `<local_root>/mlruns`."""
    from mlflow.tracking import MlflowClient

    uri = cfg.mlflow_uri or (local_root / "mlruns").resolve().as_uri()
    if uri.startswith("file:"):
        # MLflow 3 keeps its file store in maintenance mode behind this opt-in; it is the one
        # backend that needs neither a database package nor a server.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


def experiment_id(client, name: str) -> str:
    """The id of MLflow experiment `name`, created if missing."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


def create_experiment(cfg: TrackingConfig, root: str) -> None:
    """Make the experiment before concurrent Tune trials start: MLflow's file store checks a
    name and creates the folder without a lock, so two trials could make two of that name.
    (A URI root: each trial stages its own store; use a tracking server for sweeps there.)"""
    if cfg.mlflow and not storage.is_uri(root):
        experiment_id(mlflow_client(cfg, storage.local_path(root)), cfg.experiment)


def run_params(model_cfg, train_cfg) -> dict:
    """What a run's MLflow params record: its model and train sections."""
    return {"model": asdict(model_cfg), "train": asdict(train_cfg)}
