"""Per-epoch training metrics of one worker (no Ray): throughput, memory and mean losses.

meter = EpochMeter(world_size)
for batch in batches:
    loss, logs = engine(batch); ...
    meter.update(batch, logs)
metrics = meter.summary()   # train_seconds, train_seq_per_s, train_tokens_per_s, train.loss...
"""

from __future__ import annotations

import resource
import time

import numpy as np
import torch

from rec.data.batch import Batch

# Batches per epoch left out of `train_tokens_per_s_steady` (CUDA context, allocator and
# kernel selection warm up on the first steps; a short GPU run would otherwise under-report).
WARM_BATCHES = 10


class EpochMeter:
    """Counts one worker's sequences and real (non-padding) tokens over an epoch; rates are
    scaled by the world size (every rank sees a similar share)."""

    def __init__(self, world_size: int) -> None:
        self.world = world_size
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.seqs = 0
        self.losses: list[dict[str, float]] = []
        self.warm: tuple[float, int] | None = None  # (time, tokens) after WARM_BATCHES

    def update(self, batch: Batch, logs: dict[str, float]) -> None:
        self.tokens += int((batch.items > 0).sum())
        self.seqs += batch.size
        self.losses.append(logs)
        if len(self.losses) == WARM_BATCHES:
            self.warm = (time.perf_counter(), self.tokens)

    def summary(self) -> dict[str, float]:
        t_end = time.perf_counter()
        train_s = t_end - self.t0
        out = {
            "train_seconds": round(train_s, 2),
            "train_seq_per_s": round(self.seqs * self.world / train_s, 1),
            "train_tokens_per_s": round(self.tokens * self.world / train_s, 1),
        }
        if self.warm and t_end > self.warm[0]:  # throughput without the start-up cost
            steady = (self.tokens - self.warm[1]) * self.world / (t_end - self.warm[0])
            out["train_tokens_per_s_steady"] = round(steady, 1)
        out["worker_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        out |= {f"train.{k}": float(np.mean([x[k] for x in self.losses])) for k in self.losses[0]}
        if torch.cuda.is_available():
            out["gpu_peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        return out
