"""Red-team findings (session 16): memory of a Maildir delivery of a large message that carries a
planted Delivered-To field (README "Memory": a Maildir delivery writes a large body in
1 MB pieces, so it holds no second copy)."""

from __future__ import annotations

import pytest

from tests.integration.harness import GsmtpProcess, wait_for
from tests.integration.test_body_memory import HEADER, open_data, payload, rss, sampling, stuffed

pytestmark = pytest.mark.xdist_group("heavy")

MiB = 1024 * 1024


def _delivery_growth(gsmtp: GsmtpProcess, pid: int, content: bytes, count: int) -> int:
    baseline = rss(pid)
    with sampling(pid) as sampler:
        with open_data(gsmtp.port) as wire:
            wire.send(stuffed(content) + b".\r\n")
            assert wire.read_reply()[0].startswith("250")
        wait_for(
            lambda: len(gsmtp.maildir_files("jones@foo.com")) == count,
            timeout=60,
            what="the delivery",
        )
    return sampler.peak - baseline


def test_a_planted_field_does_not_multiply_a_large_delivery_s_memory(
    gsmtp_factory,  # type: ignore[no-untyped-def]
) -> None:
    """The same 30 MiB message with and without a planted Delivered-To: the planted
    one's Maildir delivery should hold no more (no second copy of the body)."""
    body = payload(30 * MiB)

    def growth(content: bytes) -> int:
        """A fresh server: one small message delivered, then `content`."""
        gsmtp: GsmtpProcess = gsmtp_factory(
            {"server": {"max_data_memory": "32MB", "max_message_size": "40MB"}}
        )
        assert gsmtp.process is not None
        pid = gsmtp.process.pid
        _delivery_growth(gsmtp, pid, b"Subject: warm\r\n\r\nx\r\n", 1)
        try:
            return _delivery_growth(gsmtp, pid, content, 2)
        finally:
            gsmtp.stop()

    plain = growth(HEADER + body)
    planted = growth(b"Delivered-To: planted@example.com\r\n" + HEADER + body)
    print(f"growth plain {plain / MiB:.0f} MiB, planted {planted / MiB:.0f} MiB")
    assert planted < plain + 16 * MiB, (
        f"plain {plain / MiB:.0f} MiB, planted {planted / MiB:.0f} MiB"
    )
