"""The run config every job reads: one YAML file composes each component's own section."""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.common import RayConfig
from jobs.sweep import SweepConfig
from rec.data.config import DataConfig
from rec.evaluation import EvalConfig
from rec.frontier import FrontierConfig
from rec.model import ModelConfig
from rec.rerank import RerankConfig
from rec.train_config import TrainConfig
from rl.config import EnvConfig
from rl.online import ABConfig
from rl.policy import PolicyConfig
from rl.world import WorldConfig
from serve.config import ServeConfig

STAGES = ("prepare", "train", "evaluate", "policy", "serve")


@dataclass
class PipelineConfig:
    """Which stages jobs/pipeline.py runs and how it ends."""

    # Stages not to run (their earlier outputs are still used by later stages).
    skip: list[str] = field(default_factory=list)
    # Skip a stage whose result already exists under output_dir (restart after a failure).
    resume: bool = True
    # After deploying: "auto" blocks if this job started its own Ray, else returns;
    # "block" serves until Ctrl-C; "return" leaves the app on the cluster and exits.
    serve_mode: str = "auto"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.skip) - set(STAGES))
        if unknown:
            raise ValueError(f"pipeline.skip has unknown stages {unknown}; stages: {STAGES}")
        if self.serve_mode not in ("auto", "block", "return"):
            raise ValueError(f"pipeline.serve_mode must be auto|block|return: {self.serve_mode!r}")


@dataclass
class RunConfig:
    # Where this run writes (prepare: the prepared data, stats.json, vocabularies). Every path
    # setting is a local path or a URI (s3://bucket/runs/r1, gs://, abfs://; rec/storage.py).
    output_dir: str = "outputs/smoke"
    # A train job's output_dir (its export/ and data/), read by evaluate, train_policy, serve.
    model_dir: str | None = None
    # A train_policy job's output_dir (CURRENT names the version with rl_module/ and
    # policy.json), read by serve.
    policy_dir: str | None = None
    # Raw data source and sequence building (rec/data/config.py).
    data: DataConfig = field(default_factory=DataConfig)
    # The transformer and its task heads (rec/model.py); max_len follows data.max_len.
    model: ModelConfig = field(default_factory=ModelConfig)
    # Ray Train + DeepSpeed training (rec/train_config.py).
    train: TrainConfig = field(default_factory=TrainConfig)
    # Hyper-parameter sweep (jobs/sweep.py, run by jobs/tune.py) over the training above.
    tune: SweepConfig = field(default_factory=SweepConfig)
    # How the job reaches Ray.
    ray: RayConfig = field(default_factory=RayConfig)
    # How retrieved candidates are re-ranked (rec/rerank.py): one section shared by serving,
    # the frontier (which sweeps method and lam over it) and the simulator's env.
    rerank: RerankConfig = field(default_factory=RerankConfig)
    # The Ray Serve application (serve/config.py), run by jobs/serve.py.
    serve: ServeConfig = field(default_factory=ServeConfig)
    # The final test evaluation: sampled users on a large catalogue, items ranked in chunks.
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Relevance-diversity frontier of a trained model (rec/frontier.py, jobs/evaluate.py).
    frontier: FrontierConfig = field(default_factory=FrontierConfig)
    # The simulator's world cut from the trained model (rl/world.py): jobs.train_policy.
    world: WorldConfig = field(default_factory=WorldConfig)
    # The simulated user and its environment (rl/config.py); calibrated fields are refit.
    env: EnvConfig = field(default_factory=EnvConfig)
    # PPO training and evaluation of the lam policy (rl/policy.py).
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    # Simulated users against the running Serve app over HTTP (rl/online.py): jobs.ab_test.
    ab: ABConfig = field(default_factory=ABConfig)
    # The end-to-end job (jobs/pipeline.py): stages to skip, resume, how serving ends.
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self) -> None:
        # Checks across sections, at load time (exit 2 before any Ray starts). serve.max_k <=
        # rerank.n_candidates is checked when serving starts (`ServeConfig.check_rerank`), so
        # that other jobs may lower n_candidates without touching the serve section.
        self.frontier.measured(self.rerank)  # frontier.k <= rerank.n_candidates
        if self.model.tower_orders and not self.train.shard_in_memory:
            raise ValueError(
                "model.tower_orders reads the rows in one order per tower: it needs "
                "train.shard_in_memory=true"
            )
