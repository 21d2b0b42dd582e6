"""The Ray pipeline behind `jobs.prepare`: raw logs -> per-user sequences, split and sharded.

Stages (each a set of Ray tasks, one per read chunk or user bucket, that read and write their
own files; the driver only sees small summaries):

  1. ingest     read chunks in parallel, validate rows (bad ones to quarantine/ with their
                reason), hash-partition valid events by user into _staging/bucket=N/
  2. clean      per bucket: dedupe, sort by time, drop users too short to split; partial
                item counts are written split by a hash of the item and merged per item part
                on workers; the driver gets one row per item and builds the vocabularies
  3. k-core     optional: repeated passes over the buckets until users and items are stable
  4. sequences  per bucket: vocabulary indices, per-user lists, leave-last-out views written
                to train/ valid/ test/

Per-user work runs with polars inside each task: a generic Ray Data groupby by user is ~30x
slower here (see STACK.md), and a user never spans two buckets. `data.path` and the output
directory may be local paths or URIs (s3://...; rec/storage.py): every file, the work files
_staging/ _clean/ _errors/ included, goes through storage, so on a multi-node cluster tasks on
any node read what tasks on other nodes wrote when the output is on object storage.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import polars as pl
import pyarrow as pa
import ray

from rec import artifacts, storage
from rec.data import outputs, readers, sequences
from rec.data.config import DataConfig
from rec.data.textio import DataError, file_size

BUCKET_BYTES = 64 << 20  # raw input bytes per user bucket, roughly
ITEM_STATS_SCHEMA = {"item_id": pl.Int64, "count": pl.Int64, "category_ids": pl.List(pl.Int64)}
BUCKETS_PER_ITEM_PART = 8  # item-stat merge tasks: one per this many user buckets
MIN_BUCKETS = 8  # tasks per stage on small inputs, whatever the cluster's size


def prepare(cfg: DataConfig, output_dir: str | Path) -> dict:
    """Run the pipeline into a new version of the artefact root `output_dir` (rec/artifacts.py:
    built in a staging folder, sealed with MANIFEST.json, then CURRENT switches to it); return
    the stats written to stats.json. A failed run leaves the current version as it was."""
    t0 = time.perf_counter()
    root = storage.absolute(output_dir)
    if cfg.path:
        storage.check(cfg.path)
    storage.makedirs(root)
    staging = artifacts.begin(root)
    try:
        stats = _run(cfg, root, staging)
    except BaseException:
        with contextlib.suppress(storage.StorageError):
            storage.delete(staging)  # best effort: without a manifest it is never read
        raise
    version = artifacts.commit(staging, kind="prepared", producer="jobs.prepare", config=cfg)
    _log(f"published {version} in {time.perf_counter() - t0:.1f} s")
    return stats


def _run(cfg: DataConfig, root: str, out: str) -> dict:
    """The stages, writing under the staging folder `out` (synthetic raw logs under `root`)."""
    try:
        fmt = readers.get_format(cfg.format)
        if fmt.generate is not None:
            cfg = _generate(cfg, root, fmt.generate)
        plan = readers.plan(cfg)
        n_buckets = cfg.num_buckets or _auto_buckets(plan)
        _log(
            f"{len(plan.chunks)} read chunks from {len(plan.files)} file(s), {n_buckets} user buckets"
        )
        with _stage("ingest"):
            _ingest(plan, cfg, out, n_buckets)
        staged = storage.listdir(storage.join(out, "_staging"))
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in staged]
        buckets = sorted(int(n.split("=")[1]) for n in names if n.startswith("bucket="))
        if not buckets:
            counts = outputs.quarantine_counts(out)
            raise DataError(f"{cfg.path}: no valid events; quarantined rows by reason: {counts}")
        with _stage("clean + item counts"):
            stats, clean_info = _clean(buckets, cfg, out)
        if cfg.kcore:
            with _stage("k-core"):
                stats = _kcore(buckets, stats, cfg, out)
        with _stage("vocabulary"):
            items, cats = sequences.build_vocab(stats)
            outputs.write_vocab(out, items, cats)
            _log(f"vocabulary: {items.height} items, {cats.height} categories")
        del stats, items, cats  # the driver keeps nothing per item through the last stage
        with _stage("sequences"):
            _sequences(buckets, cfg, out)
    except Exception as err:
        cause = _data_error(err)
        if cause is not None:
            raise cause from None
        raise
    rows_valid = clean_info.pop("rows_in")
    return outputs.finish(out, cfg, rows_valid, clean_info)


def _ingest(plan: readers.Plan, cfg: DataConfig, out: str, n_buckets: int) -> None:
    kwargs = {"plan": plan, "cfg": cfg, "out": out, "n_buckets": n_buckets}
    _tasks(_ingest_chunk, [c.index for c in plan.chunks], kwargs)
    errors = storage.glob(storage.join(out, "_errors"), "*.txt")
    if errors:
        raise DataError(storage.read_text(errors[0]))


def _ingest_chunk(index: int, plan: readers.Plan, cfg: DataConfig, out: str, n_buckets: int):
    """One chunk: write its valid events to _staging/bucket=N/chunk-<index>.parquet (the task
    writes them itself: no events pass through the object store) and its quarantined rows."""
    chunk = plan.chunks[index]
    good, bad = [], []
    try:
        for events, quarantine in readers.read_chunk(chunk, cfg, plan.files):
            if quarantine.num_rows:
                bad.append(quarantine)
            if events.num_rows:
                good.append(events)
    except DataError as err:
        # Reported by the driver as one clear message, rather than as a task traceback.
        storage.write_text(storage.join(out, "_errors", f"chunk-{chunk.index:05d}.txt"), str(err))
        return
    if good:
        events = pl.from_arrow(pa.concat_tables(good)).with_columns(
            sequences.bucket_expr(n_buckets)
        )
        for (b,), part in events.partition_by("bucket", as_dict=True, include_key=False).items():
            name = f"chunk-{chunk.index:05d}.parquet"
            _write_work(part, storage.join(out, "_staging", f"bucket={b}", name))
    if bad:
        part = storage.join(out, "quarantine", f"part-{chunk.index:05d}.parquet")
        storage.write_parquet(pl.from_arrow(pa.concat_tables(bad)), part)


def _clean(buckets: list[int], cfg: DataConfig, out: str) -> tuple[pl.DataFrame, dict]:
    stats = _item_stats(buckets, _clean_bucket, {"cfg": cfg}, out, "clean")
    info: dict[str, int] = {}
    for b in buckets:
        text = storage.read_text(storage.join(out, "_clean", f"bucket-{b:05d}.json"))
        for key, value in json.loads(text).items():
            info[key] = info.get(key, 0) + value
    return stats, info


def _item_stats(buckets: list[int], per_bucket, kwargs: dict, out: str, tag: str) -> pl.DataFrame:
    """Item stats over all buckets, sorted by item_id: each bucket task's partial counts
    (`per_bucket(bucket, out=..., **kwargs)` -> item_id, count, category_ids) are written split
    into item parts by a hash of the item, and one task per part merges them. The driver
    only receives the merged rows, one per item: at 100M events the partials are ~10x the
    catalogue and merging them on the driver took it past 2 GB (bench/README.md, Scale)."""
    n_parts = max(1, math.ceil(len(buckets) / BUCKETS_PER_ITEM_PART))
    write = {"per_bucket": per_bucket, "kwargs": kwargs, "out": out, "tag": tag, "n_parts": n_parts}
    _tasks(_write_item_parts, buckets, write)
    merged = _tasks(_merge_item_part, list(range(n_parts)), {"out": out, "tag": tag})
    frames = [frame for frame in merged if frame is not None]
    if not frames:  # no user long enough anywhere: an empty vocabulary
        return pl.DataFrame(schema={**ITEM_STATS_SCHEMA, "bucket": pl.Int32})
    return pl.concat(frames).sort("item_id")


def _write_item_parts(bucket: int, per_bucket, kwargs: dict, out: str, tag: str, n_parts: int):
    stats = per_bucket(bucket, out=out, **kwargs).with_columns(
        pl.lit(bucket, pl.Int32).alias("bucket"),
        (pl.col("item_id").hash(seed=29) % n_parts).cast(pl.Int32).alias("part"),
    )
    for (part,), frame in stats.partition_by("part", as_dict=True, include_key=False).items():
        path = storage.join(out, "_items", tag, f"part-{part:04d}", f"bucket-{bucket:05d}.parquet")
        _write_work(frame, path)


def _merge_item_part(part: int, out: str, tag: str) -> pl.DataFrame | None:
    folder = storage.join(out, "_items", tag, f"part-{part:04d}")
    if not storage.exists(folder):  # no bucket had an item hashing here (tiny inputs)
        return None
    return _merge([_read_work(folder)])


def _merge(frames: list[pl.DataFrame]) -> pl.DataFrame:
    """Sum partial item counts; an item's categories come from its lowest bucket (determinism)."""
    return (
        pl.concat(frames)
        .group_by("item_id")
        .agg(
            pl.col("count").sum(),
            pl.col("category_ids").sort_by("bucket").first(),
            pl.col("bucket").min(),
        )
    )


