"""Artefacts that prove themselves: versioned directories with a manifest, switched atomically.

    version = publish(tmp_dir, join(out, "export"), kind="export", producer="jobs.train",
                      config=dataclasses.asdict(cfg))   # out/export/v-<UTC>-<hex>/ + CURRENT
    m = verify(join(out, "export"))                      # resolve + check; read from m.path

An artefact root `dest` (a local path or a URI) holds immutable versions and a pointer:

    dest/v-20250101T120000123456Z-1a2b3c4d/   one complete version: the files + MANIFEST.json
    dest/CURRENT                               the name of the version readers use (one line)

`MANIFEST.json` lists every file (relative path, size, sha256), the kind ("export",
"checkpoint", "prepared", "policy"), the producing job and its config, the UTC time, and a
content id: sha256 over the sorted "path<TAB>size<TAB>sha256" lines, so equal contents give
equal ids whatever wrote them. A version is complete once its manifest exists: locally it is
built under `.tmp-*` and renamed into place with the manifest inside; on object stores every
file is uploaded first and MANIFEST.json last. CURRENT is replaced atomically (a rename; one
PUT) only after that, so a reader sees the old version or the new one, never half of one, and
a publish killed midway leaves the previous version current. Versions are never overwritten;
`keep` newest complete ones stay (the one a reader resolved just before a switch survives it).
One publisher per `dest` at a time (each job has one driver).

Files in a version that the manifest does not list are allowed (Ray adds its own markers to
checkpoints) and reported in `Manifest.unlisted`. Errors are `ArtifactError` (a ValueError),
one line: "<artefact dir>: <file>: <what is wrong>". No Ray import here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from rec import storage

FORMAT = "raydiv-artifact/v1"
MANIFEST = "MANIFEST.json"
CURRENT = "CURRENT"
KINDS = ("export", "checkpoint", "prepared", "policy")
_VERSION = re.compile(r"^v-\d{8}T\d{12}Z-[0-9a-f]{8}$")
_PART = re.compile(r"^[A-Za-z0-9_-]+$")
_HASH_THREADS = 8
_CHUNK = 8 << 20


class ArtifactError(ValueError):
    """An artefact that is missing, incomplete, truncated or altered; one line naming it."""


@dataclasses.dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the version directory, "/"-separated
    size: int  # bytes
    sha256: str  # hex digest


@dataclasses.dataclass(frozen=True)
class Manifest:
    path: str  # the version directory this manifest describes (local path or URI)
    kind: str
    producer: str  # the job that wrote it, e.g. "jobs.train"
    config: dict[str, Any]  # that job's config
    created_at: str  # ISO 8601, UTC
    content_id: str  # sha256 over the sorted (path, size, sha256) lines of its own files
    files: tuple[FileEntry, ...]  # this manifest's files and those of its parts
    parts: tuple[str, ...] = ()  # names of part manifests MANIFEST.<part>.json (ranks)
    unlisted: tuple[str, ...] = ()  # files present but in no manifest (set by verify)


def publish(
    local_dir: str | os.PathLike,
    dest: str,
    *,
    kind: str,
    producer: str,
    config: Any,
    keep: int | None = 2,
) -> str:
    """Publish a finished local directory as a new version of `dest`, then switch to it.

    Returns the version's path/URI. `config`: a dict or a dataclass (stored as JSON).
    keep: complete versions kept after the switch, the new one included (None: all).
    """
    src = storage.local_path(local_dir)
    if not src.is_dir():
        raise ArtifactError(f"{src}: not a directory (nothing to publish)")
    if (src / MANIFEST).exists():
        raise ArtifactError(f"{src}: {MANIFEST}: already there; publish plain files")
    text = _manifest_text(os.fspath(src), kind, producer, config)
    storage.check(dest)
    name = _version_name()
    if _is_local(dest):
        version = _build_local(dest, name, lambda tmp: storage.copy_tree(src, tmp), text)
    else:
        version = storage.join(dest, name)
        _upload_then_manifest(version, lambda: storage.copy_tree(src, version), text)
    _switch(dest, name, keep)
    return version


def begin(dest: str) -> str:
    """A fresh, invisible directory to write a new version into directly (Ray Data writers
    on a cluster, where no single local directory holds the files); finish with `commit`."""
    storage.check(dest)
    name = _version_name()
    if _is_local(dest):
        staging = storage.join(dest, f".tmp-{name}")
        storage.makedirs(staging)
        return staging
    return storage.join(dest, name)


def commit(staging: str, *, kind: str, producer: str, config: Any, keep: int | None = 2) -> str:
    """Seal what `begin` returned: hash its files (reads them once), write the manifest last,
    switch CURRENT. Returns the version path (locally the staging directory is renamed)."""
    parent, base = staging.rstrip("/").rsplit("/", 1) if "/" in staging else ("", staging)
    name = base.removeprefix(".tmp-")
    if not _VERSION.match(name) or (base == name) == _is_local(staging):
        raise ArtifactError(f"{staging}: not a staging directory from artifacts.begin")
    text = _manifest_text(staging, kind, producer, config)
    if _is_local(staging):
        version = _build_local(parent or ".", name, None, text, staging=staging)
    else:
        version = staging
        _upload_then_manifest(version, lambda: None, text)
    _switch(parent or ".", name, keep)
    return version


def write_manifest(
    directory: str | os.PathLike,
    *,
    kind: str,
    producer: str,
    config: Any,
    part: str | None = None,
    parts: tuple[str, ...] = (),
) -> str:
    """Write MANIFEST.json (or MANIFEST.<part>.json) into a local directory that something
    else places, e.g. a Ray Train checkpoint: rank 0 writes MANIFEST.json with
    parts=("rank-1", ...) and rank k its own part; verify then needs every part.
    Returns the manifest file's path."""
    if part is not None and not _PART.match(part):
        raise ArtifactError(f"{directory}: part {part!r}: use letters, digits, '-' or '_'")
    path = storage.join(os.fspath(directory), MANIFEST if part is None else f"MANIFEST.{part}.json")
    text = _manifest_text(os.fspath(directory), kind, producer, config, parts, part)
    storage.write_text(path, text)
    return path


