"""The harness's listening ports come from below the kernel's ephemeral range: an
outgoing connection (thousands of them, from a load test on another worker) never takes
one between free_port() and the server's bind."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from bench.ports import free_port, listening_ports

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
