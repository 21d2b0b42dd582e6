"""Artefacts as the jobs publish them (issue 16): the serving export (jobs.training.
publish_export), prepared data (rec.ray_prepare.prepare) and the policy (as jobs.train_policy
publishes it) are versions with a MANIFEST.json under a root with CURRENT; every reader
refuses a missing, truncated or altered file with one line naming it (jobs: exit 2; Serve:
the replica never comes up). Prepared data is deterministic: the same input gives the same
files, byte for byte (equal manifest content_id), at 1 and 2 CPUs and any Ray Data block size.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs.common import verified_export
from jobs.training import publish_export
from rec import artifacts
from rec.data.config import DataConfig
from rec.data.local import prepare_local
from rec.data.splits import load_item_tables
from rec.data.synthetic import SyntheticConfig
from rec.export import load_export, save_export
from rec.model import ModelConfig
from rec.recommender import build_recommender
from tests.conftest import ROOT

SYNTH = SyntheticConfig(n_users=300, n_items=400, n_categories=20, events_per_user=15, seed=0)
EXPORT_FILES = ("model.safetensors", "model_config.json", "vocab/items.parquet", "data_meta.json")


def damage(path: Path, how: str) -> None:
    """truncated: 7 bytes cut; altered: one byte flipped (same size); missing: deleted."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:-7])
    elif how == "altered":
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :])
    else:
        path.unlink()


def expect(how: str) -> str:
    return {"truncated": "truncated (", "altered": "altered (", "missing": "missing"}[how]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """<dir>/data (prepare_local, sealed in place) and <dir>/export published by the train
    job's own publish_export from a checkpoint-shaped folder (export/ + state.json)."""
    root = tmp_path_factory.mktemp("published")
    prepare_local(DataConfig(format="synthetic", synthetic=SYNTH, max_len=20), root / "data")
    torch.manual_seed(0)
    cfg = ModelConfig(size="tiny", hidden_size=32, n_heads=2, max_len=20, dropout=0.0)
    model = build_recommender(cfg, load_item_tables(root / "data")).eval()
    ckpt = root / "ckpt"
    save_export(model, ckpt / "export", extra={"metrics": {}})
    (ckpt / "state.json").write_text(json.dumps({"epoch": 1}))
    publish_export(ckpt, "file:///ckpt", str(root / "data"), str(root / "export"), {"seed": 0})
    return root


