"""SIGTERM with a client in the middle of DATA: the grace, then 421 4.3.2, then exit 0."""

from __future__ import annotations

import signal
import time

from tests.integration.conftest import Factory
from tests.integration.harness import SmtpWire

GRACE = 2.0


def test_sigterm_cuts_a_session_mid_data_with_421_at_the_end_of_the_grace(
    gsmtp_factory: Factory,
) -> None:
    """Issue 7 item 10: the session used to be cut without a reply, and the process exited
    after grace + 1 s + 2 × min(grace, 5). DESIGN.md: exit 0 within grace + 2 s."""
    gsmtp = gsmtp_factory({"server": {"shutdown_grace": f"{GRACE:g}s"}})
    stalled = SmtpWire(gsmtp.port, timeout=GRACE + 5)
    stalled.read_reply()
    stalled.command("EHLO c.example")
    stalled.command("MAIL FROM:<a@remote.example>")
    stalled.command("RCPT TO:<jones@foo.com>")
    assert stalled.command("DATA").startswith("354")
    stalled.send(b"Subject: never finished\r\n\r\nthe client stops here\r\n")
    finishing = SmtpWire(gsmtp.port, timeout=GRACE + 5)
    finishing.read_reply()
    finishing.command("EHLO c.example")
    finishing.command("MAIL FROM:<a@remote.example>")
    finishing.command("RCPT TO:<jones@foo.com>")
    assert finishing.command("DATA").startswith("354")
    finishing.send(b"Subject: finished in the grace\r\n\r\n")

    signalled = time.monotonic()
    gsmtp.signal(signal.SIGTERM)
    finishing.send(b"body\r\n.\r\n")  # open transactions may still finish
    assert finishing.read_reply()[0].startswith("250 2.0.0 Ok: queued as")
    assert finishing.read_reply() == [
        "421 4.3.2 Service shutting down, closing transmission channel"
    ]

    assert stalled.read_reply() == ["421 4.3.2 Service shutting down, closing transmission channel"]
    cut_after = time.monotonic() - signalled
    assert cut_after >= GRACE * 0.9, f"cut after {cut_after:.2f}s: the grace was not given"
    assert stalled.read_reply() == [], "closed after the 421"
    remaining = GRACE + 2.0 - (time.monotonic() - signalled)
    assert gsmtp.wait(timeout=max(remaining, 0.1)) == 0, "not exited within grace + 2 s"
    stalled.close()
    finishing.close()
    queued = gsmtp.spool_rows("SELECT COUNT(*) FROM messages")
    delivered = gsmtp.maildir_files("jones@foo.com")
    assert queued == [(1,)] or len(delivered) == 1, "the finished message, and it alone"
