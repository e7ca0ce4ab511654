"""The accept step: what gsmtp stores for a message, whoever produced it.

No I/O, no clock (time comes in as an argument). A message accepted from a client gets
its id, its Received: header (RFC 5321 §4.4) and its stored envelope here; a notice
gsmtp writes itself (a bounce, a delay warning) is built here too, so there is one
producer of stored mail and every stored message has the same shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from gsmtp.delivery import dsn
from gsmtp.message import (
    MessageId,
    NewMessage,
    QueuedMessage,
    RecipientResult,
    SpooledContent,
    new_message_id,
)
from gsmtp.protocol.session import Envelope
from gsmtp.protocol.trace import received_header, rfc5322_date

# The DKIM-Signature header(s) for a notice (b"": unsigned), given its content and id.
NoticeSigner = Callable[[bytes, MessageId], bytes]


def _unsigned(content: bytes, notice_id: MessageId) -> bytes:
    return b""


class Acceptor:
    """Turns an accepted envelope into the message to store. `sign_notice`: signs the
    notices built here (gsmtp.dkim, run in a thread by its caller's choice)."""

    def __init__(self, hostname: str, *, sign_notice: NoticeSigner = _unsigned) -> None:
        self.hostname = hostname
        self._sign_notice = sign_notice
        self._date_cache = (-1, "")

    def new_id(self, now: float) -> MessageId:
        """An id for a message whose body is written out before it is accepted (a large
        body's parts are filed under it as they arrive)."""
        return new_message_id(now)

    def accept(
        self,
        envelope: Envelope,
        *,
        client_ip: str,
        tls: bool,
        now: float,
        authenticated: bool = False,
        message_id: MessageId | None = None,
        spooled: SpooledContent | None = None,
        signature: bytes = b"",
    ) -> NewMessage:
        """`authenticated`: the client used AUTH; the Received header then says so
        (RFC 3848: ESMTPA, ESMTPSA with TLS), without naming the user. `spooled`: the
        content the server wrote into the spool under `message_id` while it arrived
        (`envelope.content` is then the rest of it): the Received header is
        stored in front of it, the rest is stored after it, and no content is copied
        into one buffer. `signature`: the DKIM-Signature header(s) of the content, put
        first (RFC 6376 §5.6: prepended)."""
        if message_id is None:
            message_id = new_message_id(now)
        if spooled is not None:
            spooled = replace(spooled, last=envelope.content)
        recipients = tuple(str(r) for r in envelope.recipients)
        trace = received_header(
            helo=envelope.helo,
            client_ip=client_ip,
            client_name="unknown",
            hostname=self.hostname,
            protocol=("ESMTP" if envelope.esmtp else "SMTP")
            + ("S" if tls else "")
            + ("A" if authenticated else ""),
            message_id=message_id,
            recipient=recipients[0] if len(recipients) == 1 else None,
            date=self._date(now),
        )
        return NewMessage(
            id=message_id,
            sender=str(envelope.sender),
            recipients=recipients,
            body=signature + trace + (envelope.content if spooled is None else b""),
            received_at=now,
            client=client_ip,
            helo=envelope.helo,
            smtputf8=envelope.smtputf8,
            ret=envelope.ret,
            envid=envelope.envid,
            dsn=envelope.dsn,
            spooled=spooled,
        )

    def bounce(
        self,
        message: QueuedMessage,
        failed: Sequence[RecipientResult],
        *,
        now: float,
        recipient: str | None = None,
    ) -> NewMessage:
        """The RFC 3464 failure notice to the sender of `message`, or to `recipient` (the
        postmaster, when the failed message was a notice itself). Never called for the
        null sender: a bounce is never bounced (RFC 5321 §6.1)."""
        entries = [(result, dsn.Action.FAILED) for result in failed]
        return self.notice(message, entries, now=now, recipient=recipient)

    def delay_warning(
        self,
        message: QueuedMessage,
        delayed: Sequence[RecipientResult],
        *,
        now: float,
        retry_until: float,
    ) -> NewMessage:
        """The RFC 3464 `Action: delayed` notice to the sender of `message`."""
        entries = [(result, dsn.Action.DELAYED) for result in delayed]
        return self.notice(message, entries, now=now, retry_until=retry_until)

    def notice(
        self,
        message: QueuedMessage,
        entries: Sequence[tuple[RecipientResult, dsn.Action]],
        *,
        now: float,
        retry_until: float | None = None,
        recipient: str | None = None,
    ) -> NewMessage:
        """An RFC 3464 notice of one kind (failed; delayed; delivered or relayed) to the
        sender of `message` (or to `recipient`), each recipient with the action
        `dsn.notice_due` gave it (never called for the null sender: a notice is never
        answered with one)."""
        notice_id = new_message_id(now)
        to = message.sender if recipient is None else recipient
        content = dsn.build_notice(
            message,
            entries,
            hostname=self.hostname,
            notice_id=notice_id,
            now=now,
            retry_until=retry_until,
            to=to,
        )
        return self._notice(notice_id, to, content, now, message.smtputf8)

    def _notice(
        self, notice_id: MessageId, to: str, content: bytes, now: float, smtputf8: bool
    ) -> NewMessage:
        """A notice is stored like any message, from the null sender; signed when a key
        matches the host name's domain."""
        return NewMessage(
            id=notice_id,
            sender="",
            recipients=(to,),
            body=self._sign_notice(content, notice_id) + content,
            received_at=now,
            client="localhost",
            helo=self.hostname,
            smtputf8=smtputf8,
        )

    def _date(self, now: float) -> str:
        """RFC 5322 date, formatted once per second (it is on every message's path)."""
        second = int(now)
        if self._date_cache[0] != second:
            self._date_cache = (second, rfc5322_date(second))
        return self._date_cache[1]
