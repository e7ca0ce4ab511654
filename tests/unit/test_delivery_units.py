"""Retry arithmetic, MX ordering, DSN bytes, and the client's wire format."""

from __future__ import annotations

import email
import itertools
import random
import re
from email.message import Message

import pytest

from gsmtp.delivery import dsn
from gsmtp.delivery.mx import MxRecord, order_mx
from gsmtp.message import MessageId, Outcome, QueuedMessage, RecipientResult
from gsmtp.protocol import client
from gsmtp.protocol.client import ReplyError, ReplyParser
from gsmtp.queue import RetryPolicy

# -- retry schedule ----------------------------------------------------------------------


def test_retry_steps_then_the_last_step_repeats() -> None:
    policy = RetryPolicy(steps=(60.0, 300.0, 900.0), max_age=86400.0, jitter=lambda: 0.0)
    now = 1000.0
    assert [policy.next_attempt_at(n, now) - now for n in range(1, 6)] == [60, 300, 900, 900, 900]


def test_retry_jitter_adds_at_most_ten_percent() -> None:
    policy = RetryPolicy(steps=(100.0,), max_age=1.0, jitter=lambda: 1.0)
    assert policy.next_attempt_at(1, 0.0) == pytest.approx(110.0)
    spread = RetryPolicy(steps=(100.0,), max_age=1.0, jitter=random.Random(7).random)
    delays = {round(spread.next_attempt_at(1, 0.0), 3) for _ in range(50)}
    assert len(delays) > 40 and all(100 <= d <= 110 for d in delays)


def test_expiry_by_age() -> None:
    policy = RetryPolicy(steps=(1.0,), max_age=5 * 86400.0)
    assert not policy.expired(received_at=0.0, now=5 * 86400.0 - 1)
    assert policy.expired(received_at=0.0, now=5 * 86400.0)


# -- MX ordering -------------------------------------------------------------------------


def test_mx_lowest_preference_first_and_equal_ones_shuffled() -> None:
    records = [MxRecord(20, "b2"), MxRecord(10, "a1"), MxRecord(20, "b1"), MxRecord(30, "c")]
    orders = {tuple(order_mx(records, random.Random(seed).shuffle)) for seed in range(40)}
    assert orders == {("a1", "b1", "b2", "c"), ("a1", "b2", "b1", "c")}


def test_mx_list_is_capped_and_deduplicated() -> None:
    """A host listed twice is tried once, at its best preference, and does not take one
    of the MAX_MX_HOSTS places; the cap applies after that."""
    records = [MxRecord(10, "h0"), MxRecord(20, "h1"), MxRecord(30, "h0")]
    records += [MxRecord(40 + i, f"h{i}") for i in range(2, 10)]
    assert order_mx(records, lambda _: None) == ["h0", "h1", "h2", "h3", "h4"]


# -- DSN ---------------------------------------------------------------------------------

ORIGINAL = QueuedMessage(
    MessageId("M1"),
    "alice@local.example",
    b"Received: from x\r\nSubject: =?utf-8?B?ZXZpbA0KWC1JbmplY3RlZDogeWVz?=\r\n"
    b"Message-Id: <a@b>\r\nMessage-Id: X-Injected: yes\r\n\r\nsecret body\r\n",
    0.0,
    False,
)


def build(results: list[RecipientResult]) -> tuple[bytes, Message]:
    raw = dsn.build_bounce(ORIGINAL, results, hostname="mx.local.example", bounce_id="B1", now=0.0)
    return raw, email.message_from_bytes(raw)


def test_dsn_structure() -> None:
    raw, bounce = build(
        [
            RecipientResult(
                "bob@remote.example",
                Outcome.FAILED,
                "5.1.1",
                "550 5.1.1 no such user",
                "mx.remote.example",
            ),
            RecipientResult("eve@remote.example", Outcome.FAILED, "4.4.7", "Delivery time expired"),
        ]
    )
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    assert bounce["From"] == "Mail Delivery System <MAILER-DAEMON@mx.local.example>"
    assert bounce["To"] == "<alice@local.example>"
    assert bounce.get_content_type() == "multipart/report"
    parts = [p.get_content_type() for p in bounce.walk()]
    assert parts[:2] == ["multipart/report", "text/plain"]
    assert "message/delivery-status" in parts and "text/rfc822-headers" in parts
    report = next(p for p in bounce.walk() if p.get_content_type() == "message/delivery-status")
    blocks = report.get_payload()
    assert isinstance(blocks, list)
    assert blocks[0]["Reporting-MTA"] == "dns; mx.local.example"
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        "rfc822; bob@remote.example",
        "rfc822; eve@remote.example",
    ]
    assert [b["Status"] for b in blocks[1:]] == ["5.1.1", "4.4.7"]
    assert blocks[1]["Remote-MTA"] == "dns; mx.remote.example"
    assert blocks[2]["Remote-MTA"] is None
    assert b"secret body" not in raw  # headers only, never the body


