"""RFC 3461 parameters at rest: the accept step copies them from the envelope, the spool
stores them in their columns and hands them to delivery with the claimed message."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gsmtp import db
from gsmtp.acceptance import Acceptor
from gsmtp.message import MessageId, NewMessage, Notify, QueuedMessage, RecipientDsn, Ret
from gsmtp.protocol.address import Address
from gsmtp.protocol.dsnparams import NEVER
from gsmtp.protocol.session import Envelope
from gsmtp.spool import Spool
from gsmtp.writer import GroupCommitter


@pytest.fixture
def spool_path(tmp_path: Path) -> str:
    return str(tmp_path / "spool.sqlite")


@pytest.fixture
def spool(spool_path: str) -> Iterator[Spool]:
    writer = GroupCommitter(spool_path)
    yield Spool(writer, db.connect(spool_path))
    writer.stop()


JONES = RecipientDsn(frozenset({Notify.SUCCESS, Notify.FAILURE}), "rfc822;a@b")


def accepted() -> NewMessage:
    envelope = Envelope(
        helo="c.example",
        sender=Address("bob", "remote.example"),
        recipients=(Address("jones", "foo.com"), Address("brown", "foo.com")),
        content=b"Subject: x\r\n\r\nbody\r\n",
        smtputf8=False,
        esmtp=True,
        ret=Ret.HDRS,
        envid="x",
        dsn={"jones@foo.com": JONES, "brown@foo.com": RecipientDsn(NEVER)},
    )
    return Acceptor("mx.foo.com").accept(envelope, client_ip="192.0.2.1", tls=False, now=100.0)


def test_the_accept_step_copies_the_parameters() -> None:
    message = accepted()
    assert (message.ret, message.envid) == (Ret.HDRS, "x")
    assert message.dsn == {"jones@foo.com": JONES, "brown@foo.com": RecipientDsn(NEVER)}


def test_stored_in_their_columns(spool: Spool, spool_path: str) -> None:
    spool.enqueue(accepted())
    reader = db.connect(spool_path)
    assert db.query(reader, "SELECT dsn_ret, dsn_envid FROM messages") == [("HDRS", "x")]
    assert db.query(
        reader, "SELECT address, dsn_notify, dsn_orcpt FROM recipients ORDER BY address"
    ) == [("brown@foo.com", "NEVER", None), ("jones@foo.com", "SUCCESS,FAILURE", "rfc822;a@b")]


def test_a_message_loaded_for_delivery_carries_them(spool: Spool) -> None:
    plain = NewMessage(
        MessageId("M2"), "s@r.example", ("c@foo.com",), b"S: y\r\n\r\n", 100.0, "c", "h"
    )
    asked = accepted()
    spool.enqueue(asked)
    spool.enqueue(plain)
    message = spool.load_message(asked.id)
    assert isinstance(message, QueuedMessage)
    assert (message.ret, message.envid) == (Ret.HDRS, "x")
    assert message.recipient_dsn("jones@foo.com") == JONES
    assert message.recipient_dsn("brown@foo.com") == RecipientDsn(NEVER)
    other = spool.load_message(MessageId("M2"))
    assert isinstance(other, QueuedMessage)
    assert (other.ret, other.envid, dict(other.dsn)) == (None, None, {})
    assert other.recipient_dsn("c@foo.com") == RecipientDsn()
