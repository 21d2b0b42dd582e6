"""KubeRay manifests (cluster/k8s/) checked offline: no Kubernetes, no Ray cluster.

- Every object validates against its CRD's openAPIV3Schema (../shared/k8s-crds/, or
  RECDIV_K8S_CRDS) as the API server applies it under kubectl's default strict field validation:
  unknown fields are refused, `x-kubernetes-int-or-string` takes either, list-map keys are unique.
  CEL rules (`x-kubernetes-validations`) are not evaluated: none applies to fields we set.
- The clusters autoscale, keep token auth on, hold no secret and run one image of the project's
  Ray.
- Mutated copies (a misspelt field, a wrong type, a missing required field) must fail.

What the manifests run (the RayJob's entrypoint, the RayService's serveConfigV2) is checked in
tests/test_k8s_apps.py, which reuses the loaders here.
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import re
from functools import cache
from pathlib import Path

import jsonschema
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


def rename(d: dict, old: str, new: str) -> None:
    """Key `old` of `d` renamed `new`: how a mutated copy misspells a field."""
    d[new] = d.pop(old)


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


CRD_MUTATIONS = {
    "misspelt spec field": (RAYJOB, lambda o: rename(o["spec"], "entrypoint", "entryPoint")),
    "misspelt container field": (
        RAYJOB,
        lambda o: rename(pod_templates(o)[1]["spec"]["containers"][0], "resources", "resource"),
    ),
    "misspelt worker group field": (
        RAYSERVICE,
        lambda o: rename(cluster_spec(o)["workerGroupSpecs"][0], "maxReplicas", "maxReplica"),
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
