"""The queue manager in a real `gsmtp serve`, default shape (pool 100, windows of 20):
a backlog across domains drains after `gsmtp queue flush`, a stalled destination holds
only what it runs, an unreadable message is set aside."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gsmtp import db
from gsmtp.message import MessageId, NewMessage
from gsmtp.spool import UNSCHEDULED, insert_messages
from tests.integration.harness import GsmtpProcess, environment_has, free_port, wait_for
from tests.integration.remote import Dnsmasq, Sink, SinkBehaviour

pytestmark = pytest.mark.skipif(
    not environment_has("dnsmasq"), reason="dnsmasq is not installed (apt-get install dnsmasq-base)"
)

DOMAINS = [f"q{n}.test" for n in range(5)]
SINK_HOSTS = [f"127.0.0.{n + 20}" for n in range(5)]
RECORDS = [
    record
    for domain, host in zip(DOMAINS, SINK_HOSTS, strict=True)
    for record in (f"--mx-host={domain},mx.{domain},10", f"--host-record=mx.{domain},{host}")
] + ["--mx-host=stalled.test,mx.stalled.test,10", "--host-record=mx.stalled.test,127.0.0.30"]


@pytest.fixture(scope="module")
def dns_server() -> Iterator[Dnsmasq]:
    server = Dnsmasq(RECORDS)
    yield server
    server.stop()


@pytest.fixture
def mx_port() -> int:
    return free_port("127.0.0.20")


@pytest.fixture
def sinks() -> Iterator[list[Sink]]:
    started: list[Sink] = []
    yield started
    for sink in started:
        sink.stop()


def relay_settings(dns_server: Dnsmasq, mx_port: int) -> dict[str, dict[str, Any]]:
    """Only what points delivery at the test's DNS and sinks: the shape is the default."""
    return {
        "server": {"trusted_networks": ["127.0.0.1/32"]},
        "delivery": {
            "nameservers": [f"127.0.0.1:{dns_server.port}"],
            "port": mx_port,
            "retry": ["1h"],
        },
    }


def seed(gsmtp: GsmtpProcess, messages: list[tuple[str, bytes]], due_in: float) -> None:
    """Queue messages straight into the spool of a stopped server, due in `due_in` s."""
    connection = db.connect(str(gsmtp.spool_path))
    now = time.time()
    batch = [
        NewMessage(
            MessageId(f"SEED{number:06d}"),
            "jones@foo.com",
            (recipient,),
            body,
            now,
            "192.0.2.1",
            "seed.example",
        )
        for number, (recipient, body) in enumerate(messages)
    ]
    with db.transaction(connection):
        for start in range(0, len(batch), 20):
            insert_messages(connection, batch[start : start + 20])
        connection.execute("UPDATE recipients SET next_attempt_at = ?", (now + due_in,))
    connection.close()


def test_a_backlog_across_five_domains_drains_after_a_flush(  # type: ignore[no-untyped-def]
    gsmtp_factory, dns_server: Dnsmasq, mx_port: int, sinks: list[Sink]
) -> None:
    """Issue 7 item 1: 300 messages for 5 remote domains plus local mail, deferred, then
    `gsmtp queue flush`: all of it is delivered. On the old scheduler, 100 were, then
    nothing (local mail included) until a restart."""
    sinks += [Sink(host, mx_port) for host in SINK_HOSTS]
    gsmtp = gsmtp_factory(relay_settings(dns_server, mx_port), start=False)
    remote = [
        (f"u{n}@{DOMAINS[n % 5]}", b"Subject: backlog %d\r\n\r\nbody\r\n" % n) for n in range(300)
    ]
    local = [("jones@foo.com", b"Subject: local %d\r\n\r\nbody\r\n" % n) for n in range(40)]
    seed(gsmtp, remote + local, due_in=3600)
    gsmtp.start()
    assert gsmtp.cli("queue", "flush").returncode == 0
    wait_for(
        lambda: gsmtp.spool_rows("SELECT COUNT(*) FROM messages") == [(0,)],
        timeout=90,
        what="the backlog to drain",
    )
    assert sorted(len(sink.received) for sink in sinks) == [60] * 5
    assert len(gsmtp.maildir_files("jones@foo.com")) == 40


def rss_bytes(gsmtp: GsmtpProcess) -> int:
    assert gsmtp.process is not None
    with open(f"/proc/{gsmtp.process.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_stalled_destination_holds_only_what_it_runs(  # type: ignore[no-untyped-def]
    gsmtp_factory, dns_server: Dnsmasq, mx_port: int, sinks: list[Sink]
) -> None:
    """Issue 7 item 2: a destination that takes the connection and never answers the
    final dot, and 100 messages of 3 MB for it: the runner owns only what runs plus a
    window waiting, and the server's memory grows by a few bodies, not by 300 MB."""
    hold = threading.Event()
    stalled = Sink("127.0.0.30", mx_port, behaviour=SinkBehaviour(hold_data=hold))
    sinks.append(stalled)
    gsmtp = gsmtp_factory(relay_settings(dns_server, mx_port), start=False)
    body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 3 * 1024
    seed(gsmtp, [(f"u{n}@stalled.test", body) for n in range(100)], due_in=3600)
    gsmtp.start()
    before = rss_bytes(gsmtp)
    gsmtp.cli("queue", "flush")
    wait_for(lambda: stalled.attempts >= 5, timeout=60, what="deliveries stalled at the dot")
    time.sleep(1.0)  # rounds run meanwhile: none may claim or load more
    owned = gsmtp.spool_rows("SELECT COUNT(*) FROM recipients WHERE claimed_due IS NOT NULL")
    growth = rss_bytes(gsmtp) - before
    assert stalled.attempts == 5  # the initial window: 5 connections, no more
    assert owned[0][0] <= 10, owned  # running + one window waiting, not all 100
    assert growth < 100 * 1024 * 1024, f"RSS grew by {growth // 2**20} MB"
    listing = json.loads(gsmtp.cli("queue", "stats", "--json").stdout)
    assert listing["queued"] == 100
    hold.set()


def test_an_unreadable_message_is_set_aside_and_listed(gsmtp_factory) -> None:  # type: ignore[no-untyped-def]
    gsmtp = gsmtp_factory(start=False)
    seed(gsmtp, [("jones@foo.com", b"Subject: fine\r\n\r\nbody\r\n")] * 2, due_in=0)
    connection = db.connect(str(gsmtp.spool_path))
    connection.execute("UPDATE messages SET body = 'garbage' WHERE id = 'SEED000000'")
    connection.close()
    gsmtp.start()
    wait_for(lambda: len(gsmtp.maildir_files("jones@foo.com")) == 1, what="the good one")
    wait_for(
        lambda: "SEED000000" in gsmtp.cli("queue", "list", "--corrupt").stdout,
        what="the bad one set aside",
    )
    corrupt = gsmtp.cli("queue", "list", "--corrupt").stdout
    assert "corrupt: body is str, not a blob" in corrupt
    assert "SEED000000" not in gsmtp.cli("queue", "list").stdout
    gsmtp.cli("queue", "flush")  # does not make it due again: it stays aside
    assert gsmtp.spool_rows(
        "SELECT next_attempt_at, claimed_due FROM recipients WHERE message_id = 'SEED000000'"
    ) == [(UNSCHEDULED, None)]
    assert "Traceback" not in gsmtp.log()