def _clean_bucket(bucket: int, cfg: DataConfig, out: str) -> pl.DataFrame:
    events = _read_work(storage.join(out, "_staging", f"bucket={bucket}"))
    events, info = sequences.clean_bucket(events, cfg.dedupe, cfg.min_user_events)
    _write_work(events, storage.join(out, "_clean", f"bucket-{bucket:05d}.parquet"))
    storage.write_text(storage.join(out, "_clean", f"bucket-{bucket:05d}.json"), json.dumps(info))
    return sequences.item_stats(events)


def _kcore(buckets: list[int], stats: pl.DataFrame, cfg: DataConfig, out: str) -> pl.DataFrame:
    k = cfg.kcore
    items = stats.filter(pl.col("count") >= k)
    for it in range(100):
        path = storage.join(out, "_clean", f"kcore-items-{it}.parquet")
        storage.write_parquet(items.select("item_id"), path)
        kwargs = {"cfg": cfg, "items_path": path}
        counts = _item_stats(buckets, _kcore_bucket, kwargs, out, f"kcore-{it}")
        new = counts.filter(pl.col("count") >= k)
        _log(f"k-core pass {it + 1}: {new.height} items (k={k})")
        if new.height == items.height and new.height == counts.height:
            return new.drop("bucket")
        items = new
    raise RuntimeError(f"k-core filtering did not converge in 100 passes (k={k})")


