"""Listening ports for servers a harness starts (the bench's peers, the tests' gsmtp):
taken from below the kernel's ephemeral range (ip_local_port_range), where no outgoing
connection takes one. A port that bind(0) hands out is what connect() takes too: while
another test worker opened thousands of connections, one took a server's port between
free_port() and the server's bind, three times in a row. Each pytest-xdist worker draws
from its own share of those ports: two workers drawing from one pool picked the same
port moments apart, and the second server found it taken (CI, 2026-12-04)."""

from __future__ import annotations

import collections
import os
import random
import socket
from pathlib import Path

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
BELOW_EPHEMERAL = 12000  # ports kept below the range's start (never under 10,000)


def listening_ports(range_file: Path = EPHEMERAL_RANGE) -> range:
    """The ports below the ephemeral range, or none if it starts too low to leave room."""
    try:
        low = int(range_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return range(0)
    return range(max(low - BELOW_EPHEMERAL, 10000), low) if low > 11000 else range(0)


def worker_share(ports: range, worker: str | None, workers: str | None) -> range:
    """The part of `ports` that pytest-xdist worker `worker` ("gw0", "gw1", ...) of
    `workers` draws from: disjoint between workers, all of `ports` outside xdist."""
    if worker is None or not worker.startswith("gw"):
        return ports
    try:
        index, count = int(worker[2:]), int(workers or "")
    except ValueError:
        return ports
    if not 0 <= index < count:
        return ports
    share = len(ports) // count
    return ports[index * share : (index + 1) * share] if share >= 100 else ports


_LISTENING_PORTS = worker_share(
    listening_ports(),
    os.environ.get("PYTEST_XDIST_WORKER"),
    os.environ.get("PYTEST_XDIST_WORKER_COUNT"),
)
# Ports this process handed out lately: free_port() is called several times before any
# server binds (a server's SMTP and metrics ports), and a port it found free is still
# free at the next call. Two picks of the same port made one gsmtp bind its SMTP and
# metrics listeners to one port (CI: "Address already in use" three times in a row).
_RECENT: collections.deque[int] = collections.deque(maxlen=1000)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now, below the ephemeral range where there is one, and not
    one this process handed out among its last thousand."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(200 if _LISTENING_PORTS else 0):
        port = random.choice(_LISTENING_PORTS)
        if port in _RECENT:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        _RECENT.append(port)
        return port
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])
