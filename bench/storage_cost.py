"""Benchmark: the cost of object storage. Amazon Beauty's prepare and one training epoch with
local paths versus with the raw log, prepared data and checkpoints on an S3 server on
loopback (moto, over HTTP), measured in the same run, the same Ray.

    flock /tmp/ray.lock python bench/storage_cost.py          # ~3 minutes on 2 cores

Prints a table and writes bench/results/storage_cost.json. The S3 server is a local process:
the numbers are the cost of going through an S3 client (requests, copies, uploads of each
checkpoint), not of a network.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BEAUTY = ROOT.parent / "shared" / "data" / "amazon-beauty"


def start_s3(tmp: Path) -> object:
    from tests.s3_server import create_bucket, start_moto

    server = start_moto(tmp / "moto.log")
    os.environ.update(
        AWS_ENDPOINT_URL=server.endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    create_bucket(server.endpoint, "bench")
    return server


def run_case(cfg, raw: str, out: str) -> dict:
    """prepare Beauty from `raw` into `out`/data, then one epoch with checkpoints in `out`/ray."""
    from jobs.training import train_spec
    from rec import storage
    from rec.ray_prepare import prepare
    from rec.train import fit

    cfg = replace(cfg, output_dir=out, data=replace(cfg.data, path=raw))
    t0 = time.perf_counter()
    stats = prepare(cfg.data, storage.join(out, "data"))
    t1 = time.perf_counter()
    result = fit(train_spec(cfg, storage_dir=storage.join(out, "ray")))
    t2 = time.perf_counter()
    if result.error:
        raise result.error
    m = result.metrics
    return {
        "prepare_s": round(t1 - t0, 1),
        "epoch_fit_s": round(t2 - t1, 1),  # Ray Train start, one epoch, validation, checkpoint
        "epoch_train_s": m["train_seconds"],  # the epoch itself, in the worker
        "n_interactions": stats["n_interactions"],
        "valid.ndcg@10": round(m["valid.ndcg@10"], 4),
    }


def main() -> None:
    from jobs.common import RayConfig, init_ray
    from jobs.config import RunConfig
    from rec import storage
    from rec.config_loader import load_config

    tmp = Path(tempfile.mkdtemp(prefix="storage-cost-"))
    server = start_s3(tmp)
    try:
        init_ray(RayConfig(num_cpus=2))  # after the AWS variables: workers inherit them
        cfg = load_config(RunConfig, ROOT / "jobs/configs/beauty.yaml", ["train.epochs=1"])
        for name in ("Beauty.txt.gz", "Beauty_item2attributes.json.gz"):
            storage.upload_dir(BEAUTY / name, f"s3://bench/raw/{name}")
        cases = {
            "local": run_case(cfg, str(BEAUTY / "Beauty.txt.gz"), str(tmp / "local")),
            "s3": run_case(cfg, "s3://bench/raw/Beauty.txt.gz", "s3://bench/run"),
        }
    finally:
        server.stop()
    keys = ("prepare_s", "epoch_fit_s", "epoch_train_s")
    rows = [f"{'':9}{'prepare s':>10}{'fit 1 epoch s':>15}{'epoch s':>9}{'valid ndcg@10':>15}"]
    for name, c in cases.items():
        cells = "".join(f"{c[k]:>{w}}" for k, w in zip(keys, (10, 15, 9), strict=True))
        rows.append(f"{name:9}{cells}{c['valid.ndcg@10']:>15}")
    ratio = {k: round(cases["s3"][k] / cases["local"][k], 2) for k in keys}
    cells = "".join(f"{ratio[k]:>{w}}" for k, w in zip(keys, (10, 15, 9), strict=True))
    rows.append(f"{'s3/local':9}{cells}")
    print("\n".join(rows))
    out = ROOT / "bench" / "results" / "storage_cost.json"
    out.write_text(json.dumps({"cases": cases, "s3_over_local": ratio}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
