"""Queue control against a running server (issue 11 item 3): hold keeps a message from
delivery and release lets it go; a flush is acted on at the CLI's SIGUSR1; every change
is an audit line in the server's log; `queue list` marks and `queue summary`; a root CLI
works on a spool owned by the service user as that user."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.harness import GsmtpProcess, SmtpWire, environment, free_port, wait_for
from tests.integration.remote import Sink, start_sink, wait_received


def relay_one(gsmtp: GsmtpProcess, recipient: str, subject: str) -> str:
    """One message from a trusted client, relayed to the smarthost; its queue id."""
    with SmtpWire(gsmtp.port, source="127.0.0.2") as wire:
        wire.read_reply()
        wire.command("EHLO c.example")
        wire.command("MAIL FROM:<jones@foo.com>")
        assert wire.command(f"RCPT TO:<{recipient}>").startswith("250")
        wire.command("DATA")
        wire.send(f"Subject: {subject}\r\n\r\nbody\r\n.\r\n".encode())
        reply = wire.read_reply()[0]
        assert reply.startswith("250"), reply
        return reply.rsplit(" ", 1)[1]


@pytest.fixture
def stuck(
    gsmtp_factory: Callable[..., GsmtpProcess], sinks: dict[str, Sink]
) -> Iterator[tuple[GsmtpProcess, Callable[[], Sink]]]:
    """gsmtp relaying through a smarthost that is down at first (each attempt deferred
    for an hour), and a function that starts the smarthost."""
    port = free_port("127.0.0.3")
    gsmtp = gsmtp_factory({"delivery": {"smarthost": f"127.0.0.3:{port}", "retry": ["1h"]}})
    yield gsmtp, lambda: start_sink(sinks, "127.0.0.3", port)


def deferred(gsmtp: GsmtpProcess, count: int) -> None:
    wait_for(
        lambda: (
            gsmtp.spool_rows("SELECT COUNT(*) FROM recipients WHERE last_error IS NOT NULL")
            == [(count,)]
        ),
        what=f"{count} deferred",
    )


def subjects(sink: Sink) -> list[str]:
    return [
        line.split(b": ", 1)[1].decode()
        for message in sink.received
        for line in message.data.split(b"\r\n")
        if line.startswith(b"Subject: ")
    ]


def test_hold_keeps_a_message_from_delivery_and_release_lets_it_go(
    stuck: tuple[GsmtpProcess, Callable[[], Sink]],
) -> None:
    gsmtp, start_smarthost = stuck
    held = relay_one(gsmtp, "x@remote.example", "held")
    other = relay_one(gsmtp, "y@other.example", "other")
    deferred(gsmtp, 2)
    result = json.loads(gsmtp.cli("queue", "hold", held, "--json").stdout)
    assert result == {"action": "held", "ids": [held], "count": 1}
    stats = gsmtp.cli("queue", "stats").stdout.splitlines()
    assert "held: 1" in stats and "queued: 2" in stats  # recipients keep their status
    listing = gsmtp.cli("queue", "list").stdout
    assert f"{held}!" in listing  # mailq's mark for a held message
    (waiting,) = [line for line in listing.splitlines() if line.startswith(other)]
    assert not waiting.startswith((f"{other}!", f"{other}*"))
    assert "next attempt: " in listing
    sink = start_smarthost()
    assert gsmtp.cli("queue", "flush").stdout == "flushed: 1\n"  # the held one stays
    wait_received(sink, 1)
    assert subjects(sink) == ["other"]
    assert gsmtp.cli("queue", "release", held).stdout.startswith(f"released: {held}\n")
    wait_received(sink, 2)
    assert subjects(sink) == ["other", "held"]
    # Each change is an audit line of the server's: what, which message, from the CLI.
    wait_for(lambda: gsmtp.events("message_released", msg_id=held), what="the audit line")
    assert gsmtp.events("message_held", msg_id=held, source="cli")
    assert gsmtp.events("message_released", msg_id=held, source="cli")
    assert gsmtp.events("queue_flushed", source="cli", recipients=1)


def test_a_flush_is_acted_on_at_the_clis_signal(
    stuck: tuple[GsmtpProcess, Callable[[], Sink]],
) -> None:
    """The CLI wakes the server (SIGUSR1 to the PID in the lock file): the server logs
    the signal, then the flush, forgets the dead smarthost and delivers, without
    waiting out the hour the dead destination was given."""
    gsmtp, start_smarthost = stuck
    relay_one(gsmtp, "x@remote.example", "flushed")
    deferred(gsmtp, 1)
    wait_for(lambda: gsmtp.events("destination_dead"), what="the smarthost dead for 1 h")
    sink = start_smarthost()
    assert gsmtp.cli("queue", "flush", "--domain", "remote.example").stdout == "flushed: 1\n"
    wait_received(sink, 1, timeout=5)
    # The log lines are written out in batches: the delivery may be seen first.
    wait_for(lambda: gsmtp.events("queue_signalled", signal="SIGUSR1"), what="the signal logged")
    (flushed,) = wait_for(
        lambda: gsmtp.events("queue_flushed", source="cli", domain="remote.example"),
        what="the flush logged",
    )
    assert flushed["dead_destinations_forgotten"] == 1


def test_filters_delete_and_summary(
    stuck: tuple[GsmtpProcess, Callable[[], Sink]],
) -> None:
    gsmtp, _ = stuck
    first = relay_one(gsmtp, "a@one.example", "1")
    second = relay_one(gsmtp, "b@two.example", "2")
    deferred(gsmtp, 2)
    listed = json.loads(gsmtp.cli("queue", "list", "--domain", "two.example", "--json").stdout)
    assert [m["id"] for m in listed] == [second]
    assert listed[0]["held"] is False and listed[0]["next_attempt_at"] > 0
    assert gsmtp.cli("queue", "list", "--recipient", "nobody@", "--json").stdout == "[]\n"
    assert gsmtp.cli("queue", "list", "--older-than", "1h", "--json").stdout == "[]\n"
    summary = json.loads(gsmtp.cli("queue", "summary", "--json").stdout)
    assert summary["domains"] == {"one.example": [1] + [0] * 9, "two.example": [1] + [0] * 9}
    text = gsmtp.cli("queue", "summary").stdout.splitlines()
    assert text[0].split() == [
        "T",
        "5",
        "10",
        "20",
        "40",
        "80",
        "160",
        "320",
        "640",
        "1280",
        "1280+",
    ]
    assert text[1].split()[:3] == ["TOTAL", "2", "2"]
    refused = gsmtp.cli("queue", "delete", check=False)
    assert refused.returncode == 1 and "give message ids, filters, or --all" in refused.stderr
    # An empty filter value (`--sender "$UNSET"`) would select every message: refused.
    for command in (
        ("delete", "--sender", ""),
        ("delete", "--recipient", " "),
        ("delete", "--domain", ""),
        ("hold", "--domain", "."),
        ("list", "--sender", ""),
        ("flush", "--domain", ""),
    ):
        empty = gsmtp.cli("queue", *command, check=False)
        assert empty.returncode == 1, command
        assert "an empty value would select every message" in empty.stderr, command
        assert "Traceback" not in empty.stderr
    assert len(gsmtp.spool_rows("SELECT id FROM messages")) == 2
    assert gsmtp.spool_rows("SELECT COUNT(*) FROM messages WHERE held = 1") == [(0,)]
    # A domain is compared as the spool stores it: any case, with or without the dot.
    assert gsmtp.cli("queue", "flush", "--domain", "TWO.example.").stdout == "flushed: 1\n"
    dotted = gsmtp.cli("queue", "list", "--domain", "Two.Example.", "--json").stdout
    assert [m["id"] for m in json.loads(dotted)] == [second]
    assert gsmtp.cli("queue", "delete", "--sender", "jones", "--domain", "one.example").stdout == (
        f"deleted: {first}\n1 message deleted\n"
    )
    assert gsmtp.spool_rows("SELECT id FROM messages") == [(second,)]
    wait_for(lambda: gsmtp.events("message_deleted", msg_id=first, source="cli"), what="audit")
    unknown = gsmtp.cli("queue", "hold", "NOPE", check=False)
    assert unknown.returncode == 1 and "NOPE" in unknown.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the CLI switches to the spool's owner")
def test_a_root_cli_works_on_the_spool_as_its_owner() -> None:
    """Run as root against a spool directory owned by `nobody`: the spool and every file
    SQLite creates beside it belong to nobody; a spool whose directory does not exist
    is refused with a clear message rather than created as root's."""
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="gsmtp-owner-"))
    try:
        base.chmod(0o711)  # nobody must reach its directory inside
        spool_dir = base / "spool"
        spool_dir.mkdir(mode=0o700)
        os.chown(spool_dir, nobody.pw_uid, nobody.pw_gid)
        config = base / "gsmtp.toml"
        config.write_text(f'[spool]\npath = "{spool_dir}/spool.sqlite"\n')

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "gsmtp", *args, "-c", str(config)],
                capture_output=True,
                text=True,
                timeout=60,
                env=environment(),
            )

        for args in (("domain", "add", "foo.com"), ("user", "add", "a@foo.com"), ("queue", "list")):
            result = cli(*args)
            assert result.returncode == 0, result.stderr
        # A lock file left by the server (it names a PID): waking the server reads
        # /proc/locks as ASCII after the switch to nobody, who may not be able to read
        # the interpreter's encodings (a pyenv under /root, 0700): loaded before.
        lock = spool_dir / "spool.sqlite.lock"
        lock.write_text(f"{os.getpid()}\n")
        os.chown(lock, nobody.pw_uid, nobody.pw_gid)
        for args in (("queue", "hold", "--all"), ("queue", "flush"), ("queue", "delete", "--all")):
            result = cli(*args)
            assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        owners = {p.name: (p.stat().st_uid, p.stat().st_gid) for p in spool_dir.iterdir()}
        assert "spool.sqlite" in owners
        assert set(owners.values()) == {(nobody.pw_uid, nobody.pw_gid)}, owners
        config.write_text(f'[spool]\npath = "{base}/missing/spool.sqlite"\n')
        refused = cli("domain", "list")
        assert refused.returncode == 1
        assert "does not exist" in refused.stderr and "install -d -o gsmtp" in refused.stderr
        assert not (base / "missing").exists()
    finally:
        shutil.rmtree(base)
