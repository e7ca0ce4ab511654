"""Outbound session reuse against real parts: dnsmasq for MX records, aiosmtpd sinks
that record each connection's verbs with their times, gsmtp relaying between them."""

from __future__ import annotations

import email

import pytest

from tests.integration.harness import GsmtpProcess, wait_for
from tests.integration.remote import CLOSED, Sink, SinkBehaviour, send, start_sink, wait_received

ONE_TRANSACTION = ["MAIL", "RCPT", "DATA"]


def transactions_with_rset_between(verbs: list[str]) -> int:
    """How many transactions one connection carried; asserts the shape: EHLO, then
    transactions with RSET between them, then QUIT or nothing (still idle)."""
    body = [v for v in verbs if v not in ("QUIT", CLOSED)]
    count = body.count("DATA")
    expected = ["EHLO", *ONE_TRANSACTION, *(["RSET", *ONE_TRANSACTION] * (count - 1))]
    assert body == expected, verbs
    return count


def spool_empty(gsmtp: GsmtpProcess) -> bool:
    return gsmtp.spool_rows("SELECT COUNT(*) FROM messages") == [(0,)]


def subjects(sink: Sink) -> list[str]:
    return sorted(str(email.message_from_bytes(r.data)["Subject"]) for r in sink.received)


def test_fifty_messages_share_a_few_sessions_with_rset_between(  # type: ignore[no-untyped-def]
    relay, sinks, mx_port: int
) -> None:
    """50 messages to one domain whose window is capped at 5: at most 5 sessions are
    ever open at once, and none is closed early, so at most 5 connections in all."""
    sink = start_sink(sinks, "127.0.0.2", mx_port)
    gsmtp = relay(max_per_domain=5, connection_idle="30s")
    for index in range(50):
        send(gsmtp, "jones@foo.com", [f"r{index}@remote.test"], subject=f"m{index:02}")
    wait_received(sink, 50, timeout=60)
    wait_for(lambda: spool_empty(gsmtp), timeout=30, what="every result recorded")
    assert subjects(sink) == [f"m{index:02}" for index in range(50)]  # each exactly once
    connections = sink.verbs()
    assert 1 <= len(connections) <= 5, connections
    assert sum(transactions_with_rset_between(verbs) for verbs in connections) == 50
    assert gsmtp.events("message_deferred") == []


def test_a_session_the_peer_closed_while_idle_is_replaced_without_deferral(  # type: ignore[no-untyped-def]
    relay, sinks, mx_port: int
) -> None:
    sink = start_sink(sinks, "127.0.0.2", mx_port, idle_timeout=0.5)
    gsmtp = relay(connection_idle="30s")
    send(gsmtp, "jones@foo.com", ["a@remote.test"], subject="first")
    wait_received(sink, 1)
    wait_for(lambda: sink.verbs()[0][-1] == CLOSED, what="the sink to drop the idle session")
    send(gsmtp, "jones@foo.com", ["b@remote.test"], subject="second")
    wait_received(sink, 2)
    wait_for(lambda: spool_empty(gsmtp), what="both results recorded")
    assert subjects(sink) == ["first", "second"]
    first, second = sink.verbs()
    assert "QUIT" not in first and "RSET" not in second  # dropped by the sink; a new one
    wait_for(lambda: len(gsmtp.events("message_delivered")) == 2, what="the log")
    assert gsmtp.events("message_deferred") == []
    stale = 'gsmtp_outbound_sessions_total{how="stale"}'
    assert gsmtp.metrics().get(stale) == 1.0  # the cached session was tried first


def test_an_idle_session_is_closed_with_quit_after_connection_idle(  # type: ignore[no-untyped-def]
    relay, sinks, mx_port: int
) -> None:
    sink = start_sink(sinks, "127.0.0.2", mx_port)
    gsmtp = relay(connection_idle="1s")
    send(gsmtp, "jones@foo.com", ["a@remote.test"])
    wait_received(sink, 1)
    wait_for(lambda: sink.verbs()[0][-1] == CLOSED, timeout=15, what="the idle session closed")
    (transcript,) = sink.transcripts
    assert [verb for _, verb in transcript] == ["EHLO", *ONE_TRANSACTION, "QUIT", CLOSED]
    times = dict((verb, at) for at, verb in transcript)
    # Kept open for connection_idle after the transaction, not closed at once. (A lower
    # bound only: a loaded machine makes the QUIT later, never earlier.)
    assert times["QUIT"] - times["DATA"] >= 0.95


def test_connection_reuse_1_means_a_connection_per_message(  # type: ignore[no-untyped-def]
    relay, sinks, mx_port: int
) -> None:
    sink = start_sink(sinks, "127.0.0.2", mx_port)
    gsmtp = relay(connection_reuse=1, connection_idle="30s")
    for index in range(3):
        send(gsmtp, "jones@foo.com", [f"r{index}@remote.test"], subject=f"m{index}")
        wait_received(sink, index + 1)  # one after the other: each could take a session
    wait_for(lambda: all(v[-1] == CLOSED for v in sink.verbs()), what="every session closed")
    assert sink.verbs() == [["EHLO", *ONE_TRANSACTION, "QUIT", CLOSED]] * 3


@pytest.mark.parametrize(
    ("reply", "connections"),
    [("554 5.6.0 Content rejected", 1), ("421 4.3.2 Closing the connection", 2)],
    ids=["5xx-reused", "421-not-reused"],
)
def test_a_refused_message_leaves_the_session_reusable_but_421_does_not(  # type: ignore[no-untyped-def]
    relay, sinks, mx_port: int, reply: str, connections: int
) -> None:
    sink = start_sink(
        sinks, "127.0.0.2", mx_port, behaviour=SinkBehaviour(fail_first=1, reply=reply)
    )
    gsmtp = relay(connection_idle="30s", retry=["1h"])  # no retry within the test
    send(gsmtp, "jones@foo.com", ["a@remote.test"], subject="refused")
    wait_for(
        lambda: gsmtp.events("message_failed") or gsmtp.events("message_deferred"),
        what="the refusal recorded",
    )
    send(gsmtp, "jones@foo.com", ["b@remote.test"], subject="accepted")
    wait_received(sink, 1)
    assert subjects(sink) == ["accepted"]
    verbs = sink.verbs()
    assert len(verbs) == connections, verbs
    if connections == 1:
        assert transactions_with_rset_between(verbs[0]) == 2
    else:
        assert verbs[0] == ["EHLO", *ONE_TRANSACTION, "QUIT", CLOSED]
        assert transactions_with_rset_between(verbs[1]) == 1