def copy_of(model_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the model dir and the export version its CURRENT names."""
    d = Path(shutil.copytree(model_dir, tmp_path / "m"))
    return d, Path(artifacts.resolve(str(d / "export")))


def test_export_is_a_verified_version(model_dir, tmp_path) -> None:
    root = model_dir / "export"
    m = artifacts.verify(str(root))
    assert m.kind == "export" and m.producer == "jobs.train" and m.config == {"seed": 0}
    assert set(EXPORT_FILES) | {"checkpoint.json"} <= {f.path for f in m.files}
    assert (root / "CURRENT").read_text().strip() == Path(m.path).name
    n_items = load_item_tables(model_dir / "data").n_items
    assert load_export(verified_export(model_dir)).dims.n_items == n_items
    # `python -m rec.artifacts <out>/export`: the user's one-line check
    cli = [sys.executable, "-m", "rec.artifacts", str(root)]
    ok = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and ok.stdout.startswith(f"ok {m.path}: export"), ok.stderr
    # a re-run publishes a new version and switches; the old one is not touched
    d, first = copy_of(model_dir, tmp_path)
    before = (first / "model.safetensors").read_bytes()
    publish_export(d / "ckpt", "file:///ckpt", str(d / "data"), str(d / "export"), {})
    second = Path(artifacts.resolve(str(d / "export")))
    assert second != first and (first / "model.safetensors").read_bytes() == before
    assert artifacts.versions(str(d / "export")) == [str(first), str(second)]


@pytest.mark.parametrize("how", ["truncated", "altered", "missing"])
@pytest.mark.parametrize("name", ["model.safetensors", "vocab/items.parquet"])
def test_export_damage_is_refused_naming_the_file(model_dir, tmp_path, name, how) -> None:
    d, version = copy_of(model_dir, tmp_path)
    damage(version / name, how)
    with pytest.raises(artifacts.ArtifactError) as err:
        verified_export(d)
    msg = str(err.value)
    assert msg.startswith(f"{version}: {name}: {expect(how)}") and "\n" not in msg, msg
    cli = [sys.executable, "-m", "rec.artifacts", str(d / "export")]
    bad = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr == f"error: {msg}\n"


@pytest.mark.parametrize("job", ["evaluate", "serve"])
def test_job_given_an_altered_export_exits_2_naming_it(model_dir, tmp_path, capsys, job) -> None:
    """jobs.evaluate, and jobs.serve before it deploys anything (no Ray started)."""
    import importlib

    d, version = copy_of(model_dir, tmp_path)
    damage(version / "model.safetensors", "altered")
    argv = ["--config", str(ROOT / "jobs/configs/smoke.yaml"), f"model_dir={d}"]
    main = importlib.import_module(f"jobs.{job}").main
    assert main([*argv, f"output_dir={tmp_path / 'f'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {version}: model.safetensors: altered")
    assert not (tmp_path / "f").exists()


def test_job_given_damaged_prepared_data_exits_2_naming_it(model_dir, tmp_path, capsys) -> None:
    """The RL world's reader (jobs.train_policy's first step) verifies data/ too."""
    from jobs import train_policy

    d, _ = copy_of(model_dir, tmp_path)
    test_file = sorted((d / "data" / "test").glob("*.parquet"))[0]
    damage(test_file, "truncated")
    argv = ["--config", str(ROOT / "jobs/configs/smoke.yaml"), f"model_dir={d}"]
    assert train_policy.main([*argv, f"output_dir={tmp_path / 'p'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    rel = test_file.relative_to(d / "data").as_posix()
    assert len(err) == 1 and err[0].startswith(f"error: {d / 'data'}: {rel}: truncated"), err


def test_serve_cache_refuses_damage_and_recheck_sees_later_damage(model_dir, tmp_path) -> None:
    from serve import cache

    d, version = copy_of(model_dir, tmp_path)
    assert cache.local_dir(str(d / "export")) == version  # a local version: read in place
    cache.recheck()
    damage(version / "model_config.json", "truncated")  # after the replica loaded it
    with pytest.raises(artifacts.ArtifactError, match="model_config.json: truncated"):
        cache.recheck()  # what check_health calls: the replica turns unhealthy
    with pytest.raises(artifacts.ArtifactError, match="model_config.json: truncated"):
        cache.local_dir(str(d / "export"))  # and its replacement never comes up
    cache._VERIFIED.clear()  # this test's copies only


def test_unpublished_folder_is_refused(tmp_path) -> None:
    plain = tmp_path / "m" / "export"
    plain.mkdir(parents=True)
    (plain / "model_config.json").write_text("{}")
    with pytest.raises(artifacts.ArtifactError, match="MANIFEST.json: missing"):
        verified_export(tmp_path / "m")


@pytest.mark.parametrize("how", ["truncated", "altered", "missing"])
def test_policy_as_published_refuses_damage(tmp_path, how) -> None:
    from rl.policy import POLICY_FILE, LamPolicy
    from tests.serve_support import make_policy_dir

    build = make_policy_dir(tmp_path / "build")
    (build / artifacts.MANIFEST).unlink()  # the fixture seals in place; the job publishes
    dest = str(tmp_path / "policy")
    artifacts.publish(build, dest, kind="policy", producer="jobs.train_policy", config={})
    assert LamPolicy.load(dest).env_cfg.action_mode == "discrete"
    version = Path(artifacts.resolve(dest))
    files = [p for p in (version / "rl_module").rglob("*") if p.is_file()]
    module_file = max(files, key=lambda p: p.stat().st_size)  # the weights
    target = version / POLICY_FILE if how == "altered" else module_file
    damage(target, how)
    with pytest.raises(artifacts.ArtifactError) as err:
        LamPolicy.load(dest)
    rel = target.relative_to(version).as_posix()
    assert str(err.value).startswith(f"{version}: {rel}: {expect(how)}"), err.value


@pytest.mark.ray
def test_prepare_is_deterministic_at_1_and_2_cpus(ray_local, tmp_path, capsys) -> None:
    """The job at 1 CPU (its own Ray) and the pipeline at 2 CPUs with 64 KiB Ray Data blocks
    write the same files, byte for byte; then a job reading a damaged copy exits 2."""
    import polars as pl
    import ray.data

    from jobs import train
    from jobs.config import RunConfig
    from rec.config_loader import load_config
    from rec.ray_prepare import prepare

    smoke = str(ROOT / "jobs/configs/smoke.yaml")
    over = [f"data.path={tmp_path / 'raw'}"]
    one = [*over, f"output_dir={tmp_path / 'one'}", "ray.num_cpus=1"]
    job = [sys.executable, "-m", "jobs.prepare", "--config", smoke, *one]
    done = subprocess.run(job, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ctx = ray.data.DataContext.get_current()
    saved, ctx.target_max_block_size = ctx.target_max_block_size, 64 << 10
    try:
        prepare(load_config(RunConfig, smoke, over).data, tmp_path / "two" / "data")
    finally:
        ctx.target_max_block_size = saved
    a, b = artifacts.verify(str(tmp_path / "one")), artifacts.verify(str(tmp_path / "two/data"))
    assert [f.path for f in a.files] == [f.path for f in b.files]
    assert a.content_id == b.content_id and a.kind == b.kind == "prepared"
    assert sum(f.path.startswith("train/part-") for f in a.files) > 1  # several buckets
    for part in Path(b.path).glob("test/part-*.parquet"):  # a total order within each file
        users = pl.read_parquet(part)["user_id"].to_list()
        assert users == sorted(users) and len(set(users)) == len(users)

    target = sorted(Path(b.path).glob("train/part-*.parquet"))[0]
    damage(target, "altered")
    argv = ["--config", smoke, f"output_dir={tmp_path / 'two'}"]
    assert train.main(argv) == 2  # train_spec verifies the data before Ray Train starts
    err = capsys.readouterr().err.strip().splitlines()
    rel = target.relative_to(b.path).as_posix()
    assert len(err) == 1 and err[0].startswith(f"error: {b.path}: {rel}: altered"), err


@pytest.mark.ray
def test_serve_replica_with_an_altered_export_never_comes_up(ray_local, model_dir, tmp_path):
    from ray import serve

    from rec.rerank import RerankConfig
    from serve.app import build_app
    from serve.config import ServeConfig

    d, version = copy_of(model_dir, tmp_path)
    damage(version / "model.safetensors", "altered")
    app = build_app(ServeConfig(fused=True), RerankConfig(), str(d))
    serve.start(proxy_location="Disabled")
    try:
        with pytest.raises(RuntimeError, match="Deploying application rec_altered_export failed"):
            serve.run(app, name="rec_altered_export", route_prefix=None)
        status = serve.status().applications["rec_altered_export"]
        ingress = status.deployments["Ingress"]
        assert status.status == "DEPLOY_FAILED" and ingress.status == "DEPLOY_FAILED"
        assert "model.safetensors: altered" in ingress.message, ingress.message[-1000:]
    finally:
        serve.delete("rec_altered_export")
        serve.shutdown()
