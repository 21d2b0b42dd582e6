"""What the KubeRay manifests (cluster/k8s/) run, checked offline: no Kubernetes, no Ray.

- The RayJob runs `python -m jobs.<module>` with a config in the repository whose overrides load,
  writing to object storage where the RayService reads.
- serveConfigV2 validates against Ray's ServeDeploySchema, with unknown keys refused (Ray accepts
  them for forward compatibility and then ignores them); its import path resolves to the
  project's app builder, which accepts its args (build_app stubbed: no model is loaded); its
  deployments are those the builder creates; it is serve/config.yaml's application.
- Mutated copies (a misspelt field, a wrong type, an app arg the builder lacks) must be refused.

The manifests' own validity (CRD schemas, auth, image) is tests/test_k8s.py, whose loaders this
module reuses.
"""

from __future__ import annotations

import ast
import copy
import importlib
import importlib.util
import inspect
import shlex
import typing
from pathlib import Path
from unittest import mock

import pydantic
import pytest
import yaml

from tests.conftest import ROOT
from tests.test_k8s import IMAGE_REPO, RAYJOB, RAYSERVICE, one, rename

# ---- the RayJob's entrypoint ------------------------------------------------------------------


def rayjob_command() -> tuple[str, Path, list[str]]:
    """The RayJob's entrypoint -> (job module, its config in this checkout, overrides)."""
    argv = shlex.split(one(RAYJOB, "RayJob")["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), argv
    assert argv[3] == "--config", argv
    local = ROOT / argv[4].removeprefix(IMAGE_REPO + "/")  # the image's copy -> this checkout
    return argv[2], local, argv[5:]


def test_rayjob_entrypoint_is_a_job_module_with_its_config():
    from jobs.config import RunConfig
    from rec.config_loader import load_config

    module, config, overrides = rayjob_command()
    spec = importlib.util.find_spec(module)
    assert spec is not None and Path(spec.origin).is_relative_to(ROOT / "jobs"), module
    tree = ast.parse(Path(spec.origin).read_text())  # not imported: DeepSpeed takes seconds
    assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), module
    assert config.is_file(), f"{config} (the image's copy of the repository) does not exist"
    cfg = load_config(RunConfig, config, overrides)  # unknown keys and bad values fail here
    assert cfg.output_dir.startswith("s3://"), "pods share no disk: outputs go to object storage"
    assert cfg.data.path.startswith("s3://")
    assert cfg.train.use_gpu
    assert "serve" in cfg.pipeline.skip, "the job's cluster is deleted: the RayService serves"
    assert one(RAYJOB, "RayJob")["spec"]["shutdownAfterJobFinishes"] is True


# ---- serveConfigV2 ----------------------------------------------------------------------------


def serve_config() -> dict:
    return yaml.safe_load(one(RAYSERVICE, "RayService")["spec"]["serveConfigV2"])


def _models(annotation) -> list[type[pydantic.BaseModel]]:
    if inspect.isclass(annotation) and issubclass(annotation, pydantic.BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def unknown_keys(model: type[pydantic.BaseModel], data: dict, where: str) -> list[str]:
    """Keys of `data` (recursively) that `model` does not declare."""
    fields = model.model_fields
    names = {f.alias or n: n for n, f in fields.items()} | {n: n for n in fields}
    out = []
    for key, value in data.items():
        if key not in names:
            out.append(f"{where}.{key}")
            continue
        models = _models(fields[names[key]].annotation)
        items = value if isinstance(value, list) else [value]
        if len(models) == 1:
            for i, item in enumerate(items):
                if isinstance(item, dict):
                    suffix = f"[{i}]" if isinstance(value, list) else ""
                    out += unknown_keys(models[0], item, f"{where}.{key}{suffix}")
    return out


def builder_call(import_path: str, args: dict) -> dict:
    """Call the app builder on `args` with build_app stubbed -> build_app's arguments by name."""
    import serve.app as app_module

    module, _, attr = import_path.partition(":")
    builder = getattr(importlib.import_module(module), attr)
    assert builder is app_module.app_builder, f"{import_path} is not serve.app:app_builder"
    bad = sorted(set(args) - set(app_module.APP_ARGS))
    if bad:
        raise ValueError(f"app args {bad} not in serve.app.APP_ARGS {app_module.APP_ARGS}")
    signature = inspect.signature(app_module.build_app)
    with mock.patch.object(app_module, "build_app", autospec=True) as build_app:
        builder(copy.deepcopy(args))
    build_app.assert_called_once()
    call = build_app.call_args
    return dict(signature.bind(*call.args, **call.kwargs).arguments)


def expected_deployments(built: dict) -> set[str]:
    from serve.stages import STAGES

    if built["cfg"].fused:
        return {"Ingress"}
    return {"Ingress"} | {s.deployment for s in STAGES if built["policy_dir"] or not s.needs_policy}


def serve_errors(config: dict) -> list[str]:
    """Why Ray or the app builder would refuse `config` (empty: both accept it)."""
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(config)
    except pydantic.ValidationError as err:
        return [f"ServeDeploySchema: {err}"]
    errors = unknown_keys(ServeDeploySchema, config, "serveConfigV2")
    for app in config["applications"]:
        try:
            built = builder_call(app["import_path"], app.get("args") or {})
        except ValueError as err:  # the builder's own message (ConfigError is a ValueError)
            errors.append(f"{app['name']}: {err}")
            continue
        named = {d["name"] for d in app.get("deployments", [])}
        if named != expected_deployments(built):
            errors.append(f"{app['name']}: deployments {sorted(named)}, the app builds "
                          f"{sorted(expected_deployments(built))}")  # fmt: skip
    return errors


def test_serve_config_v2_is_valid_for_ray_and_the_builder():
    assert serve_errors(serve_config()) == []


def test_serve_config_v2_is_the_application_of_serve_config_yaml():
    """Same app as `serve run serve/config.yaml`; artefacts on S3 where the RayJob writes them."""
    (local,) = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())["applications"]
    (k8s,) = serve_config()["applications"]
    for key in ("name", "route_prefix", "import_path"):
        assert k8s.get(key) == local.get(key), key
    dirs = ("model_dir", "policy_dir")
    same = {k: v for k, v in local["args"].items() if k not in dirs}
    assert {k: v for k, v in k8s["args"].items() if k not in dirs} == same, (
        "builder args differ from serve/config.yaml: update cluster/k8s/rayservice.yaml"
    )
    local_names = {d["name"] for d in local.get("deployments", [])}
    assert local_names <= {d["name"] for d in k8s["deployments"]}
    _, _, overrides = rayjob_command()
    out = next(o.partition("=")[2] for o in overrides if o.startswith("output_dir="))
    assert k8s["args"]["model_dir"] == f"{out}/model"  # jobs/pipeline.py's layout
    assert k8s["args"]["policy_dir"] == f"{out}/policy"


def _misspell_deployment_field(config: dict) -> None:
    rename(config["applications"][0]["deployments"][0], "max_ongoing_requests", "max_ongoing")


SERVE_MUTATIONS = {
    "misspelt deployment field": _misspell_deployment_field,
    "misspelt autoscaling field": lambda c: rename(
        c["applications"][0]["deployments"][0]["autoscaling_config"], "max_replicas", "max_replica"
    ),
    "unknown app arg": lambda c: rename(c["applications"][0]["args"], "model_dir", "model_dirr"),
    "unknown serve arg": lambda c: c["applications"][0]["args"]["serve"].update({"maxk": 10}),
    # The fused app builds no Ranker: Ray would refuse the file (issue 18's `fused: true` bug).
    "deployment the app does not build": lambda c: c["applications"][0]["deployments"].append(
        {"name": "Ranker"}
    ),
    "num_cpus not a number": lambda c: c["applications"][0]["deployments"][0][
        "ray_actor_options"
    ].update({"num_cpus": "one"}),
    "proxy_location outside the enum": lambda c: c.update({"proxy_location": "Everywhere"}),
}


@pytest.mark.parametrize("case", sorted(SERVE_MUTATIONS))
def test_a_broken_serve_config_v2_is_refused(case):
    config = copy.deepcopy(serve_config())
    SERVE_MUTATIONS[case](config)
    assert serve_errors(config), f"{case}: the mutated serveConfigV2 is still accepted"
