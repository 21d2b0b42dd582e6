"""The run config every job reads: one YAML file composes each component's own section."""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.common import RayConfig
from rec.data.config import DataConfig
from rec.model import ModelConfig
from rec.train_config import SweepConfig, TrainConfig


@dataclass
class RunConfig:
    # Where this run writes (prepare: the prepared data, stats.json, vocabularies).
    output_dir: str = "outputs/smoke"
    # Raw data source and sequence building (rec/data/config.py).
    data: DataConfig = field(default_factory=DataConfig)
    # The transformer and its task heads (rec/model.py); max_len follows data.max_len.
    model: ModelConfig = field(default_factory=ModelConfig)
    # Ray Train + DeepSpeed training (rec/train_config.py).
    train: TrainConfig = field(default_factory=TrainConfig)
    # Hyper-parameter sweep (jobs/tune.py) over the training above.
    tune: SweepConfig = field(default_factory=SweepConfig)
    # How the job reaches Ray.
    ray: RayConfig = field(default_factory=RayConfig)
