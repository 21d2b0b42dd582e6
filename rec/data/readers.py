"""Readers: raw logs in each source format -> canonical events + quarantined rows.

`plan(cfg)` probes the sources on the driver (fails fast, with one clear message, on a file
that cannot be read at all) and cuts them into chunks; `read_chunk(chunk, cfg)` yields
(events, quarantine) pairs of Arrow tables for one chunk and runs inside a Ray task. Both are
plain Python: the Ray layer only distributes them.

Each format is one `Format` (name, plan, read, request_behavior, ...) registered in `FORMATS`
at the bottom of this file; a new format is one more `register(Format(...))` with its two
functions. The formats registered here:

| data.format | data.path                                 | what is read                              |
|-------------|-------------------------------------------|-------------------------------------------|
| taobao      | CSV file or directory (gz or plain)       | user_id,item_id,category_id,behavior,ts   |
| amazon      | `<name>.txt[.gz]` (S3-Rec sequences)      | + `<name>_item2attributes.json[.gz]`      |
| movielens   | ml-100k directory or `ml-100k.tar.gz`     | `u.data` ratings + `u.item` genres        |
| parquet     | file or directory of canonical parquet    | EVENT_SCHEMA columns (or Taobao's names)  |
| synthetic   | generated parquet (Taobao column names)   | see rec/data/synthetic.py                 |
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from rec import storage
from rec.data.config import DataConfig
from rec.data.parse import (
    TAOBAO_BEHAVIORS,
    lines_frame,
    parse_amazon,
    parse_csv_block,
    parse_delimited,
    split_valid,
    validate_events,
)
from rec.data.schema import BEHAVIOR_TOKENS, BEHAVIORS
from rec.data.synthetic import SyntheticConfig, generate
from rec.data.textio import (
    Chunk,
    DataError,
    check_file,
    file_size,
    head_lines,
    is_gzip,
    iter_blocks,
    open_arrow,
    open_file,
)
from rec.data.textio import plan_text_chunks as _plan_text

FILE_SHIFT = 44  # seq_no = file index << 44 | offset: global read order across files

PlanFn = Callable[[DataConfig], tuple[list[Chunk], list[Path | str]]]
ReadFn = Callable[[Chunk, DataConfig, int], Iterator[tuple[pa.Table, pa.Table]]]


@dataclass(frozen=True)
class Format:
    """One source format (`data.format`): everything prepare and serving need to know of it.

    Add a format by writing one `Format` (with its two functions) and passing it to `register`.
    """

    name: str  # the `data.format` value
    # Driver side, cheap: probe cfg.path (fail fast, one clear DataError) -> (chunks, files).
    plan: PlanFn
    # Inside a read task: (chunk, cfg, file_base) -> (events, quarantine) Arrow tables, block by
    # block; file_base = the file's index << FILE_SHIFT, added to row offsets as seq_no.
    read: ReadFn
    # The behavior token name (rec.data.schema.BEHAVIOR_TOKENS) serving gives request-history
    # events, which carry item ids only: the format's plain interaction. Written to meta.json.
    request_behavior: str
    timestamp_kind: str = "unix"  # "unix" seconds, or "position" where the source has only order
    # Writes the raw log (SyntheticConfig, directory) when cfg.path holds none yet; None: read.
    generate: Callable[[SyntheticConfig, str | Path], None] | None = None


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    """Add `fmt` to FORMATS (its name becomes a valid `data.format`)."""
    if fmt.name in FORMATS:
        raise ValueError(f"data format {fmt.name!r} is already registered")
    if fmt.request_behavior not in BEHAVIOR_TOKENS:
        raise ValueError(
            f"format {fmt.name!r}: request_behavior={fmt.request_behavior!r} is not one of "
            f"{sorted(BEHAVIOR_TOKENS)}"
        )
    if fmt.timestamp_kind not in ("unix", "position"):
        raise ValueError(f"format {fmt.name!r}: timestamp_kind must be unix|position")
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    """The registered format called `name`; a DataError naming the known ones otherwise."""
    if name not in FORMATS:
        raise DataError(f"data.format {name!r} is not one of {', '.join(FORMATS)}")
    return FORMATS[name]


@dataclass(frozen=True)
class Plan:
    """Chunks to read and the files they come from (a chunk's index in `files` orders rows)."""

    chunks: list[Chunk]
    files: list[str]


def plan(cfg: DataConfig) -> Plan:
    """Probe `cfg.path` for `cfg.format` and cut it into read chunks (driver side, cheap)."""
    fmt = get_format(cfg.format)
    chunks, files = fmt.plan(cfg)
    return Plan(chunks, [str(f) for f in files])


def read_chunk(
    chunk: Chunk, cfg: DataConfig, files: list[str]
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Yield (events, quarantine) Arrow tables for one chunk, block by block."""
    file_base = files.index(chunk.path) << FILE_SHIFT
    yield from get_format(cfg.format).read(chunk, cfg, file_base)


# ----------------------------------------------------------------------------- taobao


def _plan_taobao(cfg: DataConfig) -> tuple[list[Chunk], list[Path | str]]:
    files = _list_files(cfg.path, (".csv", ".csv.gz", ".txt", ".gz"))
    for f in files:
        _probe_delimited(f, ",", 5, "user_id,item_id,category_id,behavior_type,timestamp")
    return _chunks_for(files, cfg.chunk_mb << 20), files


def _read_taobao(chunk: Chunk, cfg: DataConfig, file_base: int):
    """Each block through polars' CSV reader; a block with any bad row again through the line
    parser, which quarantines each bad row with its reason and text (same valid rows)."""
    for offset, data in iter_blocks(chunk):
        fast = parse_csv_block(data, offset, ",", _TAOBAO_COLUMNS)
        if fast is not None:
            events, bad = _taobao_rows(fast, cfg, chunk.path, file_base)
            if not bad.num_rows:
                yield events, bad
                continue
        parsed = parse_delimited(lines_frame(data, offset, "utf-8"), ",", _TAOBAO_COLUMNS)
        yield _taobao_rows(parsed, cfg, chunk.path, file_base)


_TAOBAO_COLUMNS = ["user_id", "item_id", "category_id", "behavior", "timestamp"]


def _taobao_rows(parsed: pl.DataFrame, cfg: DataConfig, path: str, file_base: int):
    lo, hi = cfg.window()
    parsed = parsed.with_columns(
        pl.concat_list(pl.col("category_id")).alias("category_ids"),
        pl.lit(None, pl.Float32).alias("value"),
    )
    return split_valid(validate_events(parsed, TAOBAO_BEHAVIORS, lo, hi), path, file_base)


# ----------------------------------------------------------------------------- amazon


def _plan_amazon(cfg: DataConfig) -> tuple[list[Chunk], list[Path | str]]:
    seq = check_file(cfg.path)
    attributes_path(seq)  # must exist beside it
    if not any(len(line.split()) >= 2 for line in head_lines(seq)):
        raise DataError(f"{seq}: no line of the form 'user item item ...' (S3-Rec format)")
    return _chunks_for([seq], cfg.chunk_mb << 20), [seq]


def _read_amazon(chunk: Chunk, cfg: DataConfig, file_base: int):
    item_attrs = _load_attributes(attributes_path(chunk.path))
    for offset, data in iter_blocks(chunk):
        parsed = parse_amazon(lines_frame(data, offset, "utf-8"), item_attrs)
        yield split_valid(parsed, chunk.path, file_base)


def attributes_path(seq_path: str | Path) -> str | Path:
    """`Beauty.txt.gz` -> the `Beauty_item2attributes.json[.gz]` beside it."""
    text = str(seq_path)
    parent, base = text.rsplit("/", 1) if "/" in text else ("", text)
    name = base.split(".")[0]
    for suffix in (".json", ".json.gz"):
        cand = (
            f"{parent}/{name}_item2attributes{suffix}"
            if parent
            else f"{name}_item2attributes{suffix}"
        )
        if _is_file(cand):
            return cand if storage.is_uri(cand) else Path(cand)
    raise DataError(
        f"{seq_path}: attributes file {name}_item2attributes.json[.gz] not found beside it"
    )


def _is_file(path: str) -> bool:
    try:
        return bool(file_size(path) is not None)
    except DataError:
        return False


def _load_attributes(path: str | Path) -> pl.DataFrame:
    try:
        with open_file(path) as f:
            data = f.read()
        raw = json.loads(gzip.decompress(data) if is_gzip(path) else data)
    except (OSError, EOFError, ValueError) as err:
        raise DataError(f"{path}: cannot read item attributes ({err})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object item -> [attribute ids]")
    try:
        items = [int(k) for k in raw]
        attrs = [[int(a) for a in v] for v in raw.values()]
    except (TypeError, ValueError) as err:
        raise DataError(f"{path}: item and attribute ids must be integers ({err})") from None
    return pl.DataFrame(
        {"item_id": items, "category_ids": attrs},
        schema={"item_id": pl.Int64, "category_ids": pl.List(pl.Int64)},
    )


def _movielens_members(path: str | Path) -> tuple[bytes, bytes]:
    """(u.data, u.item) bytes from an ml-100k directory or its tarball."""
    if file_size(path) is None:
        for root in (str(path), storage.join(path, "ml-100k")):
            data, item = storage.join(root, "u.data"), storage.join(root, "u.item")
            if _is_file(data) and _is_file(item):
                return storage.read_bytes(data), storage.read_bytes(item)
        raise DataError(f"{path}: no u.data and u.item in this directory")
    check_file(path)
    try:
        with open_file(path) as raw, tarfile.open(fileobj=raw) as tar:
            found = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            if "u.data" not in found or "u.item" not in found:
                raise DataError(f"{path}: tarball has no u.data and u.item")
            return tar.extractfile(found["u.data"]).read(), tar.extractfile(found["u.item"]).read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(f"{path}: cannot read the MovieLens tarball ({err})") from None


def _plan_movielens(cfg: DataConfig) -> tuple[list[Chunk], list[Path | str]]:
    data, _ = _movielens_members(cfg.path)
    if not any(len(line.split("\t")) == 4 for line in data.decode("latin-1").splitlines()[:200]):
        raise DataError(f"{cfg.path}: u.data has no 'user<TAB>item<TAB>rating<TAB>ts' lines")
    return [Chunk(str(cfg.path), 0)], [str(cfg.path)]  # chunk.path must equal files[i]


def _read_movielens(chunk: Chunk, cfg: DataConfig, file_base: int):
    """The whole (small) log is one chunk."""
    path, (lo, hi) = chunk.path, cfg.window()
    data, item_bytes = _movielens_members(path)
    genres = pl.read_csv(
        io.BytesIO(item_bytes),
        separator="|",
        has_header=False,
        encoding="utf8-lossy",
        quote_char=None,
    )
    flags = genres.select(genres.columns[-19:]).to_numpy()
    movie_genres = pl.DataFrame(
        {
            "item_id": genres[:, 0].cast(pl.Int64),
            "category_ids": [list(row.nonzero()[0]) for row in flags],
        },
        schema={"item_id": pl.Int64, "category_ids": pl.List(pl.Int64)},
    )
    lines = lines_frame(data, 0, "latin-1")
    parsed = parse_delimited(lines, "\t", ["user_id", "item_id", "value", "timestamp"])
    parsed = parsed.with_columns(pl.lit("rating").alias("behavior")).join(
        movie_genres, on="item_id", how="left"
    )
    parsed = validate_events(parsed, ("rating",), lo, hi)
    yield split_valid(parsed, path, file_base)


# ----------------------------------------------------------------------------- parquet


def _plan_parquet(cfg: DataConfig) -> tuple[list[Chunk], list[Path | str]]:
    files = _list_files(cfg.path, (".parquet",))
    chunks = []
    for f in files:
        n_groups = _parquet_groups(f)
        chunks += [Chunk(str(f), len(chunks) + g, g, g + 1) for g in range(n_groups)]
    return chunks, files


def _read_parquet(chunk: Chunk, cfg: DataConfig, file_base: int):
    """One row group per chunk."""
    with open_arrow(chunk.path) as f:
        pf = pq.ParquetFile(f)
        row_base = sum(pf.metadata.row_group(g).num_rows for g in range(chunk.start))
        table = pf.read_row_group(chunk.start)
    yield _parquet_rows(table, chunk.path, row_base, file_base, *cfg.window())


def _parquet_rows(
    table: pa.Table, path: str, row_base: int, file_base: int, lo: int | None, hi: int | None
) -> tuple[pa.Table, pa.Table]:
    df = pl.from_arrow(table).rename(
        {"category_id": "category_ids", "behavior_type": "behavior"}, strict=False
    )
    missing = [
        c
        for c in ("user_id", "item_id", "category_ids", "behavior", "timestamp")
        if c not in df.columns
    ]
    if missing:
        raise DataError(f"{path}: parquet lacks the columns {missing} (canonical schema)")
    if df.schema["category_ids"] != pl.List(pl.Int64):
        df = df.with_columns(
            pl.concat_list(pl.col("category_ids"))
            .list.eval(pl.element().cast(pl.Int64))
            .alias("category_ids")
        )
    if "value" not in df.columns:
        df = df.with_columns(pl.lit(None, pl.Float32).alias("value"))
    # A parquet row's offset is its row index in the file (for the quarantine file).
    df = df.with_row_index("offset").with_columns(
        pl.col("offset").cast(pl.Int64) + row_base,
        pl.format("{}", pl.struct(pl.exclude("offset"))).alias("raw"),
        pl.col("behavior").cast(pl.String),
    )
    for name in ("user_id", "item_id", "timestamp"):
        df = df.with_columns(pl.col(name).cast(pl.Int64, strict=False))
    parsed = validate_events(df, BEHAVIORS, lo, hi)
    return split_valid(parsed, path, file_base)


def _list_files(path: str | Path, suffixes: tuple[str, ...]) -> list[Path | str]:
    if file_size(path) is None:  # a directory (or a prefix on object storage)
        if storage.is_uri(path):
            files = [f for f in storage.glob(path, "*") if f.endswith(suffixes)]
        else:
            found = Path(path).rglob("*")
            files = sorted(p for p in found if p.is_file() and p.name.endswith(suffixes))
        if not files:
            raise DataError(f"{path}: directory holds no {'/'.join(suffixes)} files")
        return files
    return [check_file(path)]


def _chunks_for(files: list[Path], chunk_bytes: int) -> list[Chunk]:
    chunks: list[Chunk] = []
    for f in files:
        chunks += _plan_text(f, chunk_bytes, first_index=len(chunks))
    return chunks


def _probe_delimited(path: Path, sep: str, n_fields: int, expected: str) -> None:
    lines = head_lines(path)
    if not any(len(line.split(sep)) == n_fields for line in lines):
        got = len(lines[0].split(sep))
        raise DataError(
            f"{path}: no line has the {n_fields} {sep!r}-separated fields {expected} "
            f"(first line has {got}: {lines[0][:80]!r}); wrong delimiter or format?"
        )


def _parquet_groups(path: Path | str) -> int:
    try:
        with open_arrow(path) as f:
            return pq.ParquetFile(f).metadata.num_row_groups
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: not a readable parquet file ({err})") from None


# ----------------------------------------------------------------------------- the registry

register(Format("taobao", _plan_taobao, _read_taobao, request_behavior="pv"))
register(Format("amazon", _plan_amazon, _read_amazon, "review", timestamp_kind="position"))
register(Format("movielens", _plan_movielens, _read_movielens, request_behavior="rating_high"))
register(Format("parquet", _plan_parquet, _read_parquet, request_behavior="pv"))
# Generated Taobao-schema parquet (rec/data/synthetic.py), read like any parquet log.
register(
    Format("synthetic", _plan_parquet, _read_parquet, request_behavior="pv", generate=generate)
)
