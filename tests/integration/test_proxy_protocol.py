"""PROXY protocol v1/v2 (server.proxy_protocol, proxy_networks): first with hand-written
headers, then through a real HAProxy (Debian package `haproxy`) in front of two gsmtp
instances, round robin. The client the header names decides relay rights, limits, logs
and the Received: header; nobody else may send a header, and no header means no
greeting."""

from __future__ import annotations

import json
import smtplib
import socket
import struct
import subprocess
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import (
    GsmtpProcess,
    SmtpWire,
    environment_has,
    free_port,
    wait_for,
)

TRUSTED = "127.0.0.7"  # a real client allowed to relay
STRANGER = "127.0.0.8"  # a real client that is not
OUTSIDER = "127.0.0.9"  # a peer outside proxy_networks
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
EARLY_TALKER = b"554 5.5.0 SMTP synchronization error: talked before the greeting\r\n"


def proxy_settings(**server: Any) -> dict[str, dict[str, Any]]:
    return {
        "server": {
            "proxy_protocol": True,
            "proxy_networks": ["127.0.0.1/32"],
            "trusted_networks": [f"{TRUSTED}/32"],
            **server,
        }
    }


def v1(source: str, port: int = 40000) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.1 {port} 25\r\n".encode()


def v2(source: str, port: int = 40000) -> bytes:
    addresses = ip_address(source).packed + ip_address("127.0.0.1").packed
    payload = addresses + struct.pack("!HH", port, 25) + b"\x04\x00\x03abc"  # + a NOOP TLV
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(payload)) + payload


def read_all(sock: socket.socket) -> bytes:
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except ConnectionResetError:
        pass  # closed with our bytes unread: the kernel answers with a reset
    return received


def events(gsmtp: GsmtpProcess, name: str) -> list[dict[str, Any]]:
    found = []
    for line in gsmtp.log().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == name:
                found.append(record)
    return found


def relay_reply(wire: SmtpWire) -> str:
    assert wire.read_reply()[0].startswith("220")
    assert wire.command("EHLO client.example").startswith("250")
    assert wire.command("MAIL FROM:<a@remote.example>").startswith("250")
    return wire.command("RCPT TO:<someone@elsewhere.example>")


# -- hand-written headers -----------------------------------------------------------------


@pytest.mark.parametrize("header", [v1, v2], ids=["v1", "v2"])
def test_the_client_named_by_the_header_decides_relay_logs_and_received(
    gsmtp_factory: Any, header: Any
) -> None:
    gsmtp = gsmtp_factory(proxy_settings())
    with SmtpWire(gsmtp.port) as wire:
        wire.send(header(TRUSTED))
        assert relay_reply(wire).startswith("250")
        wire.command("RSET")
        wire.command("MAIL FROM:<a@remote.example>")
        wire.command("RCPT TO:<jones@foo.com>")
        assert wire.command("DATA").startswith("354")
        assert wire.command("Subject: proxied\r\n\r\nhello\r\n.").startswith("250")
    with SmtpWire(gsmtp.port) as wire:
        wire.send(header(STRANGER))
        assert relay_reply(wire) == "554 5.7.1 Relay access denied"
    (path,) = wait_for(lambda: gsmtp.maildir_files("jones@foo.com"), what="the delivery")
    assert f"(unknown [{TRUSTED}])" in path.read_text().split("\n", 3)[2]  # Received:
    wait_for(lambda: len(events(gsmtp, "connection_opened")) >= 3, what="the log")
    peers = [(r["peer"], r.get("proxy")) for r in events(gsmtp, "connection_opened")]
    assert (TRUSTED, "127.0.0.1") in peers and (STRANGER, "127.0.0.1") in peers


def test_the_header_is_not_early_talk_but_bytes_after_it_are(gsmtp_factory: Any) -> None:
    gsmtp = gsmtp_factory(proxy_settings())
    with SmtpWire(gsmtp.port) as wire:
        wire.send(v1(STRANGER))
        assert wire.read_reply()[0].startswith("220")
    with socket.create_connection(("127.0.0.1", gsmtp.port), timeout=10) as sock:
        sock.sendall(v2(STRANGER) + b"EHLO early.example\r\n")  # one write, one segment
        received = read_all(sock)
    # Dropped with our EHLO unread, the 554 may be lost to the reset; never a 220.
    assert received in (b"", EARLY_TALKER) or received.startswith(b"554 5.5.0")
    wait_for(lambda: events(gsmtp, "early_talker_dropped"), what="the drop in the log")


