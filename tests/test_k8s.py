"""KubeRay manifests (cluster/k8s/) checked offline: no Kubernetes, no Ray cluster.

- Every object validates against its CRD's openAPIV3Schema (../shared/k8s-crds/, or
  RECDIV_K8S_CRDS) as the API server applies it under kubectl's default strict field validation:
  unknown fields are refused, `x-kubernetes-int-or-string` takes either, list-map keys are unique.
  CEL rules (`x-kubernetes-validations`) are not evaluated: none applies to fields we set.
- serveConfigV2 validates against Ray's ServeDeploySchema, with unknown keys refused (Ray accepts
  them for forward compatibility and then ignores them); its import path resolves to the
  project's app builder, which accepts its args (build_app stubbed: no model is loaded); its
  deployments are those the builder creates; it is serve/config.yaml's application.
- The RayJob runs `python -m jobs.<module>` with a config in the repository whose overrides load,
  writing to object storage where the RayService reads.
- Mutated copies (a misspelt field, a wrong type, a missing required field) must fail.
"""

from __future__ import annotations

import ast
import copy
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import re
import shlex
import typing
from functools import cache
from pathlib import Path
from unittest import mock

import jsonschema
import pydantic
import pytest
import yaml

from tests.conftest import ROOT

K8S = ROOT / "cluster" / "k8s"
RAYJOB, RAYSERVICE = K8S / "rayjob.yaml", K8S / "rayservice.yaml"
CRD_DIR = Path(os.environ.get("RECDIV_K8S_CRDS", ROOT.parent / "shared" / "k8s-crds"))
IMAGE_REPO = "/home/ray/raydiv-rec"  # where cluster/k8s/Dockerfile puts the repository
SECRET_NAME = re.compile(r"(?i)secret|token|password|access_key|credential")


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def one(path: Path, kind: str) -> dict:
    (obj,) = [doc for doc in load(path) if doc.get("kind") == kind]
    return obj


def cluster_spec(obj: dict) -> dict:
    return obj["spec"]["rayClusterSpec" if obj["kind"] == "RayJob" else "rayClusterConfig"]


def pod_templates(obj: dict) -> list[dict]:
    spec = cluster_spec(obj)
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


# ---- CRD validation ---------------------------------------------------------------------------


