"""TrainConfig: how the recommender is trained (Ray Train scaling, DeepSpeed, optimisation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rec.tracking import TrackingConfig


@dataclass
class DeepSpeedConfig:
    # ZeRO stage: 0 plain data parallel, 1 optimizer states, 2 + gradients, 3 + parameters sharded.
    zero_stage: int = 2
    # bf16 mixed precision (fp32 master weights) or plain fp32.
    precision: Literal["fp32", "bf16"] = "fp32"
    # ZeRO 2/3: keep optimizer states and run the step on the CPU (DeepSpeedCPUAdam; compiles
    # its C++ op once, ~70 s, cached in TORCH_EXTENSIONS_DIR).
    offload_optimizer: bool = False
    # Clip the global gradient norm (0 = off).
    gradient_clipping: float = 1.0
    # ZeRO-3: parameters with fewer elements than this stay whole on every rank (DeepSpeed's
    # stage3_param_persistence_threshold; null = DeepSpeed's default, 1e5). 0 shards every
    # tensor: tests set it so that a tiny model is really partitioned and gathered.
    param_persistence_threshold: int | None = None

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"train.deepspeed.zero_stage must be 0..3, got {self.zero_stage!r}")
        if self.offload_optimizer and self.zero_stage < 2:
            raise ValueError("train.deepspeed.offload_optimizer needs zero_stage 2 or 3")


@dataclass
class TrainConfig:
    # Ray Train workers, and resources of each (fractional CPUs leave room for Ray Data's
    # readers on a 2-core machine).
    num_workers: int = 2
    cpus_per_worker: float = 0.5
    # Extra Ray resources each training worker needs, beside CPU/GPU: e.g. a custom resource
    # that only the worker nodes have, {worker_node: 0.1}, to place training there.
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    use_gpu: bool = False
    # Epochs over the train split (early stopping may end sooner), and an optional cap on
    # optimizer steps (smoke runs, benchmarks).
    epochs: int = 30
    max_steps: int | None = None
    # Micro-batch per worker; the global batch is batch_size * num_workers * grad_accum.
    batch_size: int = 256
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    # Linear warm-up steps, then constant or cosine decay to 0 over `epochs` (AdamW).
    warmup_steps: int = 100
    lr_schedule: Literal["constant", "cosine"] = "constant"
    # Group rows of similar length into a batch (rec.data.batch.length_batches): fewer padded
    # tokens for the same examples; 1 turns it off.
    length_buckets: int = 8
    # Read and pad the splits once, before training, into Ray's object store: epochs then
    # stream from memory instead of re-running the read tasks beside the workers (on 2 CPUs
    # those tasks slowed one worker and made the other wait at every gradient sync), in a
    # seeded order cut into one part per rank, so every fit gives a rank the same rows in the
    # same order (rec/train.py `_datasets`). Turn off for splits larger than the object store
    # (streamed and split by Ray Train: not reproducible across fits).
    materialize_data: bool = True
    # Each worker copies its shard into its own memory once, before the first epoch, and
    # reshuffles it locally every epoch. Saves the start of a streaming split every epoch
    # (~3 s each on 2 CPUs: 10 % of a Beauty epoch) and the prefetch threads that compete
    # with the step. Turn off when a worker's shard does not fit in its memory.
    shard_in_memory: bool = True
    # Validate every this many epochs; stop after this many validations without a better
    # valid NDCG@10 (None: never stop early).
    eval_every: int = 1
    early_stop_patience: int | None = 5
    eval_batch_size: int = 512
    # torch threads per worker (None: cpus_per_worker rounded up).
    threads_per_worker: int | None = None
    seed: int = 0
    # Restarts of the worker group after a failure (resumes from the latest checkpoint).
    max_failures: int = 2
    # Start from this Ray Train checkpoint directory (a previous run's) instead of scratch; a
    # mid-epoch checkpoint continues its epoch at the batch it stopped at.
    resume_from: str | None = None
    # Also checkpoint every this many optimizer steps inside an epoch, so a failure costs at
    # most about this many steps instead of up to an epoch (None: at epoch ends only). Off by
    # default: each one is a DeepSpeed save and a Ray Train report (0.24 s on Beauty's tiny
    # model, ~7 % of training at every 20 steps; more for large models), worth it where an
    # epoch takes many minutes; Beauty's takes ~40 s. Leave it off in Tune sweeps: every
    # report is a Tune result.
    checkpoint_every_steps: int | None = None
    # Where the prepared data is (None: <output_dir>/data, prepared first if missing).
    prepared_dir: str | None = None
    # Failure injection for tests: rank 1 kills its process once at this optimizer step.
    inject_failure_at_step: int | None = None
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    # The item embedding: "dense" (DeepSpeed's optimizer, under its ZeRO stage, like every
    # other parameter), "sparse" (row-sparse gradients, the touched rows all-gathered across
    # ranks, SparseAdam: rec/sparse_table.py; needs the sampled interest loss, ZeRO 1 or 2 and
    # fp32), or "auto": sparse where the interest loss resolves to sampled softmax (from
    # model.sampled_above_items items) and the DeepSpeed settings allow it, else dense. At 4.16M
    # items a dense step costs ~13 s on 2 CPU workers, a sparse one ~0.7 s (bench/README.md).
    item_table: Literal["dense", "sparse", "auto"] = "auto"
    # Per-epoch metrics to MLflow and TensorBoard, and training_curves.png (rec/tracking.py).
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        for name in ("num_workers", "epochs", "batch_size", "grad_accum", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 1:
            raise ValueError(
                f"train.checkpoint_every_steps must be >= 1 or null, got {self.checkpoint_every_steps!r}"
            )
        if self.cpus_per_worker <= 0:
            raise ValueError(f"train.cpus_per_worker must be > 0, got {self.cpus_per_worker!r}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr!r}")
        if self.item_table not in ("dense", "sparse", "auto"):
            raise ValueError(
                f"train.item_table must be dense, sparse or auto, got {self.item_table!r}"
            )
        if self.item_table == "sparse":  # the rest needs the model: rec.sparse_table
            from rec.sparse_table import sparse_unsupported

            why = sparse_unsupported(self)
            if why:
                raise ValueError(f"train.item_table=sparse {why}")