def test_a_peer_outside_proxy_networks_is_closed_without_a_greeting(gsmtp_factory: Any) -> None:
    gsmtp = gsmtp_factory(proxy_settings(timeout="30s"))
    with socket.create_connection(
        ("127.0.0.1", gsmtp.port), timeout=10, source_address=(OUTSIDER, 0)
    ) as sock:
        assert read_all(sock) == b""  # at once: no 5 s header deadline for outsiders
    wait_for(lambda: events(gsmtp, "proxy_peer_refused"), what="the refusal in the log")
    assert events(gsmtp, "proxy_peer_refused")[0]["peer"] == OUTSIDER


@pytest.mark.parametrize("header", [v1, v2], ids=["v1", "v2"])
def test_a_forged_header_from_outside_proxy_networks_is_refused(
    gsmtp_factory: Any, header: Any
) -> None:
    gsmtp = gsmtp_factory(proxy_settings())
    with socket.create_connection(
        ("127.0.0.1", gsmtp.port), timeout=10, source_address=(OUTSIDER, 0)
    ) as sock:
        sock.sendall(header(TRUSTED) + b"EHLO forged.example\r\n")
        assert read_all(sock) == b""
    wait_for(lambda: events(gsmtp, "proxy_peer_refused"), what="the refusal in the log")
    opened = [r["peer"] for r in events(gsmtp, "connection_opened")]
    assert opened == ["127.0.0.1"]  # the harness's start-up probe only


def test_no_header_within_the_deadline_is_closed_without_a_greeting(gsmtp_factory: Any) -> None:
    """From a proxy network but silent: closed after min(5 s, server.timeout) = 1 s."""
    gsmtp = gsmtp_factory(proxy_settings(timeout="1s"))
    with socket.create_connection(("127.0.0.1", gsmtp.port), timeout=10) as sock:
        assert read_all(sock) == b""
    (record,) = wait_for(lambda: events(gsmtp, "proxy_header_missing"), what="the log")
    assert record["error"] == "none within 1s"


@pytest.mark.parametrize(
    "data",
    [
        b"EHLO client.example\r\n",
        b"PROXY TCP4 127.0.0.999 127.0.0.1 1 25\r\n",
        b"PROXY TCP4 " + b"1" * 120 + b"\r\n",
        V2_SIGNATURE + b"\x21\x11\x00\x04abcd",  # too short for two IPv4 addresses
    ],
    ids=["smtp", "bad-address", "too-long", "v2-short"],
)
def test_a_malformed_header_is_closed_without_a_greeting(gsmtp_factory: Any, data: bytes) -> None:
    gsmtp = gsmtp_factory(proxy_settings())
    with socket.create_connection(("127.0.0.1", gsmtp.port), timeout=10) as sock:
        sock.sendall(data)
        assert read_all(sock) == b""
    wait_for(lambda: events(gsmtp, "proxy_header_refused"), what="the refusal in the log")


def test_without_proxy_protocol_a_proxy_line_is_an_unknown_command(gsmtp: GsmtpProcess) -> None:
    """R-14: the header is just text when proxy_protocol is off."""
    with SmtpWire(gsmtp.port) as wire:
        assert wire.read_reply()[0].startswith("220")
        assert wire.command(v1(TRUSTED).decode().strip()).startswith("500 5.5.1")
        assert relay_reply_after_greeting(wire).startswith("554 5.7.1")


def relay_reply_after_greeting(wire: SmtpWire) -> str:
    assert wire.command("EHLO client.example").startswith("250")
    assert wire.command("MAIL FROM:<a@remote.example>").startswith("250")
    return wire.command("RCPT TO:<someone@elsewhere.example>")


# -- through HAProxy ----------------------------------------------------------------------


