"""A spool written from outside (the `sqlite3` shell, foreign keys off) while the server
was stopped: rows that do not decode, envelope addresses with line breaks, recipients
whose message was deleted. The bad message is set aside and listed, the rest flows,
the CLI shows everything escaped and never a traceback."""

from __future__ import annotations

import time

import pytest

from gsmtp import db
from gsmtp.message import MessageId, NewMessage
from gsmtp.spool import insert_messages
from tests.integration.harness import GsmtpProcess, wait_for

USER = "jones@foo.com"

# 'j\xffones@foo.com', 'SEED0\xff', 'a\xff@b.example': TEXT that is not UTF-8.
NOT_UTF8 = {
    "address": "UPDATE recipients SET address = CAST(X'6AFF6F6E657340666F6F2E636F6D' AS TEXT)"
    " WHERE message_id = 'SEED000000'",
    "message_id": "UPDATE recipients SET message_id = CAST(X'5345454430FF' AS TEXT)"
    " WHERE message_id = 'SEED000000'",
    "sender": "UPDATE messages SET sender = CAST(X'61FF40622E6578616D706C65' AS TEXT)"
    " WHERE id = 'SEED000000'",
}
SHOWN = {
    "address": "j\ufffdones@foo.com",
    "message_id": "SEED0\ufffd",
    "sender": "a\ufffd@b.example",
}


def seed_and_damage(gsmtp: GsmtpProcess, count: int, *statements: str) -> None:
    """`count` messages for USER (SEED000000...), due now, then the statements run as
    the sqlite3 shell would (foreign keys off), all before the server starts."""
    now = time.time()
    connection = db.connect(str(gsmtp.spool_path))
    with db.transaction(connection):
        insert_messages(
            connection,
            [
                NewMessage(
                    MessageId(f"SEED{n:06d}"),
                    USER,
                    (USER,),
                    b"Subject: m%d\r\n\r\nbody\r\n" % n,
                    now,
                    "192.0.2.1",
                    "seed.example",
                )
                for n in range(count)
            ],
        )
    connection.execute("PRAGMA foreign_keys=OFF")
    for statement in statements:
        connection.execute(statement)
    connection.close()


def assert_cli_works(gsmtp: GsmtpProcess, *args: str) -> str:
    result = gsmtp.cli(*args, check=False)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    return result.stdout


@pytest.mark.parametrize("case", list(NOT_UTF8))
def test_text_that_is_not_utf8_sets_one_message_aside_and_the_rest_flows(
    gsmtp_factory, case: str
) -> None:  # type: ignore[no-untyped-def]
    """Red-team finding: an address or message id that is not UTF-8 made every claim
    raise (`queue_round_failed` each second, nothing delivered); a sender like it made
    every delivery attempt crash; `queue list` and `queue show` printed a traceback."""
    gsmtp = gsmtp_factory(start=False)
    seed_and_damage(gsmtp, 4, NOT_UTF8[case])
    gsmtp.start()
    wait_for(lambda: len(gsmtp.maildir_files(USER)) == 3, what="the three good ones")
    wait_for(
        lambda: SHOWN[case] in assert_cli_works(gsmtp, "queue", "list", "--corrupt"),
        what="the bad one listed as corrupt",
    )
    assert_cli_works(gsmtp, "queue", "list")
    assert_cli_works(gsmtp, "queue", "list", "--corrupt", "--json")
    shown = assert_cli_works(gsmtp, "queue", "show", "SEED000000")
    if case != "message_id":
        assert SHOWN[case] in shown
    assert_cli_works(gsmtp, "queue", "stats")
    log = gsmtp.log()
    assert "message_set_aside" in log
    for trouble in ("queue_round_failed", "delivery_crashed", "Traceback"):
        assert trouble not in log
    assert gsmtp.process is not None and gsmtp.process.poll() is None


def test_line_breaks_in_envelope_addresses_and_orphan_rows(gsmtp_factory) -> None:  # type: ignore[no-untyped-def]
    """Red-team findings: a sender with a LF was delivered and injected a header field
    into the Maildir file; recipient rows whose message was deleted with foreign keys
    off stayed unscheduled forever, counted as queued and shown nowhere."""
    gsmtp = gsmtp_factory(start=False)
    seed_and_damage(
        gsmtp,
        4,
        "UPDATE messages SET sender = 'evil' || char(10) || 'X-Injected: yes'"
        " WHERE id = 'SEED000000'",
        "UPDATE recipients SET address = 'jones' || char(13) || char(10) || 'X-Injected:"
        " yes@foo.com' WHERE message_id = 'SEED000001'",
        "DELETE FROM messages WHERE id = 'SEED000002'",
    )
    gsmtp.start()
    wait_for(lambda: len(gsmtp.maildir_files(USER)) == 1, what="the good one")
    wait_for(lambda: gsmtp.events("orphan_recipients_removed"), what="the orphan removed")
    wait_for(
        lambda: "SEED000000" in assert_cli_works(gsmtp, "queue", "list", "--corrupt"),
        what="the bad sender set aside",
    )
    corrupt = assert_cli_works(gsmtp, "queue", "list", "--corrupt")
    assert "<evil\\x0aX-Injected: yes>" in corrupt and "sender has a control character" in corrupt
    assert "jones\\x0d\\x0aX-Injected: yes@foo.com" in corrupt
    assert "recipient address has a control character" in corrupt
    assert "SEED000002" not in corrupt
    assert gsmtp.spool_rows("SELECT COUNT(*) FROM recipients WHERE message_id = 'SEED000002'") == [
        (0,)
    ]
    stats = assert_cli_works(gsmtp, "queue", "stats")
    assert "queued: 2\n" in stats and "corrupt: 2\n" in stats  # the two set aside
    (delivered,) = gsmtp.maildir_files(USER)
    assert b"X-Injected" not in delivered.read_bytes()
    assert [e["count"] for e in gsmtp.events("orphan_recipients_removed")] == [1]
    assert "Traceback" not in gsmtp.log()