def test_dsn_values_from_outside_cannot_inject_headers() -> None:
    """S-13: CR/LF in a remote reply or an address becomes a space."""
    raw, bounce = build(
        [
            RecipientResult(
                "bob@remote.example", Outcome.FAILED, "5.7.1", "550 bad\r\nX-Injected: yes"
            )
        ]
    )
    for line in raw.split(b"\r\n"):
        assert not line.startswith(b"X-Injected:")
    assert bounce["X-Injected"] is None


def test_dsn_bad_status_is_replaced() -> None:
    _, bounce = build([RecipientResult("b@r.example", Outcome.FAILED, "junk\r\nX: y", "550 no")])
    report = next(p for p in bounce.walk() if p.get_content_type() == "message/delivery-status")
    assert report.get_payload()[1]["Status"] == "5.0.0"  # type: ignore[index]


# -- the client's wire format ------------------------------------------------------------


def test_reply_parser_handles_multiline_and_split_segments() -> None:
    parser = ReplyParser()
    assert parser.feed(b"250-mx greets you\r\n250-PIPE") == []
    (reply,) = parser.feed(b"LINING\r\n250 SIZE 1000\r\n")
    assert reply.code == 250 and reply.lines == ("mx greets you", "PIPELINING", "SIZE 1000")
    extensions = client.parse_ehlo(reply)
    assert extensions.pipelining and extensions.size == 1000 and not extensions.starttls


@pytest.mark.parametrize("garbage", [b"HTTP/1.1 400 Bad\r\n", b"2" * 3000, b"99 x\r\n"])
def test_reply_parser_refuses_garbage(garbage: bytes) -> None:
    with pytest.raises(ReplyError):
        ReplyParser().feed(garbage)


def test_reply_status_falls_back_to_its_class() -> None:
    (reply,) = ReplyParser().feed(b"550 go away\r\n")
    assert reply.status() == "5.0.0" and reply.enhanced is None
    (reply,) = ReplyParser().feed(b"451 4.7.1 greylisted\r\n")
    assert reply.status() == "4.7.1" and reply.is_transient


def test_outbound_data_is_always_clean_crlf_and_stuffed() -> None:
    """P-10: no bare CR/LF on the wire; dots doubled; one terminator."""
    encoded = client.encode_data(b".start\r\nbare\nlf\rcr\r\n.\r\n..x\r\nlast")
    assert encoded == b"..start\r\nbare\r\nlf\r\ncr\r\n..\r\n...x\r\nlast\r\n.\r\n"
    assert encoded.count(b"\r\n.\r\n") == 1


def _encode_data_whole(body: bytes) -> bytes:
    """encode_data as it was before it streamed (one copy of the whole body): the
    reference the chunked encoder must match byte for byte."""
    clean = re.sub(rb"\r(?!\n)|(?<!\r)\n", b"\r\n", body)
    if clean and not clean.endswith(b"\r\n"):
        clean += b"\r\n"
    stuffed = clean.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


def test_chunked_data_matches_the_whole_body_encoding_at_every_boundary() -> None:
    """Every body of up to 7 bytes over CR, LF, dot and a letter, cut into pieces of 1
    to 4 bytes: boundaries fall inside CRLF, before a leading dot, after a lone CR."""
    alphabet = [b"\r", b"\n", b".", b"a"]
    bodies = [b""]
    for length in range(1, 8):
        bodies += [b"".join(p) for p in itertools.product(alphabet, repeat=length)]
    for body in bodies:
        expected = _encode_data_whole(body)
        assert client.encode_data(body) == expected, body
        for size in range(1, 5):
            assert b"".join(client.data_chunks(body, size)) == expected, (body, size)


def test_chunked_data_matches_on_large_random_bodies() -> None:
    rng = random.Random(1)
    pieces = [b"\r\n", b"\n", b"\r", b".", b"\r\n.", b"..", b"x" * 100, b"\xc3\xa9"]
    for _ in range(50):
        body = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 3000)))
        expected = _encode_data_whole(body)
        for size in (1, 7, 64, 1000, client.DATA_CHUNK):
            assert b"".join(client.data_chunks(body, size)) == expected


