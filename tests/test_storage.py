"""rec.storage against local paths and a real S3 server (moto_server on loopback, over HTTP)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from rec import aws_env, storage
from rec.storage import StorageError, join
from tests.conftest import ROOT

pytest_plugins = ["tests.s3_server"]


@pytest.fixture(autouse=True)
def _cwd_stays_clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run in an empty cwd and check no folder named after a URI ever appears in it."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield
    assert not [p for p in cwd.rglob("*") if p.name.endswith(":")], list(cwd.rglob("*"))


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path: Path) -> str:
    """A writable root: a local folder, or a fresh bucket on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    return join(request.getfixturevalue("s3").uri, "root")


def test_join_keeps_uris_and_local_paths():
    assert join("s3://b/x", "y", "z.txt") == "s3://b/x/y/z.txt"
    assert join("s3://b/x/", "/y/", "z") == "s3://b/x/y/z"
    assert join("s3://b", "x") == "s3://b/x"
    assert join("gs://b/p", "") == "gs://b/p"
    assert join("runs/r1", "export") == os.path.join("runs/r1", "export")
    assert join(Path("/tmp/a"), "b") == "/tmp/a/b"
    with pytest.raises(StorageError, match="'//' was lost"):
        join(str(Path("s3://b/x")), "y")  # pathlib already ate one slash


def test_local_path_refuses_uris():
    assert storage.local_path("a/b") == Path("a/b")
    assert storage.local_path("file:///tmp/x") == Path("/tmp/x")
    with pytest.raises(StorageError, match="s3://b/x: a URI where a local path"):
        storage.local_path("s3://b/x")
    with pytest.raises(StorageError):
        storage.makedirs("s3:/b/x")
    storage.makedirs("s3://b/x")  # a no-op on object stores
    assert storage.is_uri("s3://b") and storage.is_uri("file:///x") and not storage.is_uri("a:b")


def test_filesystem_resolution(s3):
    fs, path = storage.filesystem(join(s3.uri, "a", "b.txt"))
    assert fs.type_name == "s3" and path == f"{s3.bucket}/a/b.txt"
    fs, path = storage.filesystem("rel/x")
    assert fs.type_name == "local" and path == os.path.abspath("rel/x")
    assert storage.to_uri(*storage.filesystem(join(s3.uri, "k"))) == join(s3.uri, "k")
    assert storage.for_ray("rel/x") == (os.path.abspath("rel/x"), None)
    paths, fs = storage.for_ray([join(s3.uri, "a"), join(s3.uri, "b")])
    assert paths == [f"{s3.bucket}/a", f"{s3.bucket}/b"] and fs.type_name == "s3"


def test_text_and_bytes_round_trip(base):
    storage.write_text(join(base, "d", "note.txt"), "héllo")
    storage.write_bytes(join(base, "d", "blob.bin"), b"\x00\x01")
    assert storage.read_text(join(base, "d", "note.txt")) == "héllo"
    assert storage.read_bytes(join(base, "d", "blob.bin")) == b"\x00\x01"
    assert storage.exists(join(base, "d")) and storage.exists(join(base, "d", "note.txt"))
    assert not storage.exists(join(base, "nothing"))
    assert storage.listdir(join(base, "d")) == [
        join(base, "d", "blob.bin"),
        join(base, "d", "note.txt"),
    ]
    storage.delete(join(base, "d"))
    assert not storage.exists(join(base, "d", "note.txt"))


def test_gzip_input_is_decompressed(base, tmp_path):
    import gzip

    local = tmp_path / "log.csv.gz"
    local.write_bytes(gzip.compress(b"a,b\n1,2\n"))
    storage.upload_dir(local, join(base, "raw", "log.csv.gz"))
    with storage.open_input(join(base, "raw", "log.csv.gz"), decompress=True) as f:
        assert f.read() == b"a,b\n1,2\n"


def test_parquet_round_trip(base):
    frame = pl.DataFrame({"user_id": [1, 2, 3], "item": ["a", "b", "c"]})
    storage.write_parquet(frame, join(base, "split", "part-0.parquet"))
    storage.write_parquet(frame.to_arrow(), join(base, "split", "sub", "part-1.parquet"))
    assert storage.read_parquet(join(base, "split", "part-0.parquet")).equals(frame)
    both = storage.read_parquet(join(base, "split"), columns=["user_id"])
    assert sorted(both["user_id"].to_list()) == [1, 1, 2, 2, 3, 3]
    assert storage.glob(join(base, "split")) == [
        join(base, "split", "part-0.parquet"),
        join(base, "split", "sub", "part-1.parquet"),
    ]
    # pyarrow directly, through the resolved filesystem
    fs, path = storage.filesystem(join(base, "split", "part-0.parquet"))
    assert pq.read_table(path, filesystem=fs).num_rows == 3


