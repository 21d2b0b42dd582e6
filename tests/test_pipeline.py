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
        assert head.wait(job, timeout=900) == "SUCCEEDED"
        summary = json.loads((out / "pipeline_summary.json").read_text())
        assert summary["quality"]["test.ndcg@10"] > 0
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
