"""Relay that cannot multiply or loop mail: no next MX after the final dot, no delivery to
ourselves. Real DNS (dnsmasq), real remote MTAs (aiosmtpd on 127.0.0.x)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.harness import GsmtpProcess, environment_has, free_port, wait_for
from tests.integration.remote import Dnsmasq, Sink, SinkBehaviour
from tests.integration.test_relay import bounce_for, delivery_status, send, start_sink

pytestmark = pytest.mark.skipif(
    not environment_has("dnsmasq"), reason="dnsmasq is not installed (apt-get install dnsmasq-base)"
)

RECORDS = [
    "--mx-host=twice.test,mx1.twice.test,10",
    "--mx-host=twice.test,mx2.twice.test,20",
    "--host-record=mx1.twice.test,127.0.0.2",
    "--host-record=mx2.twice.test,127.0.0.3",
    "--mx-host=loop.test,mx.loop.test,10",
    "--host-record=mx.loop.test,127.0.0.1",
    "--mx-host=mirror.test,mx.mirror.test,10",
    "--host-record=mx.mirror.test,127.0.0.2",
]


@pytest.fixture(scope="module")
def dns_server() -> Iterator[Dnsmasq]:
    server = Dnsmasq(RECORDS)
    yield server
    server.stop()


def settings(dns_server: Dnsmasq, port: int, **delivery: Any) -> dict[str, dict[str, Any]]:
    return {
        "server": {"trusted_networks": ["127.0.0.1/32"]},
        "delivery": {
            "nameservers": [f"127.0.0.1:{dns_server.port}"],
            "port": port,
            "connect_timeout": "2s",
            **delivery,
        },
    }


def connections_accepted(gsmtp: GsmtpProcess) -> int:
    return int(gsmtp.metrics()["gsmtp_connections_total"])


def test_connection_lost_after_the_dot_is_deferred_and_never_sent_to_the_next_mx(
    gsmtp_factory: Any, dns_server: Dnsmasq, sinks: dict[str, Sink]
) -> None:
    """Item 4: mx1 takes the data, then drops the connection without answering the
    final dot. Exactly one copy exists (at mx1): mx2 gets nothing in the same attempt,
    and the recipient waits for its next retry, its last error saying why."""
    port = free_port("127.0.0.2")
    first = start_sink(sinks, "127.0.0.2", port, behaviour=SinkBehaviour(drop_after_data=True))
    second = start_sink(sinks, "127.0.0.3", port)
    gsmtp = gsmtp_factory(settings(dns_server, port, retry=["1h"]))
    send(gsmtp, "jones@foo.com", ["a@twice.test"], subject="once")
    rows = wait_for(
        lambda: [
            row for row in gsmtp.spool_rows("SELECT status, last_error FROM recipients") if row[1]
        ],
        timeout=20,
        what="the attempt's result",
    )
    ((status, last_error),) = rows
    assert status == "queued"
    assert last_error.startswith("451 4.4.2 lost connection with mx1.twice.test[127.0.0.2]")
    assert last_error.endswith("message may be delivered twice")
    assert len(first.received) == 1 and b"Subject: once" in first.received[0].data
    assert second.received == [] and second.attempts == 0
    wait_for(lambda: "delivery_unconfirmed" in gsmtp.log(), what="the log line")


def test_an_mx_pointing_at_our_own_listener_bounces_without_connecting(
    gsmtp_factory: Any, dns_server: Dnsmasq
) -> None:
    """loop.test's MX is 127.0.0.1 and the MX port is the one gsmtp listens on: 554
    5.4.6 "loops back to myself", found before connecting (gsmtp accepts exactly one
    connection: ours, which sent the message)."""
    port = free_port()
    config = settings(dns_server, port)
    config["server"]["listen"] = [f"127.0.0.1:{port}"]
    gsmtp = gsmtp_factory(config, start=False)
    gsmtp.port = port
    gsmtp.start()
    before = connections_accepted(gsmtp)
    send(gsmtp, "jones@foo.com", ["a@loop.test"])
    (block,) = delivery_status(bounce_for(gsmtp))
    assert block["Status"] == "5.4.6"
    assert block["Diagnostic-Code"] == "smtp; 554 5.4.6 mail for loop.test loops back to myself"
    assert connections_accepted(gsmtp) == before + 1


def test_a_peer_greeting_with_our_hostname_bounces(
    gsmtp_factory: Any, dns_server: Dnsmasq, sinks: dict[str, Sink]
) -> None:
    """The MX greets as mx.foo.com, gsmtp's own hostname: the mail would loop."""
    port = free_port("127.0.0.2")
    mirror = start_sink(sinks, "127.0.0.2", port, server_hostname="mx.foo.com")
    gsmtp = gsmtp_factory(settings(dns_server, port))
    send(gsmtp, "jones@foo.com", ["a@mirror.test"])
    (block,) = delivery_status(bounce_for(gsmtp))
    assert block["Status"] == "5.4.6"
    assert mirror.received == [] and mirror.attempts == 0