def test_polars_own_reader_with_storage_options(s3):
    frame = pl.DataFrame({"x": [1.5, 2.5]})
    uri = join(s3.uri, "p.parquet")
    storage.write_parquet(frame, uri)
    options = storage.polars_storage_options(uri)
    assert options == {"aws_endpoint_url": s3.endpoint, "aws_region": "us-east-1"}
    assert pl.scan_parquet(uri, storage_options=options).collect().equals(frame)


def test_directory_up_and_down_without_marker_objects(s3, tmp_path):
    src = tmp_path / "export"
    (src / "vocab").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(os.urandom(3000))
    (src / "vocab" / "items.json").write_text(json.dumps({"a": 1}))
    assert storage.upload_dir(src, join(s3.uri, "runs", "export")) == 2
    assert storage.download_dir(join(s3.uri, "runs", "export"), tmp_path / "back") == 2
    for rel in ("model.safetensors", "vocab/items.json"):
        assert (tmp_path / "back" / rel).read_bytes() == (src / rel).read_bytes()
    import boto3

    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3.bucket)["Contents"]]
    assert sorted(keys) == ["runs/export/model.safetensors", "runs/export/vocab/items.json"]


def test_local_write_is_atomic(tmp_path):
    target = tmp_path / "out" / "stats.json"
    storage.write_text(target, "old")
    with pytest.raises(RuntimeError), storage.open_output(target) as f:
        f.write(b"half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["stats.json"]  # no temp file left


def test_failed_object_write_leaves_nothing(s3):
    uri = join(s3.uri, "stats.json")
    with pytest.raises(RuntimeError), storage.open_output(uri) as f:
        f.write(b"partial")
        raise RuntimeError("killed mid-write")
    assert not storage.exists(uri)


def _remote_export(s3, tmp_path) -> str:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "weights.bin").write_bytes(b"w" * 5000)
    (src / "sub" / "config.json").write_text("{}")
    uri = join(s3.uri, "export")
    storage.upload_dir(src, uri)
    return uri


def test_local_copy_copies_once_per_content(s3, tmp_path, monkeypatch):
    uri = _remote_export(s3, tmp_path)
    copies = []
    real_copy = storage.copy_tree
    monkeypatch.setattr(storage, "copy_tree", lambda a, b: copies.append(a) or real_copy(a, b))
    first = storage.local_copy(uri, tmp_path / "cache")
    second = storage.local_copy(uri, tmp_path / "cache")
    assert first == second and len(copies) == 1
    assert (first / "weights.bin").read_bytes() == b"w" * 5000
    assert (first / "sub" / "config.json").read_text() == "{}"
    time.sleep(1.1)  # S3 mtimes have one-second resolution
    storage.write_text(join(uri, "sub", "config.json"), '{"v": 2}')
    third = storage.local_copy(uri, tmp_path / "cache")
    assert third != first and (third / "sub" / "config.json").read_text() == '{"v": 2}'
    single = storage.local_copy(join(uri, "weights.bin"), tmp_path / "cache")
    assert single.name == "weights.bin" and single.read_bytes() == b"w" * 5000
    assert storage.local_copy("rel/dir", tmp_path / "cache") == Path("rel/dir")


def test_partial_copy_is_never_returned(s3, tmp_path, monkeypatch):
    uri = _remote_export(s3, tmp_path)
    cache = tmp_path / "cache"
    real_copy = storage.copy_tree

    def dies_half_way(src, dst):
        Path(dst).mkdir(parents=True)
        (Path(dst) / "weights.bin").write_bytes(b"w" * 10)
        raise OSError("connection reset")

    monkeypatch.setattr(storage, "copy_tree", dies_half_way)
    with pytest.raises(OSError):
        storage.local_copy(uri, cache)
    assert not [p for p in cache.iterdir() if p.is_dir()]  # nothing left that looks done
    (cache / f".tmp-{'0' * 12}-stale").mkdir()  # a copier killed with SIGKILL, other URI
    monkeypatch.setattr(storage, "copy_tree", real_copy)
    done = storage.local_copy(uri, cache)
    assert (done / "weights.bin").read_bytes() == b"w" * 5000


_CHILD = """
import sys, time
from rec import storage
real = storage.copy_tree
copies = []
def slow_copy(a, b):
    copies.append(a)
    time.sleep(0.5)  # hold the lock long enough for the other process to queue on it
    return real(a, b)
storage.copy_tree = slow_copy
time.sleep(max(0.0, float(sys.argv[3]) - time.time()))
path = storage.local_copy(sys.argv[1], sys.argv[2])
print(len(copies), path)
"""


