"""Artefact manifests: what a version of an artefact holds (`MANIFEST.json`), written and
checked file by file (sizes from one listing, sha256 in parallel). `rec.artifacts` publishes,
resolves and verifies versions with these; see its docstring for the layout. No Ray import.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow.fs as pafs

from rec import storage

FORMAT = "raydiv-artifact/v1"
MANIFEST = "MANIFEST.json"
KINDS = ("export", "checkpoint", "prepared", "policy")
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


# --- writing and checking manifests -----------------------------------------------------------------


def manifest_text(
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
    sizes = {rel: size for rel, size in listing(directory).items() if not is_manifest_name(rel)}
    if not sizes:
        raise ArtifactError(f"{directory}: no files (nothing to publish)")
    digests = hash_all(directory, sorted(sizes))
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


def is_manifest_name(rel: str) -> bool:
    return "/" not in rel and (rel == MANIFEST or bool(re.match(r"^MANIFEST\.[^/]+\.json$", rel)))


def read_manifest(version: str, name: str) -> Manifest:
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


def listing(directory: str) -> dict[str, int]:
    """{relative path: size} of every file under `directory`, in one listing."""
    fs, base = storage.filesystem(directory)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except OSError as e:
        raise ArtifactError(f"{directory}: cannot list ({' '.join(str(e).split())})") from e
    return {i.path[len(base) :].lstrip("/"): i.size for i in infos if i.type == pafs.FileType.File}


def check_size(version: str, entry: FileEntry, size: int | None) -> None:
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


def check_sizes_against(version: str, text: str) -> None:
    """After a copy: every file the manifest lists arrived whole (sizes, one listing)."""
    sizes = listing(version)
    for f in json.loads(text)["files"]:
        check_size(version, FileEntry(f["path"], f["size"], f["sha256"]), sizes.get(f["path"]))


def check_hashes(version: str, files: list[FileEntry]) -> None:
    digests = hash_all(version, [e.path for e in files])
    for entry in sorted(files, key=lambda e: e.path):
        if digests[entry.path] != entry.sha256:
            raise ArtifactError(
                f"{version}: {entry.path}: altered (sha256 {digests[entry.path][:12]}..., "
                f"manifest says {entry.sha256[:12]}...)"
            )


def hash_all(directory: str, rels: list[str]) -> dict[str, str]:
    """sha256 of each file, in parallel (hashlib releases the GIL on large buffers)."""

    def one(rel: str) -> str:
        h = hashlib.sha256()
        with storage.open_input(storage.join(directory, rel)) as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()

    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        return dict(zip(rels, pool.map(one, rels), strict=True))