def resolve(path: str) -> str:
    """The complete version a reader should use: `path/<CURRENT>` when `path` is an artefact
    root, `path` itself when it holds a MANIFEST.json (a version, or a directory written in
    place); ArtifactError otherwise."""
    pointer = storage.join(path, CURRENT)
    if storage.exists(pointer):
        name = storage.read_text(pointer).strip()
        if not _VERSION.match(name):
            raise ArtifactError(f"{path}: {CURRENT}: names {name!r}, not a version")
        version = storage.join(path, name)
        if not storage.exists(storage.join(version, MANIFEST)):
            raise ArtifactError(f"{version}: {MANIFEST}: missing (CURRENT points at it)")
        return version
    if storage.exists(storage.join(path, MANIFEST)):
        return path
    if not storage.exists(path):
        raise ArtifactError(f"{path}: not found (no artefact here)")
    raise ArtifactError(f"{path}: {MANIFEST}: missing (incomplete or unpublished)")


def verify(path: str, hashes: bool = True) -> Manifest:
    """Resolve `path`, then check that every listed file is there with its size and sha256.

    Returns the manifest (`.path`: the version to read from). hashes=False checks presence
    and sizes only, which catches a missing or truncated file but not an altered byte. Skip
    hashes only to re-check a copy this process already verified with hashes (a periodic
    health check, a second open of the same version); never on first load.
    """
    version = resolve(path)
    sizes = _listing(version)
    manifest = _read_manifest(version, MANIFEST)
    files, own = list(manifest.files), {MANIFEST}
    for part in manifest.parts:
        name = f"MANIFEST.{part}.json"
        if name not in sizes:
            raise ArtifactError(f"{version}: {name}: missing (a part of this artefact)")
        files += _read_manifest(version, name).files
        own.add(name)
    for entry in sorted(files, key=lambda e: e.path):
        _check_size(version, entry, sizes.get(entry.path))
    if hashes:
        _check_hashes(version, files)
    unlisted = sorted(set(sizes) - own - {e.path for e in files})
    return dataclasses.replace(manifest, files=tuple(files), unlisted=tuple(unlisted))


def fetch_verified(path: str, cache_root: str | os.PathLike) -> tuple[Path, Manifest]:
    """A verified local copy of the artefact at `path` (root, version, local or URI): what
    torch/safetensors readers and Serve replicas load. Versions are immutable, so the copy is
    made once per version (storage.local_copy) and hashed here on every call; an error names
    the source version, not the cache folder."""
    version = resolve(path)
    local = storage.local_copy(version, cache_root)
    try:
        return local, verify(os.fspath(local))
    except ArtifactError as err:
        raise ArtifactError(_from_copy(version, "", local, err)) from None


