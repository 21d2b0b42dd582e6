"""The whole pipeline submitted as a Ray job to a `ray start` head, then queried over HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from jobs.config import RunConfig
from rec.config_loader import ConfigError, load_config
from tests.cluster_helpers import free_port, local_head

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"


@pytest.mark.parametrize(
    "override, needle",
    [("pipeline.skip=[train,deploy]", "deploy"), ("pipeline.serve_mode=forever", "serve_mode")],
)
def test_pipeline_config_names_bad_values(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(RunConfig, SMOKE, [override])


@pytest.mark.ray
@pytest.mark.timeout(
    1500
)  # above the job waits below (600 + 2 x 300), so they fail first, with logs
def test_submitted_pipeline_serves_the_model_it_trained(tmp_path):
    out, port = tmp_path / "pipeline", free_port()
    overrides = [
        f"output_dir={out}",  # absolute: the job runs in an uploaded copy of the repo
        f"serve.port={port}",
        "train.epochs=1",
        "policy.iterations=2",
        "policy.eval_episodes=50",
    ]
    with local_head(num_cpus=2) as head:
        job = head.submit(
            ["python", "-m", "jobs.pipeline", "--config", "jobs/configs/smoke.yaml", *overrides],
            working_dir=ROOT,
        )
        assert head.wait(job, timeout=600) == "SUCCEEDED"
        summary = json.loads((out / "pipeline_summary.json").read_text())
        quality = summary["quality"]
        # one epoch already beats recommending the most popular items (2-3x on this data)
        assert quality["test.ndcg@10"] > quality["popular.test.ndcg@10"] > 0, quality
        assert summary["frontier"] and "gain_over_best_fixed" in summary["policy"]
        assert summary["endpoint"] == f"http://127.0.0.1:{port}"
        logs = head.job_logs(job)
        assert "[pipeline] try it:" in logs and summary["curl"] in logs
        # The job has ended; the application it deployed keeps serving on the cluster.
        body = {"history": summary["answer"]["items"][:3], "k": 5, "lam": 0.5}
        resp = httpx.post(f"{summary['endpoint']}/recommend", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        got = resp.json()
        assert len(got["items"]) == 5 and got["lam_source"] == "request"
        assert not {item["id"] for item in got["items"]} & set(body["history"])
        bad = httpx.post(f"{summary['endpoint']}/recommend", json={"k": 0}, timeout=30)
        assert bad.status_code == 422 and "k" in bad.text

        # pipeline.resume (default true): every stage's result is there, so none runs again;
        # pipeline.skip=[serve] deploys nothing.
        metrics = out / "model" / "metrics.json"
        stamp = metrics.stat().st_mtime_ns
        again, logs = run_job(head, [*overrides, "pipeline.skip=[serve]"])
        assert again["stage_seconds"] == {} and "endpoint" not in again
        assert again["quality"] == summary["quality"] and metrics.stat().st_mtime_ns == stamp
        for stage in ("prepare", "train", "evaluate", "policy"):
            assert f"[pipeline] {stage}: skipped (done)" in logs, stage
        # pipeline.resume=false runs what pipeline.skip does not name, and only that
        only, logs = run_job(
            head,
            [*overrides, "pipeline.resume=false", "pipeline.skip=[prepare,train,policy,serve]"],
        )
        assert list(only["stage_seconds"]) == ["evaluate"] and metrics.stat().st_mtime_ns == stamp
        assert "[pipeline] train: skipped (config)" in logs


def run_job(head, overrides: list[str]) -> tuple[dict, str]:
    """Submit the pipeline once more on `head` -> (its pipeline_summary.json, its logs)."""
    job = head.submit(
        ["python", "-m", "jobs.pipeline", "--config", "jobs/configs/smoke.yaml", *overrides],
        working_dir=ROOT,
    )
    assert head.wait(job, timeout=300) == "SUCCEEDED"  # wait raises JobFailed with the logs
    out = next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir="))
    return json.loads((Path(out) / "pipeline_summary.json").read_text()), head.job_logs(job)
