r"""Serve the trained recommender (and the RL lam policy) over HTTP with Ray Serve.

    python -m jobs.serve --config jobs/configs/beauty.yaml model_dir=outputs/beauty \
        policy_dir=outputs/policy
    curl -s localhost:8000/recommend -H 'content-type: application/json' \
        -d '{"user_id": 2, "history": [301], "k": 5}'

Reads <model_dir>/export (weights, vocab) and <model_dir>/data (users' logged histories, if
there), and <policy_dir>/ when given. Serves on http://{serve.host}:{serve.port} until Ctrl-C;
OpenAPI docs at /docs. Without policy_dir, requests without lam get serve.default_lam.
"""

from __future__ import annotations

import signal
import sys
import time

from jobs.common import check_locations, init_ray, main_guard, parse_args
from jobs.config import RunConfig
from rec import artifacts, storage
from rec.config_loader import ConfigError
from rec.logs import get_logger

log = get_logger("serve")


def run(cfg: RunConfig, block: bool = True) -> str:
    """Start Serve and deploy the application; returns its base URL. block: serve until Ctrl-C."""
    from ray import serve

    from serve.app import build_app

    if cfg.model_dir is None:
        raise ConfigError("model_dir is required: a train job's output_dir (with export/)")
    check_locations(cfg)  # a URI whose bucket cannot be reached: one line, exit 2
    # A bad artefact: one line and exit 2 here, before any replica fails on it. Remote ones
    # only by listing (sizes); each replica hashes its own node-local copy anyway.
    for root in (storage.join(cfg.model_dir, "export"), cfg.policy_dir):
        if root:
            artifacts.verify(root, hashes=not storage.is_uri(root))
    try:
        app = build_app(cfg.serve, cfg.rerank, cfg.model_dir, cfg.policy_dir)
    except ValueError as err:  # missing artifacts: a config problem, not a crash
        raise ConfigError(str(err)) from None
    init_ray(cfg.ray)
    serve.start(
        proxy_location=cfg.serve.proxy_location,
        http_options={"host": cfg.serve.host, "port": cfg.serve.port},
        controller_options=_controller_options(cfg),
    )
    serve.run(app, name=cfg.serve.app_name, route_prefix=cfg.serve.route_prefix)
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    log.info("%s at %s (docs: %s/docs)", cfg.serve.app_name, url, url)
    if block:
        # `kill` (SIGTERM) stops the server as cleanly as Ctrl-C does.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            log.info("shutting down")
            serve.shutdown()
    return url


def _controller_options(cfg: RunConfig) -> dict | None:
    """The replay of requests whose ingress replica died (serve/proxy_retry.py), installed in
    Ray's HTTP proxy through the controller's environment, which the proxy inherits. Applied
    only where this job starts Serve (a running Serve keeps its proxy and says so)."""
    from serve import proxy_retry

    s = cfg.serve
    if not s.proxy_retries:
        return None
    env = proxy_retry.controller_env(
        s.proxy_retries, s.proxy_retry_wait_s, s.retry_after_s, s.proxy_first_wait_s
    )
    return {"runtime_env": {"env_vars": env}}


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    return main_guard(lambda: run(parse_args(RunConfig, argv, __doc__)))


if __name__ == "__main__":
    sys.exit(main())