class HAProxy:
    """`haproxy -f cfg -db` in the foreground on loopback: one TCP frontend, a round-robin
    backend of the given gsmtp ports, each sent the PROXY header `send_proxy` asks for."""

    def __init__(self, directory: Path, backends: list[int], send_proxy: str) -> None:
        self.port = free_port()
        servers = "\n".join(
            f"    server gsmtp{i} 127.0.0.1:{port} {send_proxy}" for i, port in enumerate(backends)
        )
        self.config = directory / "haproxy.cfg"
        self.config.write_text(
            "global\n"
            "    maxconn 200\n"
            "defaults\n"
            "    mode tcp\n"
            "    timeout connect 5s\n"
            "    timeout client 30s\n"
            "    timeout server 30s\n"
            "frontend smtp\n"
            f"    bind 127.0.0.1:{self.port}\n"
            "    default_backend gsmtp\n"
            "backend gsmtp\n"
            "    balance roundrobin\n"
            f"{servers}\n"
        )
        self.log_path = directory / "haproxy.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                ["haproxy", "-f", str(self.config), "-db"], stdout=log, stderr=log
            )
        wait_for(self._listening, timeout=20, what=f"haproxy to listen on {self.port}")

    def _listening(self) -> bool:
        """Read from /proc rather than connect: a probe would go through to a backend
        and move the round robin."""
        if self.process.poll() is not None:
            raise AssertionError(f"haproxy exited: {self.log_path.read_text()}")
        local = f"0100007F:{self.port:04X}"
        with open("/proc/net/tcp") as table:
            return any(
                fields[1] == local and fields[3] == "0A"
                for fields in (line.split() for line in table.readlines()[1:])
            )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@pytest.fixture(params=["send-proxy", "send-proxy-v2"])
def balanced(request: Any, gsmtp_factory: Any, tmp_path: Path) -> Iterator[Any]:
    """Start two gsmtp instances behind HAProxy: make(**server settings) -> HAProxy."""
    if not environment_has("haproxy"):
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    started: list[HAProxy] = []

    def make(**server: Any) -> tuple[HAProxy, list[GsmtpProcess]]:
        instances = [gsmtp_factory(proxy_settings(**server)) for _ in range(2)]
        balancer = HAProxy(tmp_path, [g.port for g in instances], request.param)
        started.append(balancer)
        return balancer, instances

    yield make
    for balancer in started:
        balancer.stop()


def smtp_through(balancer: HAProxy, source: str) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", balancer.port, timeout=10, source_address=(source, 0))


def test_through_haproxy_a_trusted_client_may_relay_and_a_stranger_may_not(
    balanced: Any,
) -> None:
    balancer, instances = balanced()
    outcomes = []
    for source in (TRUSTED, STRANGER, STRANGER, TRUSTED):  # round robin: each sees both
        with smtp_through(balancer, source) as client:
            client.ehlo("client.example")
            client.mail("a@remote.example")
            outcomes.append((source, client.rcpt("someone@elsewhere.example")))
    relayed, denied = (250, b"2.1.5 Recipient ok"), (554, b"5.7.1 Relay access denied")
    assert outcomes == [
        (TRUSTED, relayed),
        (STRANGER, denied),
        (STRANGER, denied),
        (TRUSTED, relayed),
    ]
    for gsmtp in instances:
        wait_for(lambda g=gsmtp: len(events(g, "connection_opened")) == 3, what="the log")
        peers = sorted((r["peer"], r.get("proxy")) for r in events(gsmtp, "connection_opened"))
        # The harness's probe, then the two clients HAProxy brought (from 127.0.0.1).
        assert peers == [("127.0.0.1", None), (TRUSTED, "127.0.0.1"), (STRANGER, "127.0.0.1")]


def test_through_haproxy_limits_count_the_real_clients(balanced: Any) -> None:
    """One slot per client network on each instance: the trusted one is exempt, so the
    limit is shown with two strangers. A third connection from 127.0.0.8 finds its slot
    taken; 127.0.0.10 is another client and is served (were the balancer's address
    counted, it would be refused too)."""
    balancer, _ = balanced(max_connections_per_ip=1)
    held = [smtp_through(balancer, STRANGER) for _ in range(2)]  # one on each instance
    try:
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            smtp_through(balancer, STRANGER)
        assert refused.value.smtp_code == 421
        assert refused.value.smtp_error == b"4.7.0 Too many connections from 127.0.0.8"
        with smtp_through(balancer, "127.0.0.10") as other:
            assert other.noop()[0] == 250
    finally:
        for client in held:
            client.close()
