"""Local delivery in batches, seen from outside: many files share a batch (one fsync of
each new/ per batch, one spool commit), and kill -9 in the middle of it loses nothing."""

from __future__ import annotations

import collections
import threading
import time

from tests.integration.harness import LOCAL_DOMAIN, GsmtpProcess, SmtpWire, wait_for

BOXES = [f"box{n}@{LOCAL_DOMAIN}" for n in range(4)]


def send_many(port: int, connections: int, count: int, tag: str) -> list[str]:
    """`count` messages over `connections` pipelining sessions, spread over BOXES; the
    subjects that were answered 250 (sending stops quietly when the server dies)."""
    acked: list[str] = []

    def session(number: int) -> None:
        try:
            with SmtpWire(port) as wire:
                wire.read_reply()
                wire.command("EHLO c.example")
                for n in range(number, count, connections):
                    rcpt = BOXES[n % len(BOXES)]
                    wire.send(
                        f"MAIL FROM:<a@remote.example>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode()
                    )
                    replies = [wire.read_reply() for _ in range(3)]
                    if [r[:1] and r[0][:3] for r in replies] != ["250", "250", "354"]:
                        return
                    wire.send(f"Subject: {tag} {n}\r\n\r\nbody {n}\r\n.\r\n".encode())
                    reply = wire.read_reply()
                    if not reply or not reply[0].startswith("250"):
                        return
                    acked.append(f"{tag} {n}")
        except OSError:
            return

    threads = [threading.Thread(target=session, args=(c,)) for c in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return acked


def delivered(gsmtp: GsmtpProcess, tag: str) -> list[str]:
    """Subjects of the copies in every box; each copy must be complete."""
    found = []
    marker = f"\nSubject: {tag} ".encode()
    for box in BOXES:
        for file in gsmtp.maildir_files(box):
            content = file.read_bytes()
            number = content.split(marker, 1)[1].split(b"\n", 1)[0]
            assert content.endswith(b"\n\nbody " + number + b"\n"), f"partial file {file}"
            found.append(f"{tag} {number.decode()}")
    return found


def boxes_added(gsmtp: GsmtpProcess) -> GsmtpProcess:
    for box in BOXES:
        gsmtp.cli("user", "add", box)
    return gsmtp


def test_deliveries_due_together_share_batches(gsmtp_factory) -> None:  # type: ignore[no-untyped-def]
    """200 messages queued while the Maildir root is blocked, all due at the next start:
    they are written in batches, each fsyncing its new/ directories once, so there are
    far fewer batches and directory fsyncs than files (one each without batches)."""
    gsmtp = boxes_added(gsmtp_factory({"delivery": {"max_per_domain": 100}}, start=False))
    gsmtp.maildir.write_text("not a directory: every delivery is deferred")
    gsmtp.start()
    assert len(send_many(gsmtp.port, 5, 200, "batch")) == 200
    gsmtp.stop()
    # All due before the restart, as this test means: with retry "1s" and its jitter,
    # the deferrals made while the 200 arrived fall due over a second or two, and a
    # restart inside that window delivered them as they fell due, a few a batch (122
    # batches and 180 directory fsyncs once, on a loaded machine). A row still claimed
    # at the stop is due at the start (its lease is released), whatever its time says.
    due = "SELECT MAX(next_attempt_at) FROM recipients WHERE claimed_due IS NULL"
    wait_for(
        lambda: (gsmtp.spool_rows(due)[0][0] or 0) <= time.time(),
        timeout=30,
        what="every copy due",
    )
    gsmtp.maildir.unlink()
    gsmtp.start()
    found = wait_for(
        lambda: len(f := delivered(gsmtp, "batch")) >= 200 and f, timeout=60, what="200 files"
    )
    assert sorted(found) == sorted(f"batch {n}" for n in range(200))
    # The counters move once a batch's new/ directories are fsynced, just after its
    # files appear there.
    samples = wait_for(
        lambda: (s := gsmtp.metrics()).get("gsmtp_maildir_files_total", 0) >= 200 and s,
        timeout=10,
        what="the batch counters",
    )
    assert samples["gsmtp_maildir_files_total"] == 200
    batches = samples["gsmtp_maildir_batches_total"]
    directories = samples["gsmtp_maildir_directory_fsyncs_total"]
    assert batches <= 150 and directories <= 150, (batches, directories)  # 200 each unbatched


def test_kill9_during_batched_local_delivery_loses_nothing(gsmtp_factory) -> None:  # type: ignore[no-untyped-def]
    """kill -9 while clients send and batches are being written, restart: every message
    answered 250 is in a Maildir, complete; a copy delivered twice (linked, not yet
    recorded) is allowed and counted, a missing one is not."""
    gsmtp = boxes_added(gsmtp_factory())
    result: list[list[str]] = []
    sender = threading.Thread(target=lambda: result.append(send_many(gsmtp.port, 8, 2000, "k9")))
    sender.start()
    wait_for(lambda: len(delivered(gsmtp, "k9")) >= 150, timeout=60, what="150 deliveries")
    gsmtp.kill9()
    sender.join(timeout=120)
    acked = result[0]
    assert len(acked) >= 150
    gsmtp.start()
    wait_for(
        lambda: gsmtp.spool_rows("SELECT COUNT(*) FROM messages") == [(0,)],
        timeout=120,
        what="every message delivered",
    )
    copies = collections.Counter(delivered(gsmtp, "k9"))
    missing = [subject for subject in acked if copies[subject] == 0]
    assert missing == [], f"{len(missing)} acknowledged messages lost"
    duplicates = sum(count - 1 for count in copies.values())
    print(f"{len(acked)} acknowledged, {len(copies)} delivered, {duplicates} duplicates")
    assert duplicates <= len(acked)
