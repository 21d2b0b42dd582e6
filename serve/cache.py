"""Where a Serve replica reads its artefacts from: a node-local copy of each (no Ray here).

    export = local_dir("s3://bucket/runs/r1/model/export")   # /tmp/raydiv-cache/export-...
    export = local_dir("outputs/beauty/export")               # a local path: itself

`model_dir` and `policy_dir` may be local paths or URIs (s3://, gs://, abfs://; see
rec/storage.py). A replica copies what it needs once per node and content into CACHE_ROOT
(rec.storage.local_copy: copied into a temporary folder, renamed into place, so a partial
copy is never used; replicas on one node wait for one copy through a file lock), then loads
from there. An artefact published with rec.artifacts (a root holding CURRENT) is fetched as
its current version and verified against its manifest. Nothing reads a URI at request time.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from rec import artifacts, storage

# Per node (the temp dir of the machine the replica runs on), shared by its replicas.
CACHE_ROOT = Path(tempfile.gettempdir()) / "raydiv-cache"


def local_dir(path: str) -> Path:
    """A local directory holding the artefact at `path` (a local path or a URI)."""
    if storage.exists(storage.join(path, artifacts.CURRENT)):
        return artifacts.fetch_verified(path, CACHE_ROOT)[0]
    return storage.local_copy(path, CACHE_ROOT)


def test_split(model_dir: str) -> Path | None:
    """A local copy of the prepared test split beside the export (`<model_dir>/data/test`,
    or the current version's when data/ was published with rec.artifacts); None if absent."""
    data = storage.join(model_dir, "data")
    if storage.exists(storage.join(data, artifacts.CURRENT)):
        data = artifacts.resolve(data)
    test = storage.join(data, "test")
    return storage.local_copy(test, CACHE_ROOT) if storage.exists(test) else None
