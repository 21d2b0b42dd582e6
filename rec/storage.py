"""Local paths and URIs (s3://, gs://, abfs://, file://), resolved in one place.

    fs, path = filesystem("s3://bucket/runs/r1")    # (pyarrow S3FileSystem, "bucket/runs/r1")
    write_text(join(out, "summary.json"), text)      # out may be "runs/r1" or "s3://bucket/r1"
    export = local_copy(join(out, "export"), cache)  # a local Path, copied once per content

Every setting that names data or an artefact is a plain string: a local path (kept as
given) or a URI. Code that needs the bytes goes through these functions; code that
needs a real local directory (safetensors, DeepSpeed, torch) calls `local_copy` to read
and writes into a temporary directory followed by `upload_dir` to publish.

S3 settings come only from the standard AWS variables and files, as boto3 reads them:
endpoint `AWS_ENDPOINT_URL_S3` > `AWS_ENDPOINT_URL` > the profile's `endpoint_url`
(pyarrow's own S3 client ignores all three, so we pass `endpoint_override`); region
`AWS_REGION` > `AWS_DEFAULT_REGION` > the profile's `region`; credentials are left to the
AWS SDK's default chain (environment, `AWS_PROFILE` + ~/.aws files, web identity,
instance profile). A URI that cannot be opened raises `StorageError` (a ValueError) with
one line naming it (the resolution is in rec/storage_fs.py, re-exported here). No Ray
import here: Ray gets `(path, filesystem)` from `for_ray`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING

import pyarrow.fs as pafs

from rec import aws_env
from rec.storage_fs import (
    StorageError,
    check,
    errors,
    filesystem,
    is_uri,
    local_path,
    refuse_mangled,
    scheme,
)

if TYPE_CHECKING:
    import polars as pl
    import pyarrow as pa

_COPY_THREADS = 8
_CHUNK = 8 << 20


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` as a string; a URI keeps its `//`, a local path stays as given."""
    if not is_uri(base):
        refuse_mangled(os.fspath(base))
        return os.path.join(os.fspath(base), *parts)
    out = str(base).rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def absolute(p: str | os.PathLike) -> str:
    """A URI as it is; a local path made absolute (as a string). Never `Path(uri)`."""
    text = os.fspath(p)
    return text if is_uri(text) else os.path.abspath(local_path(text))


def default_cache() -> Path:
    """Where single-process readers keep their `local_copy` of remote artefacts (per node)."""
    return Path(tempfile.gettempdir()) / "raydiv-cache"


@contextlib.contextmanager
def staged_dir(p: str | os.PathLike) -> Iterator[Path]:
    """A local folder to write a directory of outputs into, published at `p` on success.

    Local `p`: the folder itself (made if missing), written in place as before. A URI: a
    temporary folder, uploaded file by file when the block succeeds (nothing on failure).
    """
    text = os.fspath(p)
    if not is_uri(text):
        out = local_path(text)
        out.mkdir(parents=True, exist_ok=True)
        yield out
        return
    check(text)
    with tempfile.TemporaryDirectory(prefix="raydiv-stage-") as tmp:
        yield Path(tmp)
        if any(Path(tmp).iterdir()):
            upload_dir(tmp, text)


def exists(p: str | os.PathLike) -> bool:
    """True when a file or directory (prefix) exists; a missing bucket raises StorageError."""
    text = os.fspath(p)
    fs, path = filesystem(text)
    with errors(text, "stat"):
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            return True
    check(text)
    return False


def makedirs(p: str | os.PathLike) -> None:
    """mkdir -p for local paths; nothing on object stores (prefixes need no markers)."""
    if is_uri(p) and scheme(p) != "file":
        return
    local_path(p).mkdir(parents=True, exist_ok=True)


def read_bytes(p: str | os.PathLike) -> bytes:
    text = os.fspath(p)
    fs, path = filesystem(text)
    with errors(text, "read"), fs.open_input_stream(path) as f:
        return f.read()


def read_text(p: str | os.PathLike, encoding: str = "utf-8") -> str:
    return read_bytes(p).decode(encoding)


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
    """Write a whole file: temp file + rename locally, one whole object on object stores."""
    with open_output(p) as f:
        f.write(data)


