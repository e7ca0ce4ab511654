"""DSN (RFC 3461) end to end on a real gsmtp: the parameters are accepted, stored with
the message, and passed on to a next hop that offers DSN, never to one that does not.
The next hop is an aiosmtpd sink used as the smarthost (no DNS needed)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from gsmtp.delivery import dsn
from gsmtp.delivery.smarthost import Smarthost
from gsmtp.delivery.smtp import SmtpDeliverer
from gsmtp.message import MessageId, Notify, Outcome, QueuedMessage, RecipientDsn, Ret
from tests.integration.harness import GsmtpProcess, SmtpWire, free_port, wait_for
from tests.integration.remote import Sink, wait_received

SINK_HOST = "127.0.0.5"


@pytest.fixture
def sinks() -> Iterator[list[Sink]]:
    started: list[Sink] = []
    yield started
    for sink in started:
        sink.stop()


def relay_through(gsmtp_factory: Any, port: int) -> GsmtpProcess:
    process: GsmtpProcess = gsmtp_factory(
        {
            "server": {"trusted_networks": ["127.0.0.1/32"]},
            "delivery": {
                "smarthost": f"{SINK_HOST}:{port}",
                "retry": ["1s"],
                "connect_timeout": "2s",
            },
        }
    )
    return process


def send(gsmtp: GsmtpProcess, mail: str, rcpts: list[str]) -> None:
    with SmtpWire(gsmtp.port) as wire:
        wire.read_reply()
        wire.send(b"EHLO client.example\r\n")
        assert "250-DSN" in wire.read_reply()
        assert wire.command(f"MAIL FROM:<bob@remote.example> {mail}") == "250 2.1.0 Sender ok"
        for rcpt in rcpts:
            assert wire.command(f"RCPT TO:{rcpt}") == "250 2.1.5 Recipient ok"
        assert wire.command("DATA").startswith("354")
        wire.send(b"Subject: dsn\r\n\r\nbody\r\n.\r\n")
        assert wire.read_reply()[0].startswith("250 2.0.0")


def test_parameters_are_stored_with_the_message(gsmtp_factory: Any) -> None:
    """Nothing listens at the smarthost: the remote recipient stays queued, so the rows
    are still there after the local one is delivered."""
    gsmtp = relay_through(gsmtp_factory, free_port(SINK_HOST))
    send(
        gsmtp,
        "RET=HDRS ENVID=x",
        [
            "<jones@foo.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@b",
            "<r@remote.test> NOTIFY=NEVER ORCPT=rfc822;R+2Bx@remote.test",
            "<brown@foo.com>",
        ],
    )
    wait_for(lambda: gsmtp.maildir_files("jones@foo.com"), what="the local delivery")
    # (jones asked NOTIFY=SUCCESS: a success notice from <> may be queued beside it.)
    assert gsmtp.spool_rows("SELECT dsn_ret, dsn_envid FROM messages WHERE sender != ''") == [
        ("HDRS", "x")
    ]
    assert gsmtp.spool_rows(
        "SELECT address, dsn_notify, dsn_orcpt FROM recipients"
        " WHERE message_id IN (SELECT id FROM messages WHERE sender != '') ORDER BY address"
    ) == [
        ("brown@foo.com", None, None),
        ("jones@foo.com", "SUCCESS,FAILURE", "rfc822;a@b"),
        ("r@remote.test", "NEVER", "rfc822;R+x@remote.test"),
    ]


@pytest.mark.parametrize("offers_dsn", [True, False], ids=["dsn-peer", "plain-peer"])
def test_parameters_go_on_only_to_a_peer_that_offers_dsn(
    gsmtp_factory: Any, sinks: list[Sink], offers_dsn: bool
) -> None:
    port = free_port(SINK_HOST)
    sink = Sink(SINK_HOST, port, dsn=offers_dsn)
    sinks.append(sink)
    gsmtp = relay_through(gsmtp_factory, port)
    send(
        gsmtp,
        "RET=FULL ENVID=QQ+2B1",
        [
            "<a@remote.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;A+2Bx@remote.test",
            "<b@remote.test>",
            "<c@remote.test> NOTIFY=NEVER",
        ],
    )
    # The message, and for a peer without DSN our own "relayed" notice to the sender, since
    # a@ asked NOTIFY=SUCCESS (RFC 3461 §5.2.2); a DSN peer reports success itself.
    received = wait_received(sink, count=1 if offers_dsn else 2)
    message = next(r for r in received if r.sender == "bob@remote.example")
    assert sorted(message.recipients) == ["a@remote.test", "b@remote.test", "c@remote.test"]
    mail, *rcpts = [c for c in sink.commands if "bob@remote.example" in c or "RCPT" in c][:4]
    parameters = mail.split()[2:]
    rcpt_lines = sorted(rcpts)
    if offers_dsn:
        assert "RET=FULL" in parameters and "ENVID=QQ+2B1" in parameters
        assert rcpt_lines == [
            "RCPT TO:<a@remote.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;A+2Bx@remote.test",
            "RCPT TO:<b@remote.test>",
            "RCPT TO:<c@remote.test> NOTIFY=NEVER",
        ]
    else:
        assert not [p for p in parameters if p.startswith(("RET=", "ENVID="))], mail
        assert rcpt_lines == [f"RCPT TO:<{r}@remote.test>" for r in "abc"]
    wait_for(
        lambda: gsmtp.spool_rows("SELECT COUNT(*) FROM messages") == [(0,)], what="empty spool"
    )
    notices = [r for r in sink.received if r.sender in ("", "<>")]
    if offers_dsn:
        assert notices == []
    else:
        (notice,) = notices
        assert notice.recipients == ["bob@remote.example"]
        assert b"Action: relayed" in notice.data and b"a@remote.test" in notice.data
        assert b"Original-Envelope-Id: QQ+1" in notice.data
        assert b"b@remote.test" not in notice.data.split(b"message/delivery-status")[1]


class _NoDns:
    """The smarthost is an address: no lookup may happen."""

    def mail_hosts(self, domain: str) -> list[str]:
        raise AssertionError(f"looked up the MX of {domain}")

    def addresses(self, host: str) -> list[str]:
        raise AssertionError(f"looked up {host}")


@pytest.mark.parametrize("offers_dsn", [True, False], ids=["dsn-peer", "plain-peer"])
def test_the_smtp_backend_says_whether_the_peer_took_the_parameters(
    sinks: list[Sink], offers_dsn: bool
) -> None:
    """RFC 3461 §5.2.2: relayed to a peer without DSN, NOTIFY=SUCCESS gets a "relayed"
    notice from us; to a DSN peer, none (the parameters went on with the message)."""
    port = free_port(SINK_HOST)
    sinks.append(Sink(SINK_HOST, port, dsn=offers_dsn))
    deliverer = SmtpDeliverer(
        resolver=_NoDns(), helo_name="gsmtp.test", smarthost=Smarthost(SINK_HOST, port)
    )
    message = QueuedMessage(
        MessageId("M1"),
        "bob@remote.example",
        b"Subject: x\r\n\r\nbody\r\n",
        0.0,
        False,
        ret=Ret.HDRS,
        dsn={"a@remote.test": RecipientDsn(frozenset({Notify.SUCCESS}))},
    )
    results = deliverer.deliver(message, ["a@remote.test", "b@remote.test"])
    assert [(r.outcome, r.peer_dsn) for r in results] == [(Outcome.DELIVERED, offers_dsn)] * 2
    due = [
        dsn.notice_due(message.recipient_dsn(r.address).notify, dsn.delivery_event(r))
        for r in results
    ]
    assert due == ([None, None] if offers_dsn else [dsn.Action.RELAYED, None])
