"""Where a Serve replica reads its artefacts from: a verified node-local copy of each (no Ray).

    export = local_dir("s3://bucket/runs/r1/model/export")   # /tmp/raydiv-cache/v-...
    export = local_dir("outputs/beauty/export")               # a local version: read in place
    recheck()                                                 # in check_health: still whole?

`model_dir` and `policy_dir` may be local paths or URIs (s3://, gs://, abfs://; see
rec/storage.py). Every artefact is one published with rec.artifacts (a root holding CURRENT,
or a folder holding MANIFEST.json): a replica resolves the current version, copies it once per
node and version into CACHE_ROOT (rec.storage.local_copy: copied into a temporary folder,
renamed into place, replicas on one node wait for one copy through a file lock) and checks
every file's sha256 before loading. A missing, truncated or altered file, or an unpublished
folder, raises ArtifactError (one line naming the file) in the replica's __init__: the replica
never becomes healthy and takes no traffic. Nothing reads a URI at request time.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from rec import artifacts, storage

# Per node (the temp dir of the machine the replica runs on), shared by its replicas.
CACHE_ROOT = Path(tempfile.gettempdir()) / "raydiv-cache"

# The local copies this process verified (hashes) and loaded from: what `recheck` re-checks.
_VERIFIED: dict[str, Path] = {}


def local_dir(path: str) -> Path:
    """A verified local directory holding the current version of the artefact at `path`."""
    local, _ = artifacts.fetch_verified(path, CACHE_ROOT)
    _VERIFIED[str(local)] = local
    return local


def test_split(model_dir: str) -> Path | None:
    """A verified local copy of the prepared test split beside the export (`test/` of
    `<model_dir>/data`'s current version; only that folder is copied); None without data/."""
    data = storage.join(model_dir, "data")
    if not storage.exists(data):
        return None
    return artifacts.fetch_subdir(data, "test", CACHE_ROOT)


def recheck() -> None:
    """Presence and sizes (one listing each, no hashing) of every artefact copy this process
    loaded from: for a replica's health check, so a copy truncated or deleted after __init__
    marks the replica unhealthy (Serve replaces it; the new replica verifies with hashes)."""
    for local in _VERIFIED.values():
        artifacts.verify(str(local), hashes=False)
