"""The run config every job reads: one YAML file composes each component's own section."""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.common import RayConfig
from rec.data.config import DataConfig


@dataclass
class RunConfig:
    # Where this run writes (prepare: the prepared data, stats.json, vocabularies).
    output_dir: str = "outputs/smoke"
    # Raw data source and sequence building (rec/data/config.py).
    data: DataConfig = field(default_factory=DataConfig)
    # How the job reaches Ray.
    ray: RayConfig = field(default_factory=RayConfig)