def write_text(p: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    write_bytes(p, text.encode(encoding))


def open_input(p: str | os.PathLike, decompress: bool = False) -> IO[bytes]:
    """A readable binary stream; decompress=True unpacks by extension (.gz, .zst, .bz2)."""
    text = os.fspath(p)
    fs, path = filesystem(text)
    with errors(text, "open"):
        return fs.open_input_stream(path, compression="detect" if decompress else None)


@contextlib.contextmanager
def open_output(p: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Write into a local temp file; publish it only if the block succeeds.

    Locally the temp file sits next to the target and is renamed over it; on an object
    store it is uploaded as one object. A failed write leaves the old target untouched.
    """
    text = os.fspath(p)
    fs, path = filesystem(text)
    local = isinstance(fs, pafs.LocalFileSystem)
    tmp_dir = os.path.dirname(path) if local else None
    if local:
        os.makedirs(tmp_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=tmp_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        if local:
            os.replace(tmp, path)
        else:
            with errors(text, "write"):
                _copy_file(pafs.LocalFileSystem(), tmp, fs, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _copy_file(src_fs: pafs.FileSystem, src: str, dst_fs: pafs.FileSystem, dst: str) -> None:
    with src_fs.open_input_stream(src) as fin, dst_fs.open_output_stream(dst) as fout:
        while chunk := fin.read(_CHUNK):
            fout.write(chunk)


def _files_or_raise(text: str, fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    """`_list_files`, or one StorageError naming `text` (a bad bucket or nothing there)."""
    with errors(text, "list"):
        files = _list_files(fs, path)
    if not files:
        check(text)  # names a missing bucket or refused credentials first
        raise StorageError(f"{text}: not found (nothing at this path)")
    return files


def _list_files(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    """Every file under `path` (recursive), or `path` itself when it is a file."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [info]
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    return sorted(
        (i for i in fs.get_file_info(selector) if i.type == pafs.FileType.File),
        key=lambda i: i.path,
    )


def _relative(base: str, full: str) -> str:
    return full[len(base) :].lstrip("/")


def listdir(p: str | os.PathLike) -> list[str]:
    """Direct children of a directory/prefix, as full paths/URIs in the form of `p`."""
    text = os.fspath(p)
    fs, path = filesystem(text)
    with errors(text, "list"):
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(join(text, _relative(path, i.path)) for i in infos)


def glob(p: str | os.PathLike, pattern: str = "*.parquet") -> list[str]:
    """Files under `p` (recursive) whose path relative to `p` matches `pattern`, sorted."""
    text = os.fspath(p)
    fs, path = filesystem(text)
    with errors(text, "list"):
        infos = _list_files(fs, path)
    rels = (_relative(path, i.path) for i in infos)
    return [join(text, rel) for rel in rels if rel and fnmatch.fnmatch(rel, pattern)]


def delete(p: str | os.PathLike) -> None:
    """Remove a file or a whole directory/prefix; nothing if it does not exist."""
    text = os.fspath(p)
    fs, path = filesystem(text)
    with errors(text, "delete"):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            fs.delete_file(path)
        elif info.type == pafs.FileType.Directory:
            fs.delete_dir(path)


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike) -> int:
    """Copy every file under `src` to the same relative path under `dst`; returns the count.

    Object by object, in parallel, without the empty "dir/" marker objects that
    pyarrow.fs.copy_files leaves on S3. Local destinations get their folders made.
    """
    src_text, dst_text = os.fspath(src), os.fspath(dst)
    src_fs, src_path = filesystem(src_text)
    dst_fs, dst_path = filesystem(dst_text)
    files = _files_or_raise(src_text, src_fs, src_path)
    check(dst_text)
    rels = [_relative(src_path, i.path) for i in files]
    targets = [f"{dst_path}/{rel}" if rel else dst_path for rel in rels]
    if isinstance(dst_fs, pafs.LocalFileSystem):
        for target in {os.path.dirname(t) for t in targets}:
            os.makedirs(target, exist_ok=True)

    def one(pair: tuple[str, str]) -> None:
        _copy_file(src_fs, pair[0], dst_fs, pair[1])

    with errors(src_text, f"copy to {dst_text}"), ThreadPoolExecutor(_COPY_THREADS) as pool:
        list(pool.map(one, zip([i.path for i in files], targets, strict=True)))
    return len(files)


def upload_dir(local_dir: str | os.PathLike, uri: str) -> int:
    """Publish a local directory (an export, a checkpoint) under a path or URI."""
    return copy_tree(local_dir, uri)


def download_dir(uri: str, local_dir: str | os.PathLike) -> int:
    """Copy a directory/prefix into a local directory (see local_copy for a cached copy)."""
    return copy_tree(uri, local_path(local_dir))


def fingerprint(p: str | os.PathLike) -> str:
    """A hash of the relative names, sizes and mtimes of every file under `p`."""
    return _fingerprint(os.fspath(p))[0]


def _fingerprint(text: str) -> tuple[str, bool]:
    """(fingerprint, whether `text` is a single file); StorageError when nothing is there."""
    fs, path = filesystem(text)
    files = _files_or_raise(text, fs, path)
    h = hashlib.sha256()
    for i in files:
        mtime = i.mtime_ns if i.mtime_ns is not None else -1
        h.update(f"{_relative(path, i.path)}\t{i.size}\t{mtime}\n".encode())
    return h.hexdigest()[:16], len(files) == 1 and files[0].path == path


def local_copy(p: str | os.PathLike, cache_root: str | os.PathLike) -> Path:
    """A local Path holding the content of `p`, copied at most once per content.

    Local paths come back as they are. For a URI the copy lives in
    `cache_root/<name>-<hash of URI>-<fingerprint>`: it is made in a temporary folder and
    renamed into place, so a partial copy is never returned; a lock file per URI makes
    concurrent callers (replicas, workers on one node) wait for one copy instead of
    making their own. A single-file URI returns the path of the copied file.
    """
    from filelock import FileLock

    text = os.fspath(p)
    if not is_uri(text) or scheme(text) == "file":
        return local_path(text)
    root = local_path(cache_root)
    root.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text.rstrip("/").rsplit("/", 1)[-1]) or "root"
    key = hashlib.sha256(text.rstrip("/").encode()).hexdigest()[:12]
    content, is_file = _fingerprint(text)
    final = root / f"{name}-{key}-{content}"
    result = final / name if is_file else final
    if final.is_dir():
        return result
    with FileLock(str(root / f".{key}.lock")):
        if final.is_dir():  # another process finished while we waited
            return result
        for stale in root.glob(f".tmp-{key}-*"):  # left by a killed copier: we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        try:
            copy_tree(text, tmp / name if is_file else tmp)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def read_parquet(p: str | os.PathLike, columns: list[str] | None = None) -> pl.DataFrame:
    """A parquet file, or every parquet file under a directory/prefix, as one polars frame."""
    import polars as pl

    return pl.from_arrow(read_arrow(p, columns))


