"""Fuzz the running recommender over HTTP: schemathesis (positive and negative) + hostile JSON.

    # against a running server (python -m jobs.serve ... or serve run serve/config.yaml):
    python bench/serve_fuzz.py --url http://127.0.0.1:8000
    # or start one over a tiny untrained model (a separate process, stopped at the end):
    flock /tmp/ray.lock python bench/serve_fuzz.py --tiny /tmp/fuzz_model

Every operation of /openapi.json gets `--examples` cases per generation mode (positive: valid
by the schema; negative: invalid), seeded (hypothesis `derandomize`: the same cases every run),
then a fixed list of hostile bodies the schema cannot express (NaN, huge integers, duplicate
keys, deep nesting, lone surrogates, bad UTF-8, wrong content types, oversized bodies).
Counts answers by status and writes bench/results/serve_fuzz.json; exit 1 on any 5xx.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections import Counter
from pathlib import Path

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_load import start_server  # noqa: E402

HOSTILE = [  # (body, content type)
    (b'{"lam": NaN}', "application/json"),
    (b'{"lam": Infinity, "k": 3}', "application/json"),
    (b'{"lam": -Infinity}', "application/json"),
    (b'{"lam": 1e999}', "application/json"),
    (b'{"user_id": 99999999999999999999999999}', "application/json"),
    (b'{"history": [-9223372036854775809]}', "application/json"),
    (b'{"k": 1' + b"0" * 5000 + b"}", "application/json"),
    (b'{"k": 3, "k": 4}', "application/json"),
    (b'{"history": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json"),
    ('{"\u00fc\u00f1\u00ee\U0001f600": "\u4e2d\u6587"}'.encode(), "application/json"),
    (b'{"user_id": "\\udfff"}', "application/json"),
    (b'{"k": "\xff"}', "application/json"),
    (b"\xef\xbb\xbf{}", "application/json"),
    (b'{"k": 3}', "text/plain"),
    (b"k=3", "application/x-www-form-urlencoded"),
    (b'{"history": [' + b"1," * 100000 + b"1]}", "application/json"),
]


def fuzz_schema(url: str, examples: int) -> Counter:
    """Status counts over every operation, positive and negative, seeded."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    statuses: Counter = Counter()
    for mode in ("positive", "negative"):
        for result in schema.get_all_operations():
            op = result.ok()

            @given(case=op.as_strategy(generation_mode=GenerationMode(mode)))
            @settings(
                max_examples=examples,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def check(case) -> None:
                try:
                    statuses[case.call(base_url=url, timeout=30).status_code] += 1
                except httpx.HTTPError as err:  # counted, not fatal: a dropped connection
                    statuses[type(err).__name__] += 1

            with contextlib.suppress(Unsatisfiable):  # no invalid input exists (GET /healthz)
                check()
            print(f"[fuzz] {mode} {op.label}: {sum(statuses.values())} so far", flush=True)
    return statuses


def fuzz_hostile(url: str) -> Counter:
    statuses: Counter = Counter()
    with httpx.Client(timeout=30) as client:
        for body, ctype in HOSTILE:
            resp = client.post(f"{url}/recommend", content=body, headers={"content-type": ctype})
            statuses[resp.status_code] += 1
            print(f"[fuzz] hostile {body[:40]!r} ({ctype}): {resp.status_code}", flush=True)
    return statuses


def tiny_server(root: Path, url: str):
    """A tiny untrained model (tests/serve_support.py) served by jobs.serve."""
    from tests.serve_support import make_model_dir

    model_dir = make_model_dir(root)
    overrides = [
        f"model_dir={model_dir}",
        f"serve.port={int(url.rsplit(':', 1)[1])}",
        "rerank.n_candidates=50",
        "serve.max_k=20",
    ]
    return start_server(str(ROOT / "jobs" / "configs" / "smoke.yaml"), overrides, url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--examples", type=int, default=500, help="per operation and mode")
    parser.add_argument("--tiny", default=None, help="start a server over a tiny model here")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_fuzz.json"))
    args = parser.parse_args(argv)
    proc = None
    if args.tiny:
        proc = tiny_server(Path(args.tiny), args.url)
    try:
        schema_counts, hostile_counts = fuzz_schema(args.url, args.examples), fuzz_hostile(args.url)
    finally:
        if proc is not None:
            os.killpg(proc.pid, 2)  # SIGINT: jobs.serve shuts Serve down
            proc.wait(timeout=60)
    total = schema_counts + hostile_counts
    errors = sum(n for code, n in total.items() if isinstance(code, int) and code >= 500)
    out = {
        "url": args.url,
        "examples_per_operation_and_mode": args.examples,
        "schemathesis": {str(k): v for k, v in sorted(schema_counts.items(), key=str)},
        "hostile": {str(k): v for k, v in sorted(hostile_counts.items(), key=str)},
        "requests": sum(total.values()),
        "server_errors_5xx": errors,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