def _kcore_bucket(bucket: int, cfg: DataConfig, out: str, items_path: str) -> pl.DataFrame:
    events = _read_work(storage.join(out, "_clean", f"bucket-{bucket:05d}.parquet"))
    items = storage.read_parquet(items_path)
    return sequences.kcore_counts(events, items, cfg.kcore, cfg.min_user_events)


def _sequences(buckets: list[int], cfg: DataConfig, out: str) -> None:
    """Each bucket task writes its users' rows (sorted by user_id) to <split>/part-<bucket>:
    the files and their row order depend on the input and num_buckets only, never on how
    many CPUs or blocks ran them (deterministic data, checked by the manifest's content_id)."""
    _tasks(_bucket_sequences, buckets, {"cfg": cfg, "out": out})


def _bucket_sequences(bucket: int, cfg: DataConfig, out: str) -> None:
    events = _read_work(storage.join(out, "_clean", f"bucket-{bucket:05d}.parquet"))
    item_index = storage.read_parquet(
        storage.join(out, "vocab", "items.parquet"), columns=["item_id", "item_idx"]
    )
    seqs = sequences.build_sequences(events, item_index, cfg.max_len, cfg.min_events())
    for split, view in sequences.split_views(seqs.sort("user_id"), cfg.max_len).items():
        if view.height:
            storage.write_parquet(view, storage.join(out, split, f"part-{bucket:05d}.parquet"))


