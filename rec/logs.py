"""One log format for the jobs and the training workers (no Ray): Python `logging` under the
"raydiv" namespace, to stdout, where the jobs' lines always went.

    log = get_logger("train")
    log.info("published the export %s", version)
    # 2026-11-29 12:00:00 INFO [train] published the export .../v-...

Only the project's own loggers are configured (one handler on "raydiv", not propagated):
Ray's, DeepSpeed's and transformers' logging stay as those libraries set them. The level
follows RAYDIV_LOG_LEVEL (default INFO); Ray workers inherit it from the job's environment.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

ROOT = "raydiv"
FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
T = TypeVar("T")


class _Stdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (pytest's capture swaps it per test)."""

    def emit(self, record: logging.LogRecord) -> None:
        # Not setStream: it flushes the previous stream first, which may be closed by now
        # (pytest closes each test's capture).
        self.stream = sys.stdout
        super().emit(record)
        self.flush()  # Ray forwards a worker's stdout line by line: no buffering delay


class _ShortName(logging.Formatter):
    """[train], not [raydiv.train]: the job or component a line comes from."""

    def format(self, record: logging.LogRecord) -> str:
        record.name = record.name.removeprefix(ROOT + ".")
        return super().format(record)


def get_logger(name: str) -> logging.Logger:
    """The logger of one job or component ("train", "pipeline", "frontier", ...)."""
    root = logging.getLogger(ROOT)
    if not root.handlers:
        handler = _Stdout()
        handler.setFormatter(_ShortName(FORMAT, DATE_FORMAT))
        root.addHandler(handler)
        root.setLevel(os.environ.get("RAYDIV_LOG_LEVEL", "INFO").upper())
        root.propagate = False  # one line per message, whatever the root logger does
    return logging.getLogger(f"{ROOT}.{name}")


def progress(iterable: Iterable[T], total: int | None, desc: str) -> Iterator[T]:
    """`iterable` with a tqdm progress bar on stderr, for loops that run minutes (the frontier,
    world building). Shown on a terminal only, so logs and tests stay clean; RAYDIV_PROGRESS=1
    shows it anywhere (e.g. under `ray job submit`), RAYDIV_PROGRESS=0 never."""
    from tqdm import tqdm

    flag = os.environ.get("RAYDIV_PROGRESS")
    disable = None if flag is None else flag == "0"  # None: tqdm's own "not a terminal" test
    return iter(tqdm(iterable, total=total, desc=desc, unit="batch", disable=disable, leave=False))
