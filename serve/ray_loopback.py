"""Ray Serve replicas on a loopback-only local Ray listen on loopback only (issue 15.5).

grpc_on_loopback()   # first thing in a deployment's __init__ (serve/app.py)
"""

from __future__ import annotations

import ipaddress
from typing import Any


def grpc_on_loopback() -> None:
    """Keep this replica's inter-deployment gRPC server on a loopback node IP.

    Ray 2.60 binds it to `[::]:0`, every interface, whatever the node IP
    (ray/serve/_private/replica.py, `_on_initialized`, which runs after the deployment's
    __init__): on a job-started local Ray (node IP 127.0.0.1, issue 15.5) that is the one
    listener open to the network. Peers reach a replica at its node IP and port, so binding
    that IP changes nothing for them. Other nodes' IPs are left as Ray binds them."""
    import ray
    from ray.serve._private import replica

    ip = ray.util.get_node_ip_address()
    original = getattr(replica, "add_port_to_grpc_server", None)
    if not ipaddress.ip_address(ip).is_loopback or original is None:
        return
    if getattr(original, "loopback_ip", None):
        return  # patched already (a second deployment class in this process)

    def bind(server: Any, address: str) -> int:
        return original(server, f"{ip}:0" if address == "[::]:0" else address)

    bind.loopback_ip = ip
    replica.add_port_to_grpc_server = bind
