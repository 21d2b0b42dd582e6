r"""The whole system in one job: prepare -> train -> evaluate (frontier) -> train_policy -> serve.

    python -m jobs.pipeline --config jobs/configs/smoke.yaml          # = make run
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.pipeline --config jobs/configs/smoke.yaml output_dir=$PWD/outputs/p

Each stage writes under output_dir (model/ = the train job's output with data/ and export/,
frontier/, policy/) and is skipped when its result is already there (`pipeline.resume`), or
when listed in `pipeline.skip`. The job ends with a summary (quality, frontier, policy gain),
writes output_dir/pipeline_summary.json, queries the live endpoint once and prints the
matching `curl`. Serving: a job that started its own local Ray keeps serving until Ctrl-C
(the endpoint dies with the driver); a job on a running cluster (`ray start`, `ray job
submit`) leaves the application deployed there and returns. On the embedded synthetic
default, the whole pipeline takes a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace

import httpx

from jobs import evaluate, prepare, train, train_policy
from jobs import serve as serve_job
from jobs.common import RayConfig, check_locations, main_guard, parse_args
from jobs.config import RunConfig
from rec import artifacts, storage
from rec.config_loader import ConfigError
from rec.logs import get_logger

log = get_logger("pipeline")


def run(cfg: RunConfig) -> dict:
    pc = cfg.pipeline
    check_locations(cfg)
    out = storage.absolute(cfg.output_dir)  # a local path or a URI: stages get strings
    join = storage.join
    model_dir, frontier_dir, policy_dir = (
        join(out, "model"),
        join(out, "frontier"),
        join(out, "policy"),
    )
    done = {  # a stage's result, whose presence lets `resume` skip it
        "prepare": join(model_dir, "data", artifacts.CURRENT),
        "train": join(model_dir, "metrics.json"),
        "evaluate": join(frontier_dir, "frontier.json"),
        "policy": join(policy_dir, "policy_eval.json"),
    }
    runs = {
        "prepare": lambda: prepare.run(replace(cfg, output_dir=join(model_dir, "data"))),
        "train": lambda: train.run(replace(cfg, output_dir=model_dir)),
        "evaluate": lambda: evaluate.run(
            replace(cfg, model_dir=model_dir, output_dir=frontier_dir)
        ),
        "policy": lambda: train_policy.run(
            replace(cfg, model_dir=model_dir, output_dir=policy_dir)
        ),
    }
    seconds: dict[str, float] = {}
    for stage, fn in runs.items():
        if stage in pc.skip or (pc.resume and storage.exists(done[stage])):
            log.info("%s: skipped (%s)", stage, "config" if stage in pc.skip else "done")
            continue
        t0 = time.perf_counter()
        log.info("%s ...", stage)
        fn()
        seconds[stage] = round(time.perf_counter() - t0, 1)
    summary = summarise(done, seconds)
    if "serve" not in pc.skip:
        summary |= deploy_and_probe(cfg, model_dir, policy_dir)
    storage.write_text(join(out, "pipeline_summary.json"), json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))  # the result, on stdout as it is
    if "serve" not in pc.skip:
        log.info("try it:\n%s", summary["curl"])
        log.info("answer: %s", summary["answer"])
        if _blocks(pc.serve_mode, cfg.ray):
            log.info("serving until Ctrl-C")
            _block_forever()
    return summary


def summarise(done: dict[str, str], seconds: dict[str, float]) -> dict:
    """The headline numbers of each stage that has a result."""
    out: dict = {"stage_seconds": seconds}
    if storage.exists(done["train"]):
        m = json.loads(storage.read_text(done["train"]))
        keys = (
            "test.ndcg@10",
            "test.recall@10",
            "test.ild@10",
            "test_unseen.ndcg@10",
            "popular.test.ndcg@10",
            "parameters",
        )
        out["quality"] = {k: m[k] for k in keys if k in m}
    if storage.exists(done["evaluate"]):
        out["frontier"] = json.loads(storage.read_text(done["evaluate"])).get("summary")
    if storage.exists(done["policy"]):
        p = json.loads(storage.read_text(done["policy"]))
        keys = (
            "policy.mean_return",
            "best_fixed.lam",
            "best_fixed.mean_return",
            "gain_over_best_fixed",
            "gain_over_best_fixed_paired_ci95",
        )
        out["policy"] = {k: p[k] for k in keys}
    return out


def deploy_and_probe(cfg: RunConfig, model_dir: str, policy_dir: str) -> dict:
    """Deploy the app (not blocking) and send it one real request."""
    if not storage.exists(storage.join(model_dir, "export")):
        raise ConfigError(f"serve needs a trained model at {model_dir}/export (run train)")
    policy = policy_dir if artifacts.published(policy_dir) else None
    url = serve_job.run(replace(cfg, model_dir=model_dir, policy_dir=policy), block=False)
    body = {"user_id": _example_user(model_dir), "k": 10}
    answer = httpx.post(f"{url}/recommend", json=body, timeout=60).json()
    curl = f"curl -s {url}/recommend -H 'content-type: application/json' -d '{json.dumps(body)}'"
    short = {k: answer.get(k) for k in ("lam", "lam_source", "cold_start")}
    short["items"] = [item["id"] for item in answer.get("items", [])]
    return {"endpoint": url, "curl": curl, "answer": short}


def _example_user(model_dir: str) -> int:
    """A real user of the test split: the request then uses their logged history."""
    data = artifacts.resolve(storage.join(model_dir, "data"))
    test = storage.read_parquet(storage.join(data, "test"), columns=["user_id"])
    return int(test["user_id"].min())


def _blocks(mode: str, ray_cfg: RayConfig) -> bool:
    """auto: block only if this job started its own Ray (its endpoint dies with the driver);
    on a cluster it joined (ray start, ray job submit) the app stays deployed after exit."""
    if mode != "auto":
        return mode == "block"
    return not (ray_cfg.address or os.environ.get("RAY_ADDRESS"))


def _block_forever() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    return main_guard(lambda: run(parse_args(RunConfig, argv, __doc__)))


if __name__ == "__main__":
    sys.exit(main())