def _tasks(fn, keys: list[int], kwargs: dict) -> list:
    """fn(key, **kwargs) as one Ray task per key (1 CPU each; Ray runs as many at once as there
    are CPUs); their results in the order of `keys`. Plain tasks rather than Ray Data: each
    stage is a fixed list of independent tasks that read and write files themselves, and
    Ray Data cost ~3 s per worker process to import and ~0.1-1 s per stage to plan here
    (bench/README.md, prepare)."""
    shared = ray.put(kwargs)  # plan and config: stored once, not once per task
    return ray.get([_task.remote(fn, key, shared) for key in keys])


@ray.remote(num_cpus=1)
def _task(fn, key: int, kwargs: dict):
    return fn(key, **kwargs)


def _write_work(frame: pl.DataFrame, path: str) -> None:
    """A work file (_staging, _clean, _items: read once or twice by later tasks, then deleted)
    with polars' own writer, uncompressed: every event is written and read back twice, and the
    default (pyarrow, snappy) made that ~4x the cost of the sorts between (bench/README.md)."""
    with storage.open_output(path) as f:
        frame.write_parquet(f, compression="uncompressed")


def _read_work(path: str) -> pl.DataFrame:
    """A work file, or every work file in a folder (the folder's order: callers sort)."""
    if storage.is_uri(path):
        return storage.read_parquet(path)
    files = sorted(Path(path).glob("*.parquet")) if Path(path).is_dir() else [path]
    return pl.read_parquet(files, hive_partitioning=False)


def _generate(cfg: DataConfig, root: str, generate) -> DataConfig:
    """Generate the format's raw log (in a Ray task, so it runs on a worker) unless it is there
    (a marker holds the generator settings it was made with)."""
    raw = storage.absolute(cfg.path) if cfg.path else storage.join(root, "raw")
    marker = storage.join(raw, "_synthetic.json")
    wanted = json.dumps(vars(cfg.synthetic), sort_keys=True)
    if not (storage.exists(marker) and storage.read_text(marker) == wanted):
        _log(f"generating synthetic log into {raw}")
        ray.get(ray.remote(_generate_task).remote(generate, cfg.synthetic, raw))
        storage.write_text(marker, wanted)
    return replace(cfg, path=raw)


def _generate_task(generate, synthetic, raw: str) -> None:
    """The generator writes local files: into `raw`, or a temp dir then uploaded to `raw`."""
    storage.delete(raw)
    if not storage.is_uri(raw):
        generate(synthetic, raw)
        return
    with tempfile.TemporaryDirectory() as tmp:
        generate(synthetic, tmp)
        storage.upload_dir(tmp, raw)


def _auto_buckets(plan: readers.Plan) -> int:
    """From the input's size only: the bucket count decides the output's files (and which
    bucket's first event gives an item its categories), so it must not follow the CPUs."""
    size = sum(file_size(f) or 0 for f in plan.files)
    return max(MIN_BUCKETS, min(1024, math.ceil(size / BUCKET_BYTES)))


def _data_error(err: BaseException) -> DataError | None:
    """Find a DataError raised inside a Ray task under the wrappers Ray puts around it."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if type(err) is DataError:  # the original, not Ray's wrapper class around it
            return err
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def _stage(name: str):
    """Log a stage's seconds and the driver's peak RSS so far (where time and memory go)."""
    t0 = time.perf_counter()
    yield
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    _log(f"{name}: {time.perf_counter() - t0:.1f} s (driver peak RSS {peak} MB)")


def _log(msg: str) -> None:
    print(f"[prepare] {msg}", flush=True)