def test_chunked_data_holds_one_chunk_at_a_time() -> None:
    """Lazy, and no chunk larger than twice its piece (+ a dot and the terminator)."""
    body = (b"\n." * 100_000) + b"x" * 300_000
    chunks = client.data_chunks(body, 65536)
    first = next(chunks)
    assert len(first) <= 2 * 65536 + 5
    sizes = [len(first)] + [len(chunk) for chunk in chunks]
    assert len(sizes) == -(-len(body) // 65536) and max(sizes) <= 2 * 65536 + 5
    assert sum(sizes) == len(_encode_data_whole(body))


def test_commands_refuse_line_breaks() -> None:
    """S-17."""
    with pytest.raises(ValueError):
        client.rcpt_command("bob@x.example>\r\nRCPT TO:<victim@y.example")
    assert client.mail_command("a@b", size=10, eightbit=True, smtputf8=False) == (
        b"MAIL FROM:<a@b> SIZE=10 BODY=8BITMIME\r\n"
    )


def test_pacer_halves_on_lag_and_recovers_slowly() -> None:
    from gsmtp.queue import DeliveryPacer

    pacer = DeliveryPacer(100, minimum=2)
    for _ in range(10):
        pacer.observe(0.050)  # the loop is 50 ms late: clients are waiting
    assert pacer.allowed == 2  # halved down to the floor, never below
    pacer.observe(0.002)  # between the thresholds: hold
    assert pacer.allowed == 2
    for _ in range(5):
        pacer.observe(0.0)
    assert pacer.allowed == 7  # one sender back per quiet probe
    for _ in range(200):
        pacer.observe(0.0)
    assert pacer.allowed == 100


def test_the_pacer_holds_the_local_lane_to_the_senders_allowance_while_clients_wait() -> None:
    """Local deliveries have a limit of their own (512 a worker beside 50 senders): all
    of it while no client is served, else no more than the senders' allowance."""
    from gsmtp.queue import DeliveryPacer

    clients = [0]
    pacer = DeliveryPacer(50, minimum=2, clients=lambda: clients[0])
    assert pacer.share(512) == 512 and not pacer.holding_back  # no probe yet: nobody served
    clients[0] = 3
    pacer.observe(0.0)
    assert pacer.allowed == 50 and pacer.share(512) == 50  # full, but clients are served
    assert not pacer.holding_back
    pacer.observe(0.050)
    assert pacer.allowed == 25 and pacer.share(512) == 25 and pacer.holding_back
    for _ in range(10):
        pacer.observe(0.050)
    assert pacer.allowed == 2 and pacer.share(512) == 2 and pacer.share(1) == 1
    clients[0] = 0  # the last client left: the whole lane
    pacer.observe(0.050)
    assert pacer.share(512) == 512 and not pacer.holding_back


def test_pacer_holds_deliveries_back_only_while_clients_are_connected() -> None:
    """With no client connected the lag is the deliveries' own: halving for it held a
    burst's backlog to half the senders for most of its drain."""
    from gsmtp.queue import DeliveryPacer

    clients = [3]
    pacer = DeliveryPacer(100, minimum=2, clients=lambda: clients[0])
    for _ in range(10):
        pacer.observe(0.050)
    assert pacer.allowed == 2
    clients[0] = 0  # the last client left: every sender at once, whatever the lag
    pacer.observe(0.050)
    assert pacer.allowed == 100
    clients[0] = 1  # a client again: its lag counts from the full allowance
    pacer.observe(0.050)
    assert pacer.allowed == 50


def test_pacer_probes_the_loop_only_while_clients_are_connected() -> None:
    """An idle server woke 70 times a second, 50 of them the pacer's probe, for a lag
    nobody waits on: with no client it looks for one every idle_interval instead."""
    from gsmtp.queue import DeliveryPacer

    clients = [0]
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 3:
            clients[0] = 2  # a client connects
        if len(naps) == 6:
            raise StopIteration

    pacer = DeliveryPacer(100, clients=lambda: clients[0], sleep=sleep)
    pacer.allowed = 10
    with pytest.raises(StopIteration):
        pacer.run()
    assert naps == [pacer.idle_interval] * 3 + [pacer.interval] * 3
    assert pacer.idle_interval >= 5 * pacer.interval


def test_clean_line_ends_are_passed_on_untouched() -> None:
    """The common case costs three counts, not a rewrite: data with no bare CR or LF is
    returned as it is (the regular expression it replaced cost ~30 µs a KiB)."""
    clean = b"Subject: x\r\n\r\n" + b"line\r\n" * 100
    assert client.crlf_line_ends(clean) is clean
    assert client.crlf_line_ends(b"a\rb\nc\r\r\nd\n\re") == b"a\r\nb\r\nc\r\n\r\nd\r\n\r\ne"
