"""Every transcript in tests/transcripts against a bare session, whole and byte by byte."""

from __future__ import annotations

import pytest

from tests import dialog
from tests.unit.session_driver import SessionWire

NAMES = sorted(p.name for p in dialog.TRANSCRIPTS.glob("*.txt"))


@pytest.mark.parametrize("name", NAMES)
def test_transcript_against_bare_session(name: str) -> None:
    dialog.run(dialog.load(name), SessionWire())


class _ByteAtATime(SessionWire):
    def send(self, data: bytes) -> None:
        for index in range(len(data)):
            self.session.receive_data(data[index : index + 1])
            self.pump()


# Fed one byte at a time every reply must be the same, except where the rule depends on
# bytes arriving together (a pipelining violation is only visible in one batch).
@pytest.mark.parametrize("name", [n for n in NAMES if n != "pipelining_violation.txt"])
def test_transcript_fed_one_byte_at_a_time(name: str) -> None:
    dialog.run(dialog.load(name), _ByteAtATime())


def test_transcript_stores_exactly_the_message() -> None:
    wire = SessionWire()
    dialog.run(dialog.load("rfc5321_example.txt"), wire)
    (envelope,) = wire.stored
    assert str(envelope.sender) == "Smith@bar.com"
    assert [str(r) for r in envelope.recipients] == ["Jones@foo.com", "Brown@foo.com"]
    # "...etc." was sent as is: one leading dot is removed (RFC 5321 §4.5.2).
    assert envelope.content == b"Blah blah blah...\r\n..etc. etc. etc.\r\n"