def k8s_schema(schema: dict) -> dict:
    """A CRD's OpenAPI v3 schema node -> JSON Schema, as the API server applies it."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: k8s_schema(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False  # strict field validation: unknown -> error
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = k8s_schema(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [k8s_schema(sub) for sub in out[key]]
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _unique_list_map_keys(validator, keys, instance, schema):
    """x-kubernetes-list-map-keys: no two items share the same key tuple."""
    if not isinstance(instance, list):
        return
    seen = set()
    for item in instance:
        key = tuple(str(item.get(k)) for k in keys) if isinstance(item, dict) else (str(item),)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry for list-map keys {keys}: {key}")
        seen.add(key)


K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-map-keys": _unique_list_map_keys}
)


@cache
def crd_validators() -> dict[tuple[str, str, str], jsonschema.Draft7Validator]:
    """(group, version, kind) -> validator of each served version of each CRD in CRD_DIR."""
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        spec = crd["spec"]
        for version in spec["versions"]:
            if version.get("served"):
                schema = k8s_schema(version["schema"]["openAPIV3Schema"])
                key = (spec["group"], version["name"], spec["names"]["kind"])
                out[key] = K8sValidator(schema)
    return out


def need_crds() -> None:
    if not any(CRD_DIR.glob("*.yaml")):
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (set RECDIV_K8S_CRDS)")


def crd_errors(obj: dict) -> list[str]:
    """Why the API server would refuse `obj` (empty: it would accept it)."""
    group, _, version = obj.get("apiVersion", "").rpartition("/")
    validator = crd_validators().get((group, version, obj.get("kind")))
    if validator is None:
        return [f"no served CRD for apiVersion={obj.get('apiVersion')!r} kind={obj.get('kind')!r}"]
    errors = [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(obj)
    ]
    name = obj.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 50:
        errors.append(f"metadata.name {name!r} is not a short DNS-1123 label")
    return errors


@pytest.mark.parametrize("path", [RAYJOB, RAYSERVICE], ids=lambda p: p.name)
def test_every_object_validates_against_its_crd(path):
    need_crds()
    docs = load(path)
    assert docs, f"{path} holds no object"
    for obj in docs:
        assert crd_errors(obj) == [], f"{path.name} {obj.get('kind')}"


def test_embedded_cluster_specs_validate_as_rayclusters():
    need_crds()
    for path, kind in ((RAYJOB, "RayJob"), (RAYSERVICE, "RayService")):
        raycluster = {
            "apiVersion": "ray.io/v1",
            "kind": "RayCluster",
            "metadata": {"name": "check"},
            "spec": cluster_spec(one(path, kind)),
        }
        assert crd_errors(raycluster) == [], path.name


def _rename(d: dict, old: str, new: str) -> None:
    d[new] = d.pop(old)


CRD_MUTATIONS = {
    "misspelt spec field": (RAYJOB, lambda o: _rename(o["spec"], "entrypoint", "entryPoint")),
    "misspelt container field": (
        RAYJOB,
        lambda o: _rename(pod_templates(o)[1]["spec"]["containers"][0], "resources", "resource"),
    ),
    "misspelt worker group field": (
        RAYSERVICE,
        lambda o: _rename(cluster_spec(o)["workerGroupSpecs"][0], "maxReplicas", "maxReplica"),
    ),
    "rayStartParams value not a string": (
        RAYSERVICE,
        lambda o: cluster_spec(o)["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
    ),
    "required groupName missing": (
        RAYSERVICE,
        lambda o: cluster_spec(o)["workerGroupSpecs"][1].pop("groupName"),
    ),
    "auth mode outside the enum": (
        RAYJOB,
        lambda o: cluster_spec(o)["authOptions"].update({"mode": "tokens"}),
    ),
    "bad resource quantity": (
        RAYJOB,
        lambda o: pod_templates(o)[0]["spec"]["containers"][0]["resources"]["limits"].update(
            {"memory": "28 GB"}
        ),
    ),
    "duplicate container port": (
        RAYSERVICE,
        lambda o: (ports := pod_templates(o)[0]["spec"]["containers"][0]["ports"]).append(
            dict(ports[0])
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(CRD_MUTATIONS))
def test_a_broken_copy_fails_crd_validation(case):
    need_crds()
    path, mutate = CRD_MUTATIONS[case]
    obj = copy.deepcopy(one(path, "RayJob" if path == RAYJOB else "RayService"))
    mutate(obj)
    assert crd_errors(obj), f"{case}: the mutated {path.name} still validates"


# ---- what the manifests must say (autoscaling, auth, no secrets, image) ------------------------


@pytest.mark.parametrize("path", [RAYJOB, RAYSERVICE], ids=lambda p: p.name)
def test_cluster_shape_auth_and_no_secrets(path):
    (obj,) = load(path)
    spec = cluster_spec(obj)
    assert spec["authOptions"]["mode"] == "token", "Ray token auth must stay on"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == importlib.metadata.version("ray")
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
    assert not _gpus(head["template"]), "the head is CPU only"
    groups = spec["workerGroupSpecs"]
    assert any(_gpus(g["template"]) for g in groups), "no GPU worker group"
    for g in groups:
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], g["groupName"]
    images = set()
    for template in pod_templates(obj):
        for container in template["spec"]["containers"]:
            images.add(container["image"])
            for env in container.get("env", []):
                if SECRET_NAME.search(env["name"]):
                    assert "value" not in env, f"{env['name']}: a secret value in the manifest"
    assert len(images) == 1, f"one image for every pod, got {images}"
    text = path.read_text()
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b|PRIVATE KEY-----", text)


def _gpus(template: dict) -> int:
    containers = template["spec"]["containers"]
    return sum(int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 0)) for c in containers)


def test_dockerfile_builds_the_ray_of_the_project():
    text = (K8S / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=rayproject/ray:(\S+)$", text, re.M)
    assert base and base.group(1).startswith(importlib.metadata.version("ray") + "-py311")
    assert re.search(rf"^WORKDIR {IMAGE_REPO}$", text, re.M)


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
    _rename(config["applications"][0]["deployments"][0], "max_ongoing_requests", "max_ongoing")


SERVE_MUTATIONS = {
    "misspelt deployment field": _misspell_deployment_field,
    "misspelt autoscaling field": lambda c: _rename(
        c["applications"][0]["deployments"][0]["autoscaling_config"], "max_replicas", "max_replica"
    ),
    "unknown app arg": lambda c: _rename(c["applications"][0]["args"], "model_dir", "model_dirr"),
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
