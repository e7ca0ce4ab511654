"""Limits per client network (server.ipv4_prefix, ipv6_prefix) and per minute
(server.max_connection_rate), over real loopback connections from 127.0.0.x sources.
Loopback IPv6 is only ::1, so the /64 grouping itself is tested in tests/unit/test_limits."""

from __future__ import annotations

import re
import urllib.request
from typing import Any

from tests.integration.harness import GsmtpProcess, SmtpWire, wait_for


def active_connections(gsmtp: GsmtpProcess) -> int:
    url = f"http://127.0.0.1:{gsmtp.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    match = re.search(r"^gsmtp_connections_active ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, "gsmtp_connections_active is missing"
    return int(float(match.group(1)))


def greeting(gsmtp: GsmtpProcess, source: str) -> list[str]:
    with SmtpWire(gsmtp.port, source=source) as wire:
        return wire.read_reply()


def test_addresses_of_one_network_share_the_cap(gsmtp_factory: Any) -> None:
    """ipv4_prefix = 24: 127.0.0.10 … 127.0.0.60 are one client with 5 slots; another
    /24 and a trusted address are still served."""
    gsmtp = gsmtp_factory({"server": {"ipv4_prefix": 24, "max_connections_per_ip": 5}})
    wait_for(lambda: active_connections(gsmtp) == 0, what="the start-up probe to be gone")
    held: list[SmtpWire] = []
    refused: list[list[str]] = []
    try:
        for host in range(10, 61):
            wire = SmtpWire(gsmtp.port, source=f"127.0.0.{host}")
            reply = wire.read_reply()
            if reply and reply[0].startswith("220"):
                held.append(wire)
            else:
                refused.append(reply)
                assert wire.read_reply() == []  # and closed
                wire.close()
        assert len(held) == 5
        assert refused == [["421 4.7.0 Too many connections from 127.0.0.0/24"]] * 46
        assert greeting(gsmtp, "127.0.1.10")[0].startswith("220")  # another /24
        assert greeting(gsmtp, "127.0.0.2")[0].startswith("220")  # trusted: exempt
    finally:
        for wire in held:
            wire.close()
    # Slots come back as connections end.
    wait_for(lambda: greeting(gsmtp, "127.0.0.99")[0].startswith("220"), what="a freed slot")


def test_connection_rate_limit_per_network(gsmtp_factory: Any) -> None:
    gsmtp = gsmtp_factory({"server": {"max_connection_rate": 3}})
    for _ in range(3):
        with SmtpWire(gsmtp.port, source="127.0.0.20") as wire:
            assert wire.read_reply()[0].startswith("220")
            assert wire.command("QUIT").startswith("221")
    with SmtpWire(gsmtp.port, source="127.0.0.20") as wire:
        assert wire.read_reply() == [
            "421 4.7.0 Too many new connections from 127.0.0.20, try again later"
        ]
        assert wire.read_reply() == []
    assert greeting(gsmtp, "127.0.0.21")[0].startswith("220")  # another client
    for _ in range(5):  # trusted (the harness trusts 127.0.0.2): exempt
        assert greeting(gsmtp, "127.0.0.2")[0].startswith("220")
    wait_for(lambda: '"connection_refused"' in gsmtp.log(), what="the refusal in the log")
    samples = gsmtp.metrics()
    assert samples['gsmtp_rejects_total{reason="rate_limit"}'] == 1
    assert samples['gsmtp_rejects_total{reason="connection_limit"}'] == 0