def read_arrow(p: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """Like read_parquet, as a pyarrow Table; goes through pyarrow with our filesystem."""
    import pyarrow.dataset as pads

    text = os.fspath(p)
    fs, path = filesystem(text)
    with errors(text, "read parquet"):
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            check(text)
            raise FileNotFoundError(path)
        return pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=columns)


def write_parquet(table: pl.DataFrame | pa.Table, p: str | os.PathLike) -> None:
    """Write one parquet file, atomically (see open_output)."""
    import pyarrow.parquet as pq

    arrow = table if not hasattr(table, "to_arrow") else table.to_arrow()
    with open_output(p) as f:
        pq.write_table(arrow, f)


def polars_storage_options(p: str | os.PathLike) -> dict[str, str] | None:
    """storage_options for polars' own cloud reader (pl.scan_parquet), from the AWS settings.

    Older polars releases ignore AWS_ENDPOINT_URL; passing it explicitly works in all.
    """
    text = os.fspath(p)
    if not (is_uri(text) and scheme(text) == "s3"):
        return None
    options = {"aws_endpoint_url": aws_env.s3_endpoint(), "aws_region": aws_env.region()}
    return {k: v for k, v in options.items() if v} or None


def for_ray(p: str | os.PathLike | list) -> tuple[str | list[str], pafs.FileSystem | None]:
    """(path or paths, filesystem) for Ray: read_parquet/write_parquet(..., filesystem=fs)
    and RunConfig(storage_path=path, storage_filesystem=fs).

    URIs come back without their scheme plus the filesystem that carries endpoint and
    region (it pickles to every worker); local paths come back absolute with None, so
    Ray's behaviour on local paths is unchanged. A list must share one filesystem.
    """
    if isinstance(p, (list, tuple)):
        pairs = [for_ray(x) for x in p]
        kinds = {type(fs).__name__ for _, fs in pairs}
        if len(kinds) > 1:
            raise StorageError(f"{list(p)!r}: paths on different filesystems in one list")
        return [path for path, _ in pairs], (pairs[0][1] if pairs else None)
    text = os.fspath(p)
    fs, path = filesystem(text)
    return (path, None) if isinstance(fs, pafs.LocalFileSystem) else (path, fs)


def to_uri(fs: pafs.FileSystem | None, path: str) -> str:
    """The inverse of filesystem(): e.g. a Ray Checkpoint's (filesystem, path) as a URI."""
    if fs is None or isinstance(fs, pafs.LocalFileSystem):
        return path
    scheme = {"s3": "s3", "gcs": "gs"}.get(fs.type_name)
    if scheme is None:
        raise StorageError(f"{path}: no URI scheme known for filesystem {fs.type_name!r}")
    return f"{scheme}://{path.lstrip('/')}"