def fetch_subdir(path: str, rel: str, cache_root: str | os.PathLike) -> Path | None:
    """A verified local copy of one folder `rel` of the artefact at `path` (e.g. the test
    split of prepared data, for a Serve replica that needs nothing else); None when the
    manifest lists no file under it. Only that folder is copied and hashed."""
    version = resolve(path)
    entries = [e for e in _read_manifest(version, MANIFEST).files if e.path.startswith(rel + "/")]
    if not entries:
        return None
    local = storage.local_copy(storage.join(version, rel), cache_root)
    shifted = [dataclasses.replace(e, path=e.path[len(rel) + 1 :]) for e in entries]
    try:
        sizes = _listing(os.fspath(local))
        for entry in shifted:
            _check_size(os.fspath(local), entry, sizes.get(entry.path))
        _check_hashes(os.fspath(local), shifted)
    except ArtifactError as err:
        raise ArtifactError(_from_copy(version, f"{rel}/", local, err)) from None
    return local


def _from_copy(version: str, rel: str, local: Path, err: ArtifactError) -> str:
    """An error found in a local copy, named by the source version (and the copy, if not it)."""
    what = f"{version}: {rel}{str(err).removeprefix(f'{local}: ')}"
    return what if os.fspath(local) == version else f"{what} [in local copy {local}]"


def published(path: str) -> bool:
    """Whether `path` is an artefact a reader can resolve (a root with CURRENT, or a folder
    holding MANIFEST.json); it may still fail verification."""
    return storage.exists(storage.join(path, CURRENT)) or storage.exists(
        storage.join(path, MANIFEST)
    )


def versions(dest: str) -> list[str]:
    """The complete versions under an artefact root, oldest first."""
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in storage.listdir(dest)]
    return [
        storage.join(dest, n)
        for n in sorted(names)
        if _VERSION.match(n) and storage.exists(storage.join(dest, n, MANIFEST))
    ]


# --- building and switching ---------------------------------------------------------------


def _version_name() -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"v-{stamp}-{uuid.uuid4().hex[:8]}"


def _is_local(p: str) -> bool:
    return isinstance(storage.filesystem(p)[0], pafs.LocalFileSystem)


def _build_local(dest: str, name: str, fill, text: str, staging: str | None = None) -> str:
    """Fill a hidden sibling, add the manifest, check sizes, rename it to `dest/name`."""
    root = storage.local_path(dest)
    tmp = storage.local_path(staging) if staging else root / f".tmp-{name}"
    final = root / name
    try:
        root.mkdir(parents=True, exist_ok=True)
        if fill is not None:
            fill(tmp)
        (tmp / MANIFEST).write_text(text)
        _check_sizes_against(os.fspath(tmp), text)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.fspath(final) if not storage.is_uri(dest) else storage.join(dest, name)


def _upload_then_manifest(version: str, upload, text: str) -> None:
    """Object stores: every file first, then a size check, then MANIFEST.json last."""
    try:
        upload()
        _check_sizes_against(version, text)
        storage.write_text(storage.join(version, MANIFEST), text)
    except BaseException:
        with contextlib.suppress(storage.StorageError):
            storage.delete(version)  # best effort; without a manifest it is invisible anyway
        raise


def _switch(dest: str, name: str, keep: int | None) -> None:
    storage.write_text(storage.join(dest, CURRENT), name + "\n")  # atomic: rename / one PUT
    if keep is not None:
        _prune(dest, name, max(keep, 1))


def _prune(dest: str, current: str, keep: int) -> None:
    """Delete complete versions beyond the `keep` newest, and leftovers of killed publishes
    (hidden or manifest-less versions) older than the one just switched to."""
    complete = [v.rsplit("/", 1)[-1] for v in versions(dest)]
    kept = set(sorted(complete)[-keep:]) | {current}
    for child in storage.listdir(dest):
        base = child.rstrip("/").rsplit("/", 1)[-1]
        name = base.removeprefix(".tmp-")
        if _VERSION.match(name) and name < current and base not in kept:
            storage.delete(child)


# --- manifests and checks -----------------------------------------------------------------


