"""tests/ports.free_port: ports no other process (ours or the kernel's) hands out meanwhile."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import tests.ports as ports
from tests.conftest import ROOT
from tests.ports import free_port


def test_ports_are_outside_the_kernels_ephemeral_range_and_bindable():
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    got = [free_port() for _ in range(50)]
    assert len(set(got)) == 50  # never the same one twice in a process
    assert all(20000 <= p < low for p in got)
    with socket.socket() as s:
        s.bind(("127.0.0.1", got[0]))  # still free: nothing else was given it


# Each child starts its scan at port 20000 (as the parent will), prints the ports it took, then
# holds them (stays alive) until its stdin closes.
CHILD = """
import sys, types
import tests.ports as ports
ports.random = types.SimpleNamespace(Random=lambda _seed: types.SimpleNamespace(
    randrange=lambda low, high: 20000))
print(*[ports.free_port() for _ in range(int(sys.argv[1]))], flush=True)
sys.stdin.read()
"""


def test_live_processes_never_get_the_same_port(monkeypatch):
    """Two live processes take 100 ports each, both scanning from port 20000, and then this
    one does too: the file locks keep every port handed out distinct (a bind check alone
    would hand all three the same ports: nobody has bound them yet). A port is free again
    once the process that took it has ended."""
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    cmd = [sys.executable, "-c", CHILD, "100"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, **pipes) for _ in range(2)]
    try:
        got = [set(map(int, p.stdout.readline().split())) for p in procs]
        monkeypatch.setattr(ports.random, "Random", lambda _seed: _Fixed(20000))
        mine = {free_port() for _ in range(20)}
    finally:
        for p in procs:
            p.communicate(timeout=60)
    assert [len(g) for g in got] == [100, 100] and len(mine) == 20
    assert not (got[0] & got[1] or mine & (got[0] | got[1]))


def test_a_port_bound_by_another_program_is_skipped(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("", 0))  # the kernel's choice: any port, for the check below to steer at
        port = taken.getsockname()[1]
        monkeypatch.setattr(ports, "_ephemeral_start", lambda: port + 1)
        monkeypatch.setattr(ports.random, "Random", lambda _seed: _Fixed(port))
        assert free_port() != port


class _Fixed:
    """A Random whose randrange starts the scan at `port`."""

    def __init__(self, port: int):
        self.port = port

    def randrange(self, low: int, high: int) -> int:
        return self.port
