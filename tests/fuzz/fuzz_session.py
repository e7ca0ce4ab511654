"""atheris harness: the sans-I/O SMTP session fed arbitrary bytes in arbitrary chunks (P-53).

    python tests/fuzz/fuzz_session.py -max_total_time=30 -artifact_prefix=var/fuzz/ \
        var/fuzz/session tests/fuzz/seeds/session

An input is: one byte of flags (bit 0: STARTTLS offered; bit 1: RCPTs to odd-length
addresses refused; bit 2: the spool refuses messages; bit 3: small limits; bit 4: the
free-space reserve refuses MAIL; bit 5: the shell takes the content as it arrives, as
the server does with a large body), one byte of
chunk size (1-256), then the bytes a client sends. A failing input is written as
`var/fuzz/crash-<sha1>`; `python tests/fuzz/fuzz_session.py var/fuzz/crash-<sha1>` runs it
again, and `tests/unit/test_fuzz_seeds.py` runs every seed and crash file kept under
tests/fuzz/ with pytest.

What must hold, whatever the bytes: no exception leaves the session; the output is only
whole replies (`ddd` + space or hyphen, CRLF-terminated); a closed session says nothing
more; a message is handed over at most once per `<CRLF>.<CRLF>` in the input (smuggling),
never holding a bare CR or LF, never over the size limit, never without a recipient.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's gsmtp

from gsmtp.protocol import replies
from gsmtp.protocol.session import (
    NEED_DATA,
    Limits,
    MailFrom,
    MessageReceived,
    RcptTo,
    SmtpSession,
    StartTlsRequested,
    VerifyRequested,
)

_REPLY_LINE = re.compile(rb"[2-5][0-9][0-9][ -][^\r\n]*\r\n")
SMALL = Limits(
    max_message_size=64, max_recipients=3, max_errors=5, soft_error_limit=2, junk_command_limit=3
)


def check_one(data: bytes) -> None:
    """Run one input; raise AssertionError (or whatever escapes) when something is wrong."""
    if len(data) < 2:
        return
    flags, chunk, stream = data[0], data[1] + 1, data[2:]
    limits = SMALL if flags & 8 else Limits()
    session = SmtpSession(limits, hostname="mx.fuzz.example", tls_available=bool(flags & 1))
    output = bytearray(session.start())
    messages = 0
    taken = bytearray()  # content taken during the DATA being received
    for start in range(0, len(stream), chunk):
        if session.closed:
            session.receive_data(stream[start : start + chunk])
            assert session.next_event() is NEED_DATA
            assert session.data_to_send() == b"", "output after the close"
            continue
        session.receive_data(stream[start : start + chunk])
        if flags & 32 and session.receiving_data:
            taken += session.take_data()
        while (event := session.next_event()) is not NEED_DATA:
            if isinstance(event, MailFrom):
                full = flags & 16  # the free-space reserve refuses
                session.respond(event, replies.INSUFFICIENT_STORAGE if full else replies.SENDER_OK)
            elif isinstance(event, RcptTo):
                refuse = flags & 2 and len(str(event.address)) % 2
                session.respond(event, replies.NO_SUCH_USER if refuse else replies.RECIPIENT_OK)
            elif isinstance(event, MessageReceived):
                messages += 1
                check_envelope(event, limits, bytes(taken))
                stored = replies.SPOOL_ERROR if flags & 4 else replies.queued("FUZZ")
                session.respond(event, stored)
            elif isinstance(event, VerifyRequested):
                session.respond(event, replies.CANNOT_VRFY)
            elif isinstance(event, StartTlsRequested):
                session.respond(event, replies.READY_FOR_TLS)
        if not session.receiving_data:
            taken.clear()  # that DATA ended (its message checked above, or refused)
        assert session.error_delays() >= 0
        output += session.data_to_send()
    check_replies(bytes(output))
    assert messages <= stream.count(b"\r\n.\r\n"), "a message without its end of data"


def check_envelope(event: MessageReceived, limits: Limits, taken: bytes = b"") -> None:
    """`taken`: what the shell took of the content before the envelope's rest."""
    envelope = event.envelope
    content = taken + envelope.content
    assert envelope.recipients, "a message without recipients"
    assert len(content) <= limits.max_message_size
    assert content == b"" or content.endswith(b"\r\n")
    crlf = content.count(b"\r\n")
    assert content.count(b"\n") == crlf and content.count(b"\r") == crlf, "bare CR or LF"


def check_replies(output: bytes) -> None:
    position = 0
    for match in _REPLY_LINE.finditer(output):
        assert match.start() == position, f"not a reply line: {output[position:][:80]!r}"
        position = match.end()
    assert position == len(output), f"trailing output: {output[position:][:80]!r}"


def fuzz_one_input(data: bytes) -> None:
    """The libFuzzer entry point."""
    check_one(data)


def main() -> None:
    import atheris

    atheris.instrument_all()
    atheris.Setup(sys.argv, fuzz_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