def _manifest_text(
    directory: str,
    kind: str,
    producer: str,
    config: Any,
    parts: tuple[str, ...] = (),
    part: str | None = None,
) -> str:
    if kind not in KINDS:
        raise ArtifactError(f"{directory}: kind {kind!r}: expected one of {KINDS}")
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    sizes = {rel: size for rel, size in _listing(directory).items() if not _is_manifest_name(rel)}
    if not sizes:
        raise ArtifactError(f"{directory}: no files (nothing to publish)")
    digests = _hash_all(directory, sorted(sizes))
    files = [{"path": p, "size": sizes[p], "sha256": digests[p]} for p in sorted(sizes)]
    body = {
        "format": FORMAT,
        "kind": kind,
        "producer": producer,
        "config": dict(config or {}),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "content_id": content_id(FileEntry(**f) for f in files),
        "parts": list(parts),
        "part": part,
        "files": files,
    }
    return json.dumps(body, indent=2, sort_keys=True, default=str) + "\n"


def content_id(files) -> str:
    """sha256 over the sorted "path<TAB>size<TAB>sha256" lines: equal contents, equal id."""
    lines = sorted(f"{f.path}\t{f.size}\t{f.sha256}\n" for f in files)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _is_manifest_name(rel: str) -> bool:
    return "/" not in rel and (rel == MANIFEST or bool(re.match(r"^MANIFEST\.[^/]+\.json$", rel)))


def _read_manifest(version: str, name: str) -> Manifest:
    try:
        raw = json.loads(storage.read_text(storage.join(version, name)))
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT!r}")
        files = tuple(FileEntry(f["path"], int(f["size"]), f["sha256"]) for f in raw["files"])
        fields = ("kind", "producer", "config", "created_at", "content_id")
        return Manifest(version, *(raw[k] for k in fields), files, tuple(raw.get("parts", ())))
    except storage.StorageError:
        raise ArtifactError(f"{version}: {name}: missing (incomplete or unpublished)") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{version}: {name}: unreadable ({e!s:.200})") from e


def _listing(directory: str) -> dict[str, int]:
    """{relative path: size} of every file under `directory`, in one listing."""
    fs, base = storage.filesystem(directory)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except OSError as e:
        raise ArtifactError(f"{directory}: cannot list ({' '.join(str(e).split())})") from e
    return {i.path[len(base) :].lstrip("/"): i.size for i in infos if i.type == pafs.FileType.File}


def _check_size(version: str, entry: FileEntry, size: int | None) -> None:
    if size is None:
        raise ArtifactError(f"{version}: {entry.path}: missing")
    if size < entry.size:
        raise ArtifactError(
            f"{version}: {entry.path}: truncated ({size} bytes, manifest says {entry.size})"
        )
    if size > entry.size:
        raise ArtifactError(
            f"{version}: {entry.path}: altered ({size} bytes, manifest says {entry.size})"
        )


def _check_sizes_against(version: str, text: str) -> None:
    """After a copy: every file the manifest lists arrived whole (sizes, one listing)."""
    sizes = _listing(version)
    for f in json.loads(text)["files"]:
        _check_size(version, FileEntry(f["path"], f["size"], f["sha256"]), sizes.get(f["path"]))


def _check_hashes(version: str, files: list[FileEntry]) -> None:
    digests = _hash_all(version, [e.path for e in files])
    for entry in sorted(files, key=lambda e: e.path):
        if digests[entry.path] != entry.sha256:
            raise ArtifactError(
                f"{version}: {entry.path}: altered (sha256 {digests[entry.path][:12]}..., "
                f"manifest says {entry.sha256[:12]}...)"
            )


def _hash_all(directory: str, rels: list[str]) -> dict[str, str]:
    """sha256 of each file, in parallel (hashlib releases the GIL on large buffers)."""

    def one(rel: str) -> str:
        h = hashlib.sha256()
        with storage.open_input(storage.join(directory, rel)) as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()

    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        return dict(zip(rels, pool.map(one, rels), strict=True))


def main(argv: list[str] | None = None) -> int:
    """`python -m rec.artifacts PATH [--no-hashes]`: verify one artefact; exit 2 if bad."""
    args = sys.argv[1:] if argv is None else argv
    paths = [a for a in args if a != "--no-hashes"]
    if len(paths) != 1:
        print("usage: python -m rec.artifacts PATH [--no-hashes]", file=sys.stderr)
        return 2
    try:
        m = verify(paths[0], hashes="--no-hashes" not in args)
    except ValueError as err:  # ArtifactError, StorageError
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"ok {m.path}: {m.kind} by {m.producer}, {len(m.files)} files, id {m.content_id[:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
