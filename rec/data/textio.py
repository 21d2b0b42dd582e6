"""Reading text logs in pieces: byte-range chunks of plain files, streamed blocks of gzip files.

A whole file that cannot be read at all raises `DataError` with one message naming the file
and the problem; the prepare job prints it without a traceback. Paths may be local or URIs
(s3://...): files are opened through rec/storage.py, local ones with plain `open` as before.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from rec import storage

BLOCK_BYTES = 16 << 20  # decompressed bytes handed to the parser at a time


class DataError(ValueError):
    """A source file cannot be read at all (missing, empty, wrong format, corrupt)."""


@dataclass(frozen=True)
class Chunk:
    """One read task: lines of `path` that start in [start, end) (end None = to the end)."""

    path: str
    index: int  # position in the plan; names the quarantine file of this chunk
    start: int = 0
    end: int | None = None


def open_file(path: str | Path) -> IO[bytes]:
    """A seekable binary file: `open` for local paths, a buffered pyarrow file for URIs."""
    if not storage.is_uri(path):
        return open(path, "rb")
    fs, inner = storage.filesystem(path)
    try:
        return io.BufferedReader(fs.open_input_file(inner), 1 << 20)
    except FileNotFoundError:
        storage.check(path)
        raise DataError(f"{path}: file not found") from None
    except OSError as err:
        raise storage.StorageError(f"{path}: cannot open ({' '.join(str(err).split())})") from None


def open_arrow(path: str | Path):
    """A pyarrow random-access file (local or remote), for readers that take one (parquet)."""
    fs, inner = storage.filesystem(path)
    try:
        return fs.open_input_file(inner)
    except FileNotFoundError:
        storage.check(path)
        raise DataError(f"{path}: file not found") from None


def file_size(path: str | Path) -> int | None:
    """Size in bytes of a file, None if `path` is a directory, DataError if nothing is there."""
    if not storage.is_uri(path):
        p = Path(path)
        if not p.exists():
            raise DataError(f"{path}: file not found")
        return p.stat().st_size if p.is_file() else None
    import pyarrow.fs as pafs

    fs, inner = storage.filesystem(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        storage.check(path)  # a missing bucket or refused credentials say so
        raise DataError(f"{path}: file not found")
    return info.size if info.type == pafs.FileType.File else None


def is_gzip(path: str | Path) -> bool:
    with open_file(path) as f:
        return f.read(2) == b"\x1f\x8b"


def check_file(path: str | Path) -> str | Path:
    """Fail clearly if `path` is missing, not a file or empty; return it (a Path when local,
    the URI string otherwise)."""
    size = file_size(path)
    if size is None:
        raise DataError(f"{path}: not a regular file")
    if size == 0:
        raise DataError(f"{path}: file is empty")
    return path if storage.is_uri(path) else Path(path)


def plan_text_chunks(path: str | Path, chunk_bytes: int, first_index: int = 0) -> list[Chunk]:
    """Split a plain text file into byte ranges; a gzip file is one chunk (not seekable)."""
    path = check_file(path)
    size = file_size(path)
    if is_gzip(path) or size <= chunk_bytes:
        return [Chunk(str(path), first_index)]
    starts = range(0, size, chunk_bytes)
    return [
        Chunk(str(path), first_index + i, s, min(s + chunk_bytes, size))
        for i, s in enumerate(starts)
    ]


def head_lines(path: str | Path, n: int = 200) -> list[str]:
    """The first `n` non-blank lines (decompressing if needed), for probing the format."""
    path = check_file(path)
    out: list[str] = []
    try:
        with _open_text(path) as f:
            for raw in f:
                line = raw.decode("utf-8", errors="replace").strip()
                if line:
                    out.append(line)
                if len(out) >= n:
                    break
    except (OSError, EOFError, zlib.error) as err:
        if not out:
            raise DataError(f"{path}: cannot read ({err})") from None
    if not out:
        raise DataError(f"{path}: file has no data lines")
    return out


@contextlib.contextmanager
def _open_text(path: str | Path) -> Iterator[IO[bytes]]:
    """The file's bytes, decompressed when it is gzip."""
    gz = is_gzip(path)
    with open_file(path) as raw:
        if not gz:
            yield raw
            return
        with gzip.GzipFile(fileobj=raw) as f:
            yield f


def iter_blocks(chunk: Chunk) -> Iterator[tuple[int, bytes]]:
    """Yield (byte offset of the block's first line, block of whole lines) for a chunk."""
    if is_gzip(chunk.path):
        yield from _gzip_blocks(chunk.path)
        return
    with open_file(chunk.path) as f:
        if chunk.start > 0:
            # A line that starts before `start` belongs to the previous chunk.
            f.seek(chunk.start - 1)
            f.readline()
        pos = f.tell()
        end = chunk.end if chunk.end is not None else float("inf")
        while pos < end:
            want = BLOCK_BYTES if chunk.end is None else min(BLOCK_BYTES, int(end - pos))
            data = f.read(want)
            if not data:
                break
            if not data.endswith(b"\n"):
                data += f.readline()  # finish the line that started inside the range
            yield pos, data
            pos += len(data)


def _gzip_blocks(path: str) -> Iterator[tuple[int, bytes]]:
    offset, rest = 0, b""
    try:
        with _open_text(path) as f:
            while True:
                data = f.read(BLOCK_BYTES)
                if not data:
                    break
                data = rest + data
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    rest = data
                    continue
                yield offset, data[:cut]
                offset += cut
                rest = data[cut:]
    except EOFError:
        raise DataError(
            f"{path}: truncated gzip file (compressed data ends before the end-of-stream marker)"
        ) from None
    except (gzip.BadGzipFile, zlib.error, OSError) as err:
        raise DataError(f"{path}: corrupt gzip file ({err})") from None
    if rest:
        yield offset, rest
