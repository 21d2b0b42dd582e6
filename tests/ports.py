"""Free TCP ports for servers a test starts (Ray's GCS and dashboard, Serve's HTTP proxy)."""

from __future__ import annotations

import fcntl
import os
import random
import socket
import tempfile
import time
from pathlib import Path

PORTS_LOCK_DIR = Path(tempfile.gettempdir()) / "raydiv-test-ports"
_reserved: list = []  # open lock files: each port handed out stays ours until this process ends


def free_port() -> int:
    """A TCP port that nothing else takes between this call and the bind of the server it is
    given to (Ray's GCS, Serve's HTTP proxy: they bind it themselves, later).

    Binding port 0 and closing races: the kernel hands that same port to the next outgoing
    connection or bind(0) anywhere on the machine, and Ray opens many. So ports come from a
    band neither ever picks by itself: above Ray's worker ports (10002-19999) and below the
    kernel's ephemeral range (Linux 32768-60999, read from /proc). Within the band, each port
    handed out is reserved by an exclusive lock on a file, held for the life of this process,
    so two calls or two test processes never get the same one; a port some other program has
    bound is skipped (bind check).
    """
    low, high = 20000, _ephemeral_start()
    PORTS_LOCK_DIR.mkdir(exist_ok=True)
    start = random.Random(f"{os.getpid()}-{time.time_ns()}").randrange(low, high)
    for offset in range(high - low):
        port = low + (start - low + offset) % (high - low)
        lock = open(PORTS_LOCK_DIR / f"{port}.lock", "a")  # noqa: SIM115 (held until exit)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        if _bindable(port):
            _reserved.append(lock)
            return port
        lock.close()
    raise RuntimeError(f"no free port in {low}-{high}")


def _ephemeral_start() -> int:
    try:
        return min(
            32768, int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        )
    except (OSError, ValueError, IndexError):
        return 32768  # not Linux: macOS starts at 49152


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True
