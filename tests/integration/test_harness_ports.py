"""The harness's listening ports come from below the kernel's ephemeral range: an
outgoing connection (thousands of them, from a load test on another worker) never takes
one between free_port() and the server's bind."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from bench.ports import free_port, listening_ports, worker_share

RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def test_free_ports_are_below_the_ephemeral_range_and_free() -> None:
    low = int(RANGE.read_text().split()[0]) if RANGE.exists() else 0
    if low <= 11000:
        pytest.skip(f"the ephemeral range starts at {low}: no room below it")
    ports = {free_port() for _ in range(20)} | {free_port("::1") for _ in range(5)}
    assert all(1024 <= port < low for port in ports), sorted(ports)
    for port in ports:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", port))  # free: nothing listens there


def test_the_range_below_the_ephemeral_one_is_read_from_the_kernel_file(tmp_path: Path) -> None:
    given = tmp_path / "ip_local_port_range"
    given.write_text("32768\t60999\n")
    assert listening_ports(given) == range(20768, 32768)
    given.write_text("15000 60999\n")
    assert listening_ports(given) == range(10000, 15000)  # never below 10,000
    given.write_text("1024 60999\n")
    assert listening_ports(given) == range(0)  # no room: bind(0) instead
    assert listening_ports(tmp_path / "missing") == range(0)


def test_ports_handed_out_one_after_another_are_distinct() -> None:
    """CI failure: two calls before any bind (a gsmtp's SMTP and metrics ports) gave the
    same port, and the server failed to listen three times in a row. Among 12,000
    candidates, 500 calls collide with a probability of about 1 - e^(-10): certain
    without the memory of recent picks."""
    if not listening_ports():
        pytest.skip("no range below the ephemeral one: the kernel picks (bind(0))")
    picked = [free_port() for _ in range(500)]
    assert len(set(picked)) == len(picked)


def test_each_xdist_worker_draws_from_its_own_share_of_the_ports() -> None:
    """CI failure (2026-12-04): a gsmtp on one worker found its port taken ("Address
    already in use") by a server another worker had picked from the same pool a moment
    before. Workers' shares are disjoint and together cover the range."""
    ports = range(20768, 32768)
    shares = [worker_share(ports, f"gw{index}", "3") for index in range(3)]
    assert [len(share) for share in shares] == [4000, 4000, 4000]
    assert set(shares[0]).isdisjoint(shares[1]) and set(shares[1]).isdisjoint(shares[2])
    assert set().union(*shares) == set(ports)
    assert worker_share(ports, None, None) == ports  # a plain pytest run: all of it
    assert worker_share(ports, "master", "2") == ports
    assert worker_share(ports, "gw5", "2") == ports  # not a worker of that many
    assert worker_share(range(10000, 10150), "gw1", "2") == range(10000, 10150)  # too few


def test_this_worker_draws_only_from_its_share() -> None:
    """Under `make test` (pytest-xdist), the ports this worker hands out are its own
    share's, not the whole range's."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not listening_ports() or worker is None:
        pytest.skip("not an xdist worker, or no range below the ephemeral one")
    share = worker_share(listening_ports(), worker, os.environ.get("PYTEST_XDIST_WORKER_COUNT"))
    assert share != listening_ports()
    assert all(free_port() in share for _ in range(50))
