"""The `serve:` section of the run config: request limits, request-path knobs, deployment shape.

    cfg = load_config(RunConfig, "jobs/configs/beauty.yaml", ["serve.port=8080"]).serve

Artifact locations are not here: they are the run config's top-level `model_dir` (a train
job's output directory) and `policy_dir` (a train_policy job's output directory). Nor is
re-ranking: method, similarity, theta_max and the candidate count N are the run config's
top-level `rerank:` section (rec.rerank.RerankConfig), shared with the frontier and the RL env.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rec.rerank import RerankConfig


@dataclass
class AutoscalingSpec:
    """Ray Serve autoscaling for one deployment (min = max pins the replica count)."""

    min_replicas: int = 1  # never fewer replicas than this
    max_replicas: int = 1  # never more (2 cores: more replicas mostly add contention)
    target_ongoing_requests: float = 4.0  # per-replica load the autoscaler steers to
    upscale_delay_s: float = 5.0  # load must stay above target this long before adding one
    downscale_delay_s: float = 30.0  # and below it this long before removing one
    look_back_period_s: float = 30.0  # window the ongoing-request average is taken over

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(
                f"autoscaling needs 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                f"got min_replicas={self.min_replicas!r} max_replicas={self.max_replicas!r}"
            )
        if self.target_ongoing_requests <= 0:
            raise ValueError(
                f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests!r}"
            )


@dataclass
class DeploymentSpec:
    """Resources and scaling of one deployment."""

    num_cpus: float = 0.25  # Ray CPU reservation per replica (fractional: 2 cores host all)
    # Custom Ray resources per replica, e.g. {serve_node: 0.01}: replicas then run only on
    # nodes started with that resource (`ray start --resources='{"serve_node": 4}'`).
    resources: dict[str, float] = field(default_factory=dict)
    max_ongoing_requests: int = 64  # requests running on one replica before the router waits
    # Requests the router holds for this deployment beyond those running (-1: no limit); more
    # get 503 + Retry-After at once. Set on the ingress it bounds what the HTTP proxy queues.
    max_queued_requests: int = -1
    autoscaling: AutoscalingSpec = field(default_factory=AutoscalingSpec)


@dataclass
class ServeConfig:
    """How the recommender application serves (see serve/app.py and README "Serving")."""

    host: str = "127.0.0.1"  # HTTP bind address; loopback unless you mean to expose it
    port: int = 8000  # HTTP port of the Serve proxy
    app_name: str = "recommender"  # Serve application name
    route_prefix: str = "/"  # where the application is mounted
    # Where Serve runs HTTP proxies: the head only (reach it with `ray attach -p PORT`), or
    # every node (behind a load balancer); nodes sharing one IP cannot all bind the port.
    proxy_location: Literal["HeadOnly", "EveryNode", "Disabled"] = "HeadOnly"
    max_k: int = 100  # largest k a request may ask for (<= rerank.n_candidates)
    max_history: int = 200  # longer histories keep their most recent items (model sees max_len)
    max_body_bytes: int = 65536  # larger request bodies get 413
    relevance_weight: float = 1.0  # w in score = log softmax_N(interest) + w * log P(relevance)
    default_lam: float = 0.3  # lam when the request has none and no policy is configured
    cold_start_lam: float = 0.7  # lam of the popular-and-diverse list for unknown users
    cold_start_pool: int = 200  # most popular items the cold-start list is re-ranked from
    # @serve.batch of every stage deployment (the one place these defaults are declared).
    batch_max_size: int = 16  # most requests one model call takes
    batch_wait_s: float = 0.002  # longest wait for a batch to fill
    torch_threads: int = 1  # intra-op threads per replica (replicas share 2 cores)
    # Retrieval over the catalogue: "exact" (one matmul over every item), "ann" (the export's
    # faiss index, rec/ann.py, candidates rescored exactly), "auto" (ann from ann_min_items up).
    retrieval: Literal["exact", "ann", "auto"] = "auto"
    ann_min_items: int = 200_000  # "auto": catalogue size from which the ANN index serves
    # Run retrieval, ranking and the policy inside the ingress replica instead of their own
    # deployments: no handle hops (lowest latency on a small machine), no separate scaling.
    fused: bool = False
    # 0: each deployment's `autoscaling` below; n >= 1: exactly n replicas of every deployment
    # (2: a killed replica loses no request -- its calls are retried on the other one).
    replicas: int = 0
    # Retries of a stage call whose replica died (pauses 0.1, 0.2, 0.4, ... s: the router
    # must first learn the replica is gone); then 503.
    stage_retries: int = 5
    retry_after_s: float = 1.0  # Retry-After of every 503 (overload, stage unavailable)
    # Replays, in Ray's HTTP proxy, of a request whose ingress replica died before answering
    # (serve/proxy_retry.py; 0: off, Ray's 500). A replay that has not started its answer
    # within proxy_retry_wait_s (no live replica yet) is dropped; then 503 + Retry-After.
    proxy_retries: int = 2
    proxy_retry_wait_s: float = 2.0
    # The first try's own limit: one not answering by then (Ray's router can lose a request
    # whose replica died as it was sent) is cancelled and replayed; long enough to wait for a
    # replacement replica (17-30 s here).
    proxy_first_wait_s: float = 20.0
    # Requests one ingress replica runs at once; more get 503 + Retry-After from the replica
    # before any work (serve/http.py Admission). 0: off (then only Serve's limits apply).
    max_running: int = 0
    # Ray Serve's per-request access log lines (to the replica's log file and stderr, which Ray
    # ships to the driver): off by default, a measurable cost per request on a small machine.
    access_log: bool = False
    # One per deployment: the ingress and each stage of serve/stages.py, named like the stage.
    ingress: DeploymentSpec = field(default_factory=DeploymentSpec)  # FastAPI + re-ranking
    retriever: DeploymentSpec = field(default_factory=DeploymentSpec)  # user tower + top-N
    ranker: DeploymentSpec = field(default_factory=DeploymentSpec)  # multi-task heads
    policy: DeploymentSpec = field(default_factory=DeploymentSpec)  # RL lam policy

    def __post_init__(self) -> None:
        for name in ("max_k", "max_history", "max_body_bytes", "cold_start_pool"):
            if getattr(self, name) < 1:
                raise ValueError(f"serve.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("default_lam", "cold_start_lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"serve.{name} must lie in [0, 1], got {getattr(self, name)!r}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"serve.port must be in 1..65535, got {self.port!r}")
        if self.batch_max_size < 1 or self.batch_wait_s < 0:
            raise ValueError("serve.batch_max_size must be >= 1 and serve.batch_wait_s >= 0")
        counts = (self.replicas, self.stage_retries, self.max_running, self.proxy_retries)
        waits = (self.proxy_retry_wait_s, self.proxy_first_wait_s)
        if min(counts) < 0 or not (self.retry_after_s >= 0 and min(waits) > 0):
            raise ValueError(
                "serve.replicas, serve.stage_retries, serve.max_running, serve.proxy_retries, "
                "serve.retry_after_s: >= 0; serve.proxy_retry_wait_s, proxy_first_wait_s: > 0"
            )
        if self.relevance_weight < 0:
            raise ValueError(f"serve.relevance_weight must be >= 0, got {self.relevance_weight!r}")

    def check_rerank(self, rerank: RerankConfig) -> None:
        """The bound between the two sections: k never exceeds the candidates retrieval returns."""
        if self.max_k > rerank.n_candidates:
            raise ValueError(
                f"serve.max_k={self.max_k!r} must be <= rerank.n_candidates={rerank.n_candidates!r}"
            )

    def deployment(self, name: str) -> DeploymentSpec:
        """The DeploymentSpec field `name` ("ingress" or a stage name); defaults if none."""
        spec = getattr(self, name, None)
        return spec if isinstance(spec, DeploymentSpec) else DeploymentSpec()
