"""rec.artifacts: versioned artefacts with a manifest, on local paths and a real S3 server."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from rec import artifacts, storage
from rec.artifacts import MANIFEST, ArtifactError
from rec.storage import join
from tests.conftest import ROOT

pytest_plugins = ["tests.s3_server"]

CONFIG = {"train": {"lr": 0.001, "epochs": 3}, "output_dir": "runs/x"}


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path: Path) -> str:
    """An artefact root: a local folder, or a prefix in a fresh bucket on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "store" / "export")
    return join(request.getfixturevalue("s3").uri, "run", "export")


def make_export(root: Path, weights: bytes = b"\x01" * 4096, tag: str = "a") -> Path:
    """A small stand-in for an export directory: weights, config, a vocab subfolder."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.safetensors").write_bytes(weights)
    (root / "model_config.json").write_text(json.dumps({"tag": tag}))
    (root / "vocab").mkdir(exist_ok=True)
    (root / "vocab" / "items.json").write_text('["i1", "i2"]')
    return root


def publish(src: Path, dest: str, **kw) -> str:
    return artifacts.publish(src, dest, kind="export", producer="jobs.train", config=CONFIG, **kw)


def test_publish_then_verify_round_trip(base, tmp_path):
    src = make_export(tmp_path / "src")
    version = publish(src, base)
    assert version.startswith(base) and version.rsplit("/", 1)[-1].startswith("v-")
    assert artifacts.resolve(base) == version
    assert artifacts.resolve(version) == version  # a version dir is itself readable
    m = artifacts.verify(base)
    assert m.path == version and m.kind == "export" and m.producer == "jobs.train"
    assert m.config == CONFIG and m.created_at.endswith("+00:00")
    assert [(f.path, f.size) for f in m.files] == [
        ("model.safetensors", 4096),
        ("model_config.json", len('{"tag": "a"}')),
        ("vocab/items.json", len('["i1", "i2"]')),
    ]
    assert m.content_id == artifacts.content_id(m.files) and m.unlisted == ()
    assert storage.read_bytes(join(m.path, "model.safetensors")) == b"\x01" * 4096
    # the same contents give the same id, whoever publishes them and when
    again = make_export(tmp_path / "src2")
    assert artifacts.verify(publish(again, base + "-other")).content_id == m.content_id


def _corrupt(version: str, how: str) -> None:
    target = join(version, "model.safetensors")
    data = storage.read_bytes(target)
    if how == "missing":
        storage.delete(target)
    elif how == "truncated":
        storage.write_bytes(target, data[:1000])
    elif how == "altered":
        storage.write_bytes(target, data[:2000] + b"\x02" + data[2001:])
    elif how == "no manifest":
        storage.delete(join(version, MANIFEST))


@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("missing", r"model\.safetensors: missing$"),
        ("truncated", r"model\.safetensors: truncated \(1000 bytes, manifest says 4096\)$"),
        ("altered", r"model\.safetensors: altered \(sha256 [0-9a-f]{12}\.\.\., manifest says"),
        ("no manifest", r"MANIFEST\.json: missing"),
    ],
)
def test_a_damaged_artefact_is_refused_in_one_line(base, tmp_path, how, says):
    version = publish(make_export(tmp_path / "src"), base)
    _corrupt(version, how)
    with pytest.raises(ArtifactError, match=says) as err:
        artifacts.verify(version)
    message = str(err.value)
    assert "\n" not in message and message.startswith(version + ": ")
    if how != "no manifest":  # through the root too (CURRENT still names the version)
        with pytest.raises(ArtifactError, match=says):
            artifacts.verify(base)


def test_sizes_only_check_misses_an_altered_byte_but_not_a_truncation(tmp_path):
    dest = str(tmp_path / "export")
    version = publish(make_export(tmp_path / "src"), dest)
    _corrupt(version, "altered")
    artifacts.verify(dest, hashes=False)  # documented: hashes=False cannot see this
    with pytest.raises(ArtifactError, match="altered"):
        artifacts.verify(dest)
    _corrupt(version, "truncated")
    with pytest.raises(ArtifactError, match="truncated"):
        artifacts.verify(dest, hashes=False)


def test_unpublished_and_absent_directories(tmp_path, s3):
    legacy = make_export(tmp_path / "legacy")  # an export written before manifests existed
    with pytest.raises(ArtifactError, match=rf"^{legacy}: MANIFEST\.json: missing \(incomplete"):
        artifacts.resolve(str(legacy))
    with pytest.raises(ArtifactError, match="not found"):
        artifacts.verify(str(tmp_path / "nothing"))
    with pytest.raises(ArtifactError, match="not found"):
        artifacts.verify(join(s3.uri, "nothing"))


def test_republish_makes_a_new_version_and_switches_last(base, tmp_path, monkeypatch):
    old = publish(make_export(tmp_path / "a", tag="a"), base)
    seen = []
    copy_file = storage._copy_file

    def observing_copy(*args):
        # while the new version is being written, readers still get the old one, intact
        seen.append((artifacts.resolve(base), artifacts.verify(base).path))
        copy_file(*args)

    with monkeypatch.context() as patch:
        patch.setattr(storage, "_copy_file", observing_copy)
        new = publish(make_export(tmp_path / "b", weights=b"\x03" * 100, tag="b"), base)
    assert new != old and seen and set(seen) == {(old, old)}
    assert artifacts.resolve(base) == new and artifacts.verify(base).files[0].size == 100
    artifacts.verify(old)  # kept (keep=2): a reader that resolved it just before still can read
    assert artifacts.versions(base) == [old, new]


def test_old_versions_are_pruned_beyond_keep(tmp_path):
    dest = str(tmp_path / "export")
    made = [publish(make_export(tmp_path / f"s{i}", tag=str(i)), dest, keep=2) for i in range(4)]
    assert artifacts.versions(dest) == made[-2:]
    assert not Path(made[0]).exists() and not Path(made[1]).exists()
    publish(make_export(tmp_path / "s9", tag="9"), dest, keep=None)
    assert len(artifacts.versions(dest)) == 3


def test_a_publish_killed_midway_leaves_the_previous_version(base, tmp_path, monkeypatch):
    old = publish(make_export(tmp_path / "a"), base)
    copied = []
    copy_file = storage._copy_file

    def dying_copy(*args):
        if len(copied) == 1:
            raise RuntimeError("killed during the copy")
        copied.append(args)
        copy_file(*args)

    with monkeypatch.context() as patch, pytest.raises(RuntimeError, match="killed"):
        patch.setattr(storage, "_copy_file", dying_copy)
        publish(make_export(tmp_path / "b", tag="b"), base)
    assert copied  # it died with part of the files written
    assert artifacts.resolve(base) == old and artifacts.versions(base) == [old]
    artifacts.verify(base)
    leftovers = [
        p for p in storage.listdir(base) if p.rstrip("/") not in (old, join(base, "CURRENT"))
    ]
    assert leftovers == []  # the half version was removed (and was never visible)


def test_a_half_version_left_by_a_hard_kill_is_invisible_and_pruned(base, tmp_path):
    old = publish(make_export(tmp_path / "a"), base)
    half = old.replace(old.rsplit("-", 1)[-1], "00000000")  # same stamp, another suffix
    storage.write_bytes(join(half, "model.safetensors"), b"\x01" * 10)  # no manifest: killed
    assert artifacts.resolve(base) == old and artifacts.versions(base) == [old]
    with pytest.raises(ArtifactError, match="MANIFEST.json: missing"):
        artifacts.verify(half)
    new = publish(make_export(tmp_path / "b", tag="b"), base)
    assert not storage.exists(half) and artifacts.versions(base) == [old, new]


def test_readers_during_switches_always_see_a_complete_version(tmp_path):
    dest = str(tmp_path / "export")
    publish(make_export(tmp_path / "s0", weights=b"\x00" * 50_000, tag="0"), dest, keep=None)
    stop, seen, errors = threading.Event(), set(), []

    def reader():
        while not stop.is_set():
            try:
                m = artifacts.verify(dest)
                seen.add(storage.read_text(join(m.path, "model_config.json")))
            except Exception as e:  # noqa: BLE001 - collected and asserted on below
                errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(1, 6):
        publish(
            make_export(tmp_path / f"s{i}", weights=bytes([i]) * 50_000, tag=str(i)),
            dest,
            keep=None,
        )
    stop.set()
    for t in threads:
        t.join()
    assert errors == [] and len(seen) >= 2


def test_begin_commit_for_writers_that_write_in_place(base):
    staging = artifacts.begin(base)
    with pytest.raises(ArtifactError):
        artifacts.resolve(staging)  # not visible until committed
    storage.write_bytes(join(staging, "train", "part-0.parquet"), b"p0" * 100)
    storage.write_bytes(join(staging, "meta.json"), b"{}")
    version = artifacts.commit(staging, kind="prepared", producer="jobs.prepare", config={})
    m = artifacts.verify(base)
    assert m.path == version and m.kind == "prepared"
    assert [f.path for f in m.files] == ["meta.json", "train/part-0.parquet"]


def test_checkpoint_parts_written_by_ranks(tmp_path):
    ckpt = tmp_path / "checkpoint_000001"
    (ckpt / "deepspeed").mkdir(parents=True)
    (ckpt / "state.json").write_text("{}")
    (ckpt / "deepspeed" / "rank0.pt").write_bytes(b"0" * 64)
    artifacts.write_manifest(
        ckpt, kind="checkpoint", producer="jobs.train", config={}, parts=("rank-1",)
    )
    (ckpt / ".metadata.json").write_text("{}")  # what Ray adds: unlisted, allowed, reported
    with pytest.raises(ArtifactError, match=r"MANIFEST\.rank-1\.json: missing"):
        artifacts.verify(str(ckpt))
    rank1 = tmp_path / "rank1"  # rank 1 writes its own shard and part manifest elsewhere
    (rank1 / "deepspeed").mkdir(parents=True)
    (rank1 / "deepspeed" / "rank1.pt").write_bytes(b"1" * 64)
    artifacts.write_manifest(
        rank1, kind="checkpoint", producer="jobs.train", config={}, part="rank-1"
    )
    storage.copy_tree(rank1, ckpt)  # what Ray does when it merges the ranks' uploads
    m = artifacts.verify(str(ckpt))
    assert {f.path for f in m.files} == {"state.json", "deepspeed/rank0.pt", "deepspeed/rank1.pt"}
    assert m.unlisted == (".metadata.json",)
    (ckpt / "deepspeed" / "rank1.pt").write_bytes(b"1" * 63 + b"x")
    with pytest.raises(ArtifactError, match=r"deepspeed/rank1\.pt: altered"):
        artifacts.verify(str(ckpt))


def test_bad_inputs_are_one_clear_line(tmp_path):
    src = make_export(tmp_path / "src")
    with pytest.raises(ArtifactError, match="kind 'model'"):
        artifacts.publish(src, str(tmp_path / "d"), kind="model", producer="x", config={})
    (src / MANIFEST).write_text("{}")
    with pytest.raises(ArtifactError, match="already there"):
        publish(src, str(tmp_path / "d"))
    with pytest.raises(ArtifactError, match="not a directory"):
        publish(tmp_path / "absent", str(tmp_path / "d"))
    (tmp_path / "d").mkdir(exist_ok=True)
    (tmp_path / "d" / "CURRENT").write_text("../../etc\n")
    with pytest.raises(ArtifactError, match="CURRENT: names '../../etc', not a version"):
        artifacts.resolve(str(tmp_path / "d"))


def test_cli_verifies_and_exits_2_without_a_traceback(tmp_path):
    dest = str(tmp_path / "export")
    version = publish(make_export(tmp_path / "src"), dest)
    ok = subprocess.run(
        [sys.executable, "-m", "rec.artifacts", dest], cwd=ROOT, capture_output=True, text=True
    )
    assert ok.returncode == 0 and ok.stdout.startswith(f"ok {version}: export by jobs.train")
    _corrupt(version, "truncated")
    bad = subprocess.run(
        [sys.executable, "-m", "rec.artifacts", dest], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        f"error: {version}: model.safetensors: truncated (1000 bytes, manifest says 4096)"
    ]
    assert (
        "'ray'"
        not in subprocess.run(
            [sys.executable, "-c", "import sys, rec.artifacts; print(list(sys.modules))"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout
    )


def test_fetch_verified_gives_a_checked_local_copy_of_a_uri(s3, tmp_path):
    dest = join(s3.uri, "run", "export")
    version = publish(make_export(tmp_path / "src"), dest)
    local, m = artifacts.fetch_verified(dest, tmp_path / "cache")
    assert m.path == str(local) and (local / "model.safetensors").read_bytes() == b"\x01" * 4096
    (local / "model.safetensors").write_bytes(b"\x01" * 10)  # a damaged cache copy
    with pytest.raises(
        ArtifactError, match=rf"^{version}: model\.safetensors: truncated .*local copy"
    ):
        artifacts.fetch_verified(dest, tmp_path / "cache")
    local_dest = str(tmp_path / "export")
    publish(make_export(tmp_path / "src2"), local_dest)
    assert artifacts.fetch_verified(local_dest, tmp_path / "cache")[0] == Path(
        artifacts.resolve(local_dest)
    )
