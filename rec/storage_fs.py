"""Where a path or URI lives: its pyarrow filesystem, and one-line errors naming it.

The resolution half of `rec.storage` (which re-exports these names: use `rec.storage`). S3
settings come only from the standard AWS variables and files (rec/aws_env.py); a URI that
cannot be opened raises `StorageError` (a ValueError) with one line naming it. No Ray import.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs

from rec import aws_env

URI = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+)://(.*)$")
# "s3:/bucket/x": what pathlib makes of "s3://bucket/x". Never a path anyone meant.
_MANGLED_URI = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+):/(?!/)")
_OBJECT_STORES = {"s3", "gs", "gcs", "abfs", "abfss"}
_GCS_RETRY_LIMIT = datetime.timedelta(seconds=60)


class StorageError(ValueError):
    """A path or URI that cannot be read or written; the message is one line naming it."""


def is_uri(p: str | os.PathLike) -> bool:
    """True for `scheme://...` (including file://); False for plain local paths."""
    return isinstance(p, str) and URI.match(p) is not None


def local_path(p: str | os.PathLike) -> Path:
    """A local path as a Path; refuses URIs, so none ever becomes a folder named `s3:`."""
    text = os.fspath(p)
    if is_uri(text):
        scheme = URI.match(text).group(1).lower()
        if scheme != "file":
            raise StorageError(f"{text}: a URI where a local path is needed (use local_copy)")
        return Path(pafs.FileSystem.from_uri(text)[1])
    refuse_mangled(text)
    return Path(text).expanduser()


def refuse_mangled(text: str) -> None:
    if _MANGLED_URI.match(text):
        raise StorageError(
            f"{text}: looks like a URI whose '//' was lost (passed through pathlib?)"
        )


def filesystem(p: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or a URI.

    Contacts nothing, except on AWS itself with no region configured, where it asks S3 for
    the bucket's region once (as pyarrow's FileSystem.from_uri does).
    """
    text = os.fspath(p)
    if not is_uri(text):
        return pafs.LocalFileSystem(), os.path.abspath(local_path(text))
    scheme, rest = URI.match(text).groups()
    scheme = scheme.lower()
    try:
        if scheme == "s3":
            bucket = rest.split("/", 1)[0]
            if not bucket:
                raise StorageError(f"{text}: no bucket in the URI")
            return _s3_filesystem(bucket), rest.rstrip("/")
        if scheme in ("gs", "gcs"):
            # pyarrow's default retries for 15 minutes, e.g. when no credentials are found
            return pafs.GcsFileSystem(retry_time_limit=_GCS_RETRY_LIMIT), rest.rstrip("/")
        if scheme in ("abfs", "abfss", "file", "hdfs", "viewfs"):
            fs, path = pafs.FileSystem.from_uri(text)
            return fs, path.rstrip("/") or path
        return _fsspec_filesystem(scheme, text)
    except StorageError:
        raise
    except (OSError, ValueError, ImportError) as e:
        raise StorageError(f"{text}: cannot open: {one_line(e)}") from e


def _s3_filesystem(bucket: str) -> pafs.S3FileSystem:
    endpoint = aws_env.s3_endpoint()
    region = aws_env.region()
    if region is None and endpoint is None:
        region = _bucket_region(bucket)  # what FileSystem.from_uri does for AWS itself
    kwargs: dict = {"endpoint_override": endpoint, "region": region}
    return pafs.S3FileSystem(**{k: v for k, v in kwargs.items() if v is not None})


@functools.lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> str | None:
    try:
        return pafs.resolve_s3_region(bucket)
    except OSError:
        return None  # let the SDK's default apply; the first real request names the error


def _fsspec_filesystem(scheme: str, uri: str) -> tuple[pafs.FileSystem, str]:
    import fsspec  # only for schemes pyarrow has no native filesystem for (memory://, az://)

    fs, path = fsspec.core.url_to_fs(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    text = re.sub(r"\s*\(Request ID: [^)]*\)", "", text)
    return text if len(text) <= 300 else text[:297] + "..."


@contextlib.contextmanager
def errors(uri: str, action: str) -> Iterator[None]:
    """Turn pyarrow/OS errors into one StorageError line naming `uri`."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as e:
        if is_uri(uri):
            check(uri)  # a missing bucket says so, rather than "not found"
        raise StorageError(f"{uri}: not found (cannot {action})") from e
    except (OSError, ValueError) as e:
        raise StorageError(f"{uri}: cannot {action}: {one_line(e)}{hint(uri)}") from e


def hint(uri: str) -> str:
    if not is_uri(uri) or not uri.lower().startswith("s3://"):
        return ""
    endpoint = aws_env.s3_endpoint() or "AWS default"
    creds = "" if aws_env.credentials_found() else ", no AWS credentials in env or ~/.aws"
    return f" [endpoint {endpoint}, region {aws_env.region() or 'SDK default'}{creds}]"


def check(p: str | os.PathLike) -> None:
    """Fail now, with one line, if the bucket/container of a URI is missing or unreachable."""
    text = os.fspath(p)
    if not is_uri(text):
        local_path(text)
        return
    fs, path = filesystem(text)
    if URI.match(text).group(1).lower() not in _OBJECT_STORES:
        return
    bucket = path.split("/", 1)[0]
    with errors(text, "reach the bucket"):
        info = fs.get_file_info(bucket)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{text}: bucket {bucket!r} does not exist{hint(text)}")


def scheme(p: str | os.PathLike) -> str | None:
    """The URI's scheme, lower case ("s3", "file", ...); None for a plain local path."""
    m = URI.match(os.fspath(p))
    return m.group(1).lower() if m else None
