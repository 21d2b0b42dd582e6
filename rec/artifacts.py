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
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from rec import storage
from rec.manifest import (
    MANIFEST,
    ArtifactError,
    Manifest,
    check_hashes,
    check_size,
    check_sizes_against,
    content_id,  # noqa: F401 (part of the artefact API: tests and users check ids with it)
    listing,
    manifest_text,
    read_manifest,
)

CURRENT = "CURRENT"
_VERSION = re.compile(r"^v-\d{8}T\d{12}Z-[0-9a-f]{8}$")
_PART = re.compile(r"^[A-Za-z0-9_-]+$")


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
    text = manifest_text(os.fspath(src), kind, producer, config)
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
    text = manifest_text(staging, kind, producer, config)
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
    text = manifest_text(os.fspath(directory), kind, producer, config, parts, part)
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
    sizes = listing(version)
    manifest = read_manifest(version, MANIFEST)
    files, own = list(manifest.files), {MANIFEST}
    for part in manifest.parts:
        name = f"MANIFEST.{part}.json"
        if name not in sizes:
            raise ArtifactError(f"{version}: {name}: missing (a part of this artefact)")
        files += read_manifest(version, name).files
        own.add(name)
    for entry in sorted(files, key=lambda e: e.path):
        check_size(version, entry, sizes.get(entry.path))
    if hashes:
        check_hashes(version, files)
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
    entries = [e for e in read_manifest(version, MANIFEST).files if e.path.startswith(rel + "/")]
    if not entries:
        return None
    local = storage.local_copy(storage.join(version, rel), cache_root)
    shifted = [dataclasses.replace(e, path=e.path[len(rel) + 1 :]) for e in entries]
    try:
        sizes = listing(os.fspath(local))
        for entry in shifted:
            check_size(os.fspath(local), entry, sizes.get(entry.path))
        check_hashes(os.fspath(local), shifted)
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
        check_sizes_against(os.fspath(tmp), text)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.fspath(final) if not storage.is_uri(dest) else storage.join(dest, name)


def _upload_then_manifest(version: str, upload, text: str) -> None:
    """Object stores: every file first, then a size check, then MANIFEST.json last."""
    try:
        upload()
        check_sizes_against(version, text)
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