def test_two_processes_share_one_copy(s3, tmp_path):
    uri = _remote_export(s3, tmp_path)
    cache = tmp_path / "cache"
    start_at = str(time.time() + 4.0)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, uri, str(cache), start_at],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(int(n) for n, _ in outs) == 1 and outs[0][1] == outs[1][1]
    assert (Path(outs[0][1]) / "weights.bin").read_bytes() == b"w" * 5000
    assert not list(cache.glob(".tmp-*"))


def _one_line_naming(err: pytest.ExceptionInfo, uri: str) -> str:
    text = str(err.value)
    assert isinstance(err.value, ValueError) and uri in text and "\n" not in text, text
    return text


def test_missing_bucket_is_one_clear_line(s3):
    uri = "s3://no-such-bucket-here/logs/data.csv"
    for call in (storage.read_text, storage.check, storage.read_parquet, storage.fingerprint):
        with pytest.raises(StorageError) as err:
            call(uri)
        assert "does not exist" in _one_line_naming(err, uri)
    with pytest.raises(StorageError) as err:
        storage.write_text(uri, "x")
    _one_line_naming(err, uri)


def test_missing_object_is_one_clear_line(s3):
    uri = join(s3.uri, "missing.txt")
    with pytest.raises(StorageError) as err:
        storage.read_text(uri)
    assert "not found" in _one_line_naming(err, uri)


def test_bad_credentials_are_one_clear_line(s3_server_auth):
    uri = join(s3_server_auth.uri, "x.txt")
    for call in (storage.check, storage.read_text, lambda u: storage.write_text(u, "x")):
        with pytest.raises(StorageError) as err:
            call(uri)
        _one_line_naming(err, uri)


def test_unreachable_endpoint_is_one_clear_line(s3, monkeypatch):
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    uri = join(s3.uri, "x.txt")
    with pytest.raises(StorageError) as err:
        storage.check(uri)
    assert f"127.0.0.1:{port}" in _one_line_naming(err, uri)


def test_aws_settings_follow_boto3(tmp_path, monkeypatch, s3):
    botocore_session = pytest.importorskip("botocore.session")
    config = tmp_path / "aws-config"
    config.write_text(
        "[default]\nregion = eu-west-3\nendpoint_url = http://profile:1\n"
        "[profile svc]\nservices = mine\n[services mine]\ns3 =\n  endpoint_url = http://svc:2\n"
    )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    for var in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var)

    def boto3_endpoint():
        client = botocore_session.Session().create_client(
            "s3", aws_access_key_id="k", aws_secret_access_key="s"
        )
        return client.meta.endpoint_url.rstrip("/")

    cases = [
        ({}, "http://profile:1"),
        ({"AWS_PROFILE": "svc", "AWS_DEFAULT_REGION": "us-east-1"}, "http://svc:2"),
    ]
    cases += [({"AWS_ENDPOINT_URL": "http://env:3"}, "http://env:3")]
    cases += [
        (
            {"AWS_ENDPOINT_URL": "http://env:3", "AWS_ENDPOINT_URL_S3": "http://s3env:4"},
            "http://s3env:4",
        )
    ]
    for env, expected in cases:
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            assert aws_env.s3_endpoint() == boto3_endpoint() == expected, env
    assert aws_env.region() == "eu-west-3"
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    assert aws_env.s3_endpoint() is None


@pytest.mark.ray
def test_ray_data_reads_and_writes_parquet_on_s3(s3, ray_local):
    import ray

    frame = pl.DataFrame({"user_id": list(range(100)), "score": [float(i) for i in range(100)]})
    storage.write_parquet(frame, join(s3.uri, "in", "part-0.parquet"))
    env_vars = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    runtime_env = {"env_vars": env_vars}  # the session's workers may predate this test's env
    paths, fs = storage.for_ray(join(s3.uri, "in"))
    ds = ray.data.read_parquet(paths, filesystem=fs, runtime_env=runtime_env)
    ds = ds.map_batches(lambda b: {**b, "score": b["score"] * 2}, batch_format="numpy")
    out_paths, out_fs = storage.for_ray(join(s3.uri, "out"))
    ds.write_parquet(out_paths, filesystem=out_fs, ray_remote_args={"runtime_env": runtime_env})
    back = storage.read_parquet(join(s3.uri, "out")).sort("user_id")
    assert back["score"].to_list() == [2.0 * i for i in range(100)]
