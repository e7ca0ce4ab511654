"""Bounded memory (issue 9, L-16): bodies are written to the spool as they arrive, one
budget bounds the bodies of all connections, and nothing of a message that is not
stored stays behind."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.harness import GsmtpProcess, SmtpWire, wait_for

MiB = 1024 * 1024
CHUNK = 256 * 1024
HEADER = b"From: a@remote.example\r\nTo: jones@foo.com\r\nSubject: big\r\n\r\n"


def payload(size: int) -> bytes:
    """`size` bytes of CRLF lines, every 50th with a leading dot (doubled on the wire)."""
    lines = [
        (b"." if number % 50 == 0 else b"") + b"%07d " % number + b"y" * 70 + b"\r\n"
        for number in range(size // 80 + 1)
    ]
    return b"".join(lines)[:size].rsplit(b"\r\n", 1)[0] + b"\r\n"


def stuffed(content: bytes) -> bytes:
    """RFC 5321 §4.5.2, as a client sends it."""
    return (b"\r\n" + content).replace(b"\r\n.", b"\r\n..")[2:]


def rss(pid: int) -> int:
    """The process's resident set, in bytes (VmRSS in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@dataclass
class RssSampler:
    """Samples a process's RSS on a thread until stopped; `peak` is the largest seen."""

    pid: int
    peak: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.wait(0.05):
            self.sample()

    def sample(self) -> None:
        self.peak = max(self.peak, rss(self.pid))
        self.samples += 1


@contextmanager
def sampling(pid: int) -> Iterator[RssSampler]:
    sampler = RssSampler(pid)
    thread = threading.Thread(target=sampler.run, daemon=True)
    thread.start()
    try:
        yield sampler
    finally:
        sampler._stop.set()
        thread.join(timeout=5)
        sampler.sample()


def open_data(port: int, source: str = "127.0.0.1", recipient: str = "jones@foo.com") -> SmtpWire:
    """A connection that got 354 for one message to `recipient`."""
    wire = SmtpWire(port, source=source, timeout=60)
    wire.read_reply()
    assert wire.command("EHLO c.example").startswith("250")
    assert wire.command("MAIL FROM:<a@remote.example>").startswith("250")
    assert wire.command(f"RCPT TO:<{recipient}>").startswith("250")
    assert wire.command("DATA").startswith("354")
    return wire


def send_slowly(wire: SmtpWire, data: bytes, pause: float) -> None:
    view = memoryview(data)
    for start in range(0, len(data), CHUNK):
        wire.send(view[start : start + CHUNK])
        if pause:
            time.sleep(pause)  # the shape of the load: a slow client, not a wait for a result


def parts_of_unstored_messages(gsmtp: GsmtpProcess) -> int:
    return int(
        gsmtp.spool_rows(
            "SELECT COUNT(*) FROM body_parts WHERE message_id NOT IN (SELECT id FROM messages)"
        )[0][0]
    )


def delivered_bodies(gsmtp: GsmtpProcess) -> dict[str, tuple[int, str]]:
    """Delivered copies by their client's tag: (size, sha256) of the content after our
    own header lines (Return-Path, Delivered-To, Received), in LF form."""
    found = {}
    for file in gsmtp.maildir_files("jones@foo.com"):
        content = file.read_bytes()
        start = content.find(b"\nFrom: a@remote.example\n") + 1
        assert start > 0, f"no original header in {file}"
        body = memoryview(content)[start:]
        tag = bytes(content[-40:]).rsplit(b"tag ", 1)[1].strip().decode()
        found[tag] = (len(body), hashlib.sha256(body).hexdigest())
    return found


def test_fifty_clients_sending_20mb_slowly_keep_memory_bounded(gsmtp_factory) -> None:  # type: ignore[no-untyped-def]
    """L-16: 50 clients at once, each 20 MB in 256 KiB writes with a pause after each:
    the server's RSS grows by less than max_data_memory + 64 MB, during the transfer
    and at the end, and every message answered 250 is delivered intact."""
    clients, size, budget = 50, 20 * MiB, 64 * MiB
    gsmtp = gsmtp_factory({"server": {"max_data_memory": "64MB", "max_message_size": "35MB"}})
    base = HEADER + payload(size)
    wire_base = stuffed(base)
    lf_base = hashlib.sha256(base.replace(b"\r\n", b"\n"))
    assert gsmtp.process is not None
    pid = gsmtp.process.pid
    # A first message (small) warms the server up before the baseline is taken.
    with open_data(gsmtp.port) as wire:
        wire.send(b"Subject: warm\r\n\r\nx\r\n.\r\n")
        assert wire.read_reply()[0].startswith("250")
    wait_for(lambda: len(gsmtp.maildir_files("jones@foo.com")) == 1, what="the warm-up delivery")
    for file in gsmtp.maildir_files("jones@foo.com"):
        file.unlink()
    baseline = rss(pid)

    replies: dict[str, str] = {}
    errors: list[BaseException] = []

    def client(number: int) -> None:
        tag = f"{number:03d}"
        try:
            with open_data(gsmtp.port, source=f"127.0.1.{number + 1}") as wire:
                send_slowly(wire, wire_base, 0.02)
                wire.send(f"tag {tag}\r\n.\r\n".encode())
                replies[tag] = wire.read_reply()[0]
        except BaseException as error:
            errors.append(error)

    started = time.monotonic()
    with sampling(pid) as sampler:
        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not errors, errors[0]
        assert all(reply.startswith("250 2.0.0") for reply in replies.values()), replies
        assert len(replies) == clients
        wait_for(
            lambda: len(gsmtp.maildir_files("jones@foo.com")) == clients,
            timeout=90,
            what="every delivery",
        )
    transfer = time.monotonic() - started
    growth = sampler.peak - baseline
    assert sampler.samples > 20
    assert growth < budget + 64 * MiB, f"RSS grew by {growth / MiB:.0f} MiB in {transfer:.0f}s"

    expected = {}
    for number in range(clients):
        tag = f"{number:03d}"
        digest = lf_base.copy()
        digest.update(f"tag {tag}\n".encode())
        expected[tag] = (len(base) + len(f"tag {tag}\n"), digest.hexdigest())
    assert delivered_bodies(gsmtp) == expected
    wait_for(lambda: gsmtp.spool_rows("SELECT COUNT(*) FROM body_parts") == [(0,)], what="parts")
