"""Application metrics of the recommender through `ray.serve.metrics` (Prometheus via Ray).

    metrics = AppMetrics()      # in the ingress replica (serve/app.py: Ingress.__init__)
    metrics.record(body)        # one answered /recommend (the response body)

Ray exports them with its own metrics on every node's metrics agent
(`ray start --metrics-export-port=8080`, then `curl localhost:8080/metrics`; Ray picks a port
otherwise, listed in `/tmp/ray/session_latest/metrics/prometheus/`), named `ray_` + the names
below and tagged with the application, deployment and replica:

    ray_recommender_requests_total{lam_source=request|policy|default|cold_start}
    ray_recommender_cold_starts_total             requests answered with the cold-start list
    ray_recommender_stage_unavailable_total       503s after a stage's retries ran out
    ray_recommender_stage_latency_ms_bucket{stage=retrieve|rank|policy|rerank|total}
        wall time per stage as the ingress saw it (the response's `timings_ms`)

Created in the replica (a metric object cannot be pickled with the deployment). Outside Ray
(bench/serve_throughput.py's bare server) the app runs without them (`attach(..., None)`).
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Histogram

STAGES = ("retrieve", "rank", "policy", "rerank", "total")
# Milliseconds: a stage on a quiet machine takes ~1-10 ms, a loaded one up to seconds.
LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]


class AppMetrics:
    """The recommender's counters and stage-latency histogram (see the module docstring)."""

    def __init__(self) -> None:
        self.requests = Counter(
            "recommender_requests",
            description="Answered /recommend requests by where lam came from.",
            tag_keys=("lam_source",),
        )
        self.cold_starts = Counter(
            "recommender_cold_starts",
            description="Requests with no known history (popular-and-diverse list).",
        )
        self.stage_unavailable = Counter(
            "recommender_stage_unavailable",
            description="Requests answered 503 because a stage was lost after every retry.",
        )
        self.latency = Histogram(
            "recommender_stage_latency_ms",
            description="Wall time per request stage seen by the ingress, milliseconds.",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("stage",),
        )

    def record(self, body: dict) -> None:
        """One answered request: its response body (serve.schemas.RecommendResponse fields)."""
        self.requests.inc(tags={"lam_source": body["lam_source"]})
        if body["cold_start"]:
            self.cold_starts.inc()
        for stage, ms in body["timings_ms"].items():
            if stage in STAGES:  # not the *_compute times (measured inside the stage replicas)
                self.latency.observe(ms, tags={"stage": stage})

    def unavailable(self) -> None:
        self.stage_unavailable.inc()
