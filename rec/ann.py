"""Approximate nearest-neighbour retrieval over the item table (faiss, inner product; no Ray).

    mode = resolve_retrieval("auto", n_items=4_162_024, min_items=200_000)  # -> "ann"
    index = build_index(table[1:].numpy())          # IVF-Flat over items 1..N (row 0 padding)
    write_index(index, export_dir)                  # <export>/ann.faiss, covered by MANIFEST
    index = read_index(export_dir)                  # faiss's own binary format, never pickle
    ids, _ = search(index, queries, n)              # (B, n) item indices 1..N, -1 = none

The Retriever (serve/engine.py `QueryTower.retrieve`) asks the index for more than n items,
adds the request's history (the learned repeat logit can lift a history item into the top n),
and rescores that candidate set exactly: approximate recall, exact scores. Below
`min_items` items the exact matmul over every item is fast enough and exact ("auto").

IVF-Flat: the items are clustered into `nlist` ~ 4 sqrt(N) k-means cells; a query scans the
`nprobe` cells whose centroids score highest. faiss-cpu is imported only here, lazily.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

INDEX_FILE = "ann.faiss"
RETRIEVAL_MODES = ("exact", "ann", "auto")
DEFAULT_MIN_ITEMS = 200_000  # serve.ann_min_items: "auto" uses the index from here up
_TRAIN_PER_CELL = 64  # k-means training vectors per cell (faiss warns below 39)


def resolve_retrieval(mode: str, n_items: int, min_items: int = DEFAULT_MIN_ITEMS) -> str:
    """serve.retrieval -> "exact" or "ann"; "auto" is "ann" from `min_items` items up."""
    if mode not in RETRIEVAL_MODES:
        raise ValueError(f"serve.retrieval must be one of {RETRIEVAL_MODES}, got {mode!r}")
    if mode == "auto":
        return "ann" if n_items >= min_items else "exact"
    return mode


def default_nlist(n_items: int) -> int:
    """IVF cells: ~4 sqrt(N) (faiss's guideline), at least 1, at most N / 39 (training)."""
    return max(1, min(int(4 * math.sqrt(n_items)), n_items // 39))


def default_nprobe(nlist: int) -> int:
    """Cells scanned per query: 1/8 of them (at least 8). On category-clustered vectors
    (tests/test_scale_paths.py, bench/scale.py) 1/16 gave recall@100 0.85 on 6k items in 60
    clusters, 1/8 gave 0.975; a trained table is measured in bench/scale.py."""
    return min(nlist, max(8, nlist // 8))


def build_index(
    vectors: np.ndarray, nlist: int | None = None, nprobe: int | None = None, seed: int = 0
):
    """(N, D) float item vectors for items 1..N (row i is item i + 1) -> a trained IVF-Flat
    inner-product index holding all N, with nprobe set (it is saved with the index)."""
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)  # (N, D)
    n, d = x.shape
    nlist = nlist or default_nlist(n)
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    n_train = min(n, nlist * _TRAIN_PER_CELL)
    sample = np.random.default_rng(seed).choice(n, n_train, replace=False)
    index.cp.seed = seed  # k-means initialisation: the same index for the same vectors
    index.train(x[np.sort(sample)])
    index.add(x)
    index.nprobe = nprobe or default_nprobe(nlist)
    return index


def search(index, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, D) queries -> ((B, n) int64 item indices 1..N or -1 where fewer were found,
    (B, n) float32 inner products), best first."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    scores, ids = index.search(q, n)
    return np.where(ids >= 0, ids + 1, -1), scores


def write_index(index, export_dir: str | Path) -> Path:
    """Write the index into an export directory (before it is published: the MANIFEST then
    lists it with its sha256, and fetch_verified checks it like the weights)."""
    import faiss

    path = Path(export_dir) / INDEX_FILE
    faiss.write_index(index, str(path))
    return path


def read_index(export_dir: str | Path):
    """The export's index (faiss's binary format: no pickle); None when it has none."""
    import faiss

    path = Path(export_dir) / INDEX_FILE
    return faiss.read_index(str(path)) if path.is_file() else None


def add_to_export(export_dir: str | Path, mode: str, min_items: int = DEFAULT_MIN_ITEMS) -> bool:
    """At export time: build and write the index when `mode` resolves to "ann" for this
    export's catalogue; True if written. Small catalogues cost one JSON read."""
    from rec.export import load_export, read_export_config

    _, dims, _ = read_export_config(export_dir)
    if resolve_retrieval(mode, dims.n_items, min_items) != "ann":
        return False
    table = load_export(export_dir).item_table()  # (N + 1, D)
    write_index(build_index(table[1:].numpy()), export_dir)
    return True


def index_for_serving(export_dir: str | Path, mode: str, min_items: int, model):
    """The index the Retriever uses, or None for exact retrieval. An export published without
    one (exact at export time) gets it built in memory, once per replica."""
    if resolve_retrieval(mode, model.dims.n_items, min_items) != "ann":
        return None
    index = read_index(export_dir)
    if index is None:
        print(f"[serve] {export_dir}: no {INDEX_FILE}; building the ANN index in memory")
        index = build_index(model.item_table()[1:].numpy())
    return index
