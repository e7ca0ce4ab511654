"""The SMTP deliverer against real peers: small socket servers in threads on 127.0.1.x,
scripted to trickle, hang, drop the connection after the dot, or greet with our name.

Time: the timeouts are small and the peers real; the attempt deadline's default (30 min)
is tested with an injected clock that a peer moves forward.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from prometheus_client import REGISTRY

from gsmtp.delivery.mx import DnsTemporaryError, OwnListeners, mail_targets
from gsmtp.delivery.smarthost import Smarthost
from gsmtp.delivery.smtp import MAY_BE_DELIVERED_TWICE, SmtpDeliverer, Timeouts
from gsmtp.message import MessageId, Outcome, QueuedMessage, RecipientResult

MESSAGE = QueuedMessage(
    MessageId("M1"), "bob@here.example", b"Subject: hi\r\n\r\nbody\r\n", 0.0, False
)
OUR_NAME = "mx.here.example"
SLOW_BURST, SLOW_PAUSE = 256 * 1024, 0.25


class Peer:
    """A listening socket on host:port; each connection runs `script` in its own thread."""

    def __init__(self, host: str, port: int, script: Callable[[socket.socket], None]) -> None:
        self.script = script
        self.connections = 0
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # A fixed receive window: the kernel must not buffer a whole slow read away.
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        self._listener.bind((host, port))
        self._listener.listen(16)
        self._listener.settimeout(0.05)
        self.port = int(self._listener.getsockname()[1])
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        with conn, contextlib.suppress(OSError):  # the client hung up: fine
            self.script(conn)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
        self._listener.close()


class Lines:
    """Reads CRLF lines, and raw bytes up to a marker, from a peer's socket."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buffer = bytearray()

    def until(self, marker: bytes, *, slow_bytes: int = 0) -> bytes:
        """Up to and including `marker`. The first `slow_bytes` are read 256 KB at a
        time with a 0.25 s pause after each (1 MB/s): a slow but working peer."""
        start = 0
        while (end := self.buffer.find(marker, start)) < 0:
            start = max(0, len(self.buffer) - len(marker) + 1)
            data = self.conn.recv(65536)
            if not data:
                raise OSError("closed")
            before = len(self.buffer)
            self.buffer += data
            if before < slow_bytes and before // SLOW_BURST != len(self.buffer) // SLOW_BURST:
                threading.Event().wait(SLOW_PAUSE)
        found = bytes(self.buffer[: end + len(marker)])
        del self.buffer[: end + len(marker)]
        return found


@dataclass
class Smtp:
    """A minimal SMTP server script: `final` answers the dot (None: drop the connection;
    "hang": keep it open without a word), unless `finals` has an answer for this
    transaction (taken in order, over all connections); `hang_up`: close right after
    answering the dot; the first `slow_bytes` of the body are read slowly. Records the
    verb of every command in `verbs` and sets `quit_seen` at a QUIT."""

    greeting: bytes = b"220 peer.example ESMTP\r\n"
    ehlo: bytes = b"250-peer.example\r\n250 8BITMIME\r\n"
    final: bytes | str | None = b"250 2.0.0 Stored\r\n"
    finals: list[bytes | str | None] = field(default_factory=list)
    rset: bytes = b"250 2.0.0 Ok\r\n"
    refused: tuple[bytes, ...] = ()  # RCPT TO:<address> answered 550
    # DATA's reply when no RCPT of the transaction was accepted (Postfix: 554 5.5.1);
    # None: 354 whatever (RFC 2920 allows either).
    no_valid_recipients: bytes | None = None
    hang_up: bool = False
    slow_bytes: int = 0
    bodies: list[bytes] = field(default_factory=list)
    verbs: list[str] = field(default_factory=list)
    released: threading.Event = field(default_factory=threading.Event)
    quit_seen: threading.Event = field(default_factory=threading.Event)
    # For each RSET: had the rest of its group (up to DATA) arrived with it?
    rset_grouped: list[bool] = field(default_factory=list)

    def __call__(self, conn: socket.socket) -> None:
        lines = Lines(conn)
        conn.sendall(self.greeting)
        if not self.greeting.startswith(b"220"):
            return
        accepted = 0  # RCPTs accepted in this transaction
        while True:
            line = lines.until(b"\r\n").upper()
            self.verbs.append(line.split(b" ")[0].strip().decode())
            refused = line.startswith(b"RCPT") and any(a.upper() in line for a in self.refused)
            if line.startswith((b"MAIL", b"RSET")):
                accepted = 0
            elif line.startswith(b"RCPT") and not refused:
                accepted += 1
            if line.startswith((b"EHLO", b"HELO")):
                conn.sendall(self.ehlo)
            elif line.startswith(b"DATA") and not accepted and self.no_valid_recipients:
                conn.sendall(self.no_valid_recipients)
            elif line.startswith(b"DATA"):
                conn.sendall(b"354 go ahead\r\n")
                body = lines.until(b"\r\n.\r\n", slow_bytes=self.slow_bytes)
                self.bodies.append(body)
                final = self.finals.pop(0) if self.finals else self.final
                if final is None:
                    return  # drop the connection without a reply
                if final == "hang":
                    self.released.wait(30)
                    return
                assert isinstance(final, bytes)
                conn.sendall(final)
                if self.hang_up:
                    return
            elif line.startswith(b"RSET"):
                self.rset_grouped.append(b"DATA\r\n" in lines.buffer)
                conn.sendall(self.rset)
            elif refused:
                conn.sendall(b"550 5.1.1 no such user\r\n")
            elif line.startswith(b"QUIT"):
                self.quit_seen.set()
                conn.sendall(b"221 bye\r\n")
                return
            else:
                conn.sendall(b"250 ok\r\n")


def trickle(pieces: bytes, interval: float) -> Callable[[socket.socket], None]:
    """Send `pieces` one byte at a time, `interval` apart, then close."""

    def script(conn: socket.socket) -> None:
        for byte in pieces:
            conn.sendall(bytes([byte]))
            threading.Event().wait(interval)

    return script


class StaticResolver:
    """MX hosts per domain and addresses per host, from dictionaries; records lookups."""

    def __init__(self, mx: dict[str, list[str]], addresses: dict[str, list[str]]) -> None:
        self.mx = mx
        self._addresses = addresses
        self.looked_up: list[str] = []

    def mail_hosts(self, domain: str) -> list[str]:
        if domain not in self.mx:
            raise DnsTemporaryError(f"SERVFAIL for {domain}")
        return list(self.mx[domain])

    def addresses(self, host: str) -> list[str]:
        self.looked_up.append(host)
        return list(self._addresses.get(host, []))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    started: list[Peer] = []
    yield started
    for peer in started:
        if isinstance(peer.script, Smtp):
            peer.script.released.set()
        peer.stop()


def deliverer(
    resolver: StaticResolver, port: int, timeouts: Timeouts | None = None, **kwargs: object
) -> SmtpDeliverer:
    return SmtpDeliverer(
        resolver=resolver,
        helo_name=OUR_NAME,
        port=port,
        timeouts=timeouts or Timeouts(),
        **kwargs,  # type: ignore[arg-type]
    )


def two_hosts(peers: list[Peer], port: int, first: Smtp, second: Smtp) -> StaticResolver:
    peers.append(Peer("127.0.1.1", port, first))
    peers.append(Peer("127.0.1.2", port, second))
    return StaticResolver(
        {"dest.example": ["mx1.dest.example", "mx2.dest.example"]},
        {"mx1.dest.example": ["127.0.1.1"], "mx2.dest.example": ["127.0.1.2"]},
    )


def deliver(d: SmtpDeliverer, recipients: tuple[str, ...] = ("a@dest.example",)) -> RecipientResult:
    results = d.deliver(MESSAGE, list(recipients))
    assert len(results) == len(recipients)
    return results[0]


# -- time limits ---------------------------------------------------------------------------


def test_the_attempt_deadline_is_shared_by_every_mx_host(peers: list[Peer], port: int) -> None:
    """Item 3: a destination whose 3 MX hosts × 3 addresses all trickle their greeting
    (a byte every 0.2 s, the line never finished in time) holds one attempt for
    `attempt` seconds, not 9 × `command`: after 1 s (command) the first address is
    dropped, the attempt's 1.5 s run out on the second, and the other seven are never
    tried."""
    slow = trickle(b"220 " + b"x" * 20, 0.2)
    addresses = {
        f"mx{h}.dest.example": [f"127.0.1.{10 + 3 * h + a}" for a in range(3)] for h in range(3)
    }
    for host_addresses in addresses.values():
        peers += [Peer(address, port, slow) for address in host_addresses]
    resolver = StaticResolver({"dest.example": sorted(addresses)}, addresses)
    timeouts = Timeouts(connect=1.0, command=1.0, data=1.0, attempt=1.5)
    result = deliver(deliverer(resolver, port, timeouts))
    assert result.outcome is Outcome.DEFERRED
    assert "time limit (1.5s) reached" in result.reply
    assert [peer.connections for peer in peers] == [1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert result.unreachable  # nobody finished a greeting


def test_a_reply_must_be_complete_within_command_timeout(peers: list[Peer], port: int) -> None:
    """A greeting trickled a byte at a time is one reply: its deadline counts from the
    start of the wait, not from the last byte received."""
    peers.append(Peer("127.0.1.1", port, trickle(b"220 " + b"x" * 60 + b"\r\n", 0.05)))
    resolver = StaticResolver({"dest.example": ["127.0.1.1"]}, {})
    result = deliver(deliverer(resolver, port, Timeouts(connect=1, command=0.5, data=1)))
    assert result.outcome is Outcome.DEFERRED
    assert "timed out after 0.5s waiting for a reply" in result.reply


def test_default_attempt_deadline_of_30_minutes_with_an_injected_clock(
    peers: list[Peer], port: int
) -> None:
    """The first MX takes "31 minutes" (the clock is moved on while it holds the
    connection) and fails: the second is not tried within the same attempt."""
    clock = FakeClock()

    def slow_and_broken(conn: socket.socket) -> None:
        clock.now += 31 * 60

    assert Timeouts().attempt == 30 * 60
    second = Smtp()
    resolver = two_hosts(peers, port, Smtp(), second)
    peers[0].script = slow_and_broken
    result = deliver(deliverer(resolver, port, clock=clock))
    assert result.outcome is Outcome.DEFERRED
    assert result.status == "4.4.2" and "time limit (1800s) reached" in result.reply
    assert peers[1].connections == 0 and second.bodies == []


def test_a_large_body_to_a_slow_but_working_peer_gets_through(peers: list[Peer], port: int) -> None:
    """Each 64 KB piece of the body has `command` seconds, not the whole body: the peer
    reads the first 2 MB of 6 MB at 1 MB/s, so the body takes well over the 1 s limit
    beyond what the kernel buffers (the client's send buffer grows up to 4 MB), while
    no piece waits longer than the peer's 0.25 s pauses."""
    slow_reader = Smtp(slow_bytes=2 * 1024 * 1024)
    peers.append(Peer("127.0.1.1", port, slow_reader))
    resolver = StaticResolver({"dest.example": ["127.0.1.1"]}, {})
    body = b"Subject: big\r\n\r\n" + (b"x" * 1022 + b"\r\n") * 6 * 1024
    message = QueuedMessage(MessageId("M2"), "bob@here.example", body, 0.0, False)
    timeouts = Timeouts(connect=1, command=1, data=5, attempt=120)
    (result,) = deliverer(resolver, port, timeouts).deliver(message, ["a@dest.example"])
    assert result.outcome is Outcome.DELIVERED, result.reply
    assert len(slow_reader.bodies[0]) == len(body) + 3  # the body and ".\r\n"


def discarding_peer(received: list[int]) -> Callable[[socket.socket], None]:
    """An SMTP peer that counts the data it is sent and keeps none of it (so that what
    the client allocates can be measured in this process)."""

    def script(conn: socket.socket) -> None:
        conn.sendall(b"220 peer.example ESMTP\r\n")
        while True:
            line = conn.recv(4096).upper()
            if not line or line.startswith(b"QUIT"):
                conn.sendall(b"221 bye\r\n")
                return
            if line.startswith(b"EHLO"):
                conn.sendall(b"250-peer.example\r\n250 8BITMIME\r\n")
            elif line.startswith(b"DATA"):
                conn.sendall(b"354 go ahead\r\n")
                tail, count = b"", 0
                while not tail.endswith(b"\r\n.\r\n"):
                    data = conn.recv(65536)
                    if not data:
                        return
                    count += len(data)
                    tail = (tail + data)[-5:]
                received.append(count)
                conn.sendall(b"250 2.0.0 Stored\r\n")
            else:
                conn.sendall(b"250 ok\r\n")

    return script


def test_sending_a_body_does_not_copy_it_whole(peers: list[Peer], port: int) -> None:
    """The DATA encoding is made a chunk at a time: sending a 16 MB body (bare LFs, so
    every byte of it would be rewritten) allocates far less than the body, where the
    whole-body encoding allocated two more copies of it."""
    received: list[int] = []
    peers.append(Peer("127.0.1.1", port, discarding_peer(received)))
    resolver = StaticResolver({"dest.example": ["127.0.1.1"]}, {})
    body = b"Subject: big\n\n" + (b"x" * 1023 + b"\n") * 16 * 1024
    message = QueuedMessage(MessageId("M3"), "bob@here.example", body, 0.0, False)
    tracemalloc.start()
    try:
        (result,) = deliverer(resolver, port).deliver(message, ["a@dest.example"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.outcome is Outcome.DELIVERED, result.reply
    assert received == [len(body) + body.count(b"\n") + 3]  # LF became CRLF, and ".\r\n"
    assert peak < len(body) // 4, f"{peak // 2**20} MB allocated to send {len(body) // 2**20} MB"


# -- after the final dot -------------------------------------------------------------------


@pytest.mark.parametrize("final", [None, "hang"], ids=["connection-lost", "timeout"])
def test_no_reply_to_the_dot_defers_this_attempt_and_never_tries_the_next_mx(
    peers: list[Peer], port: int, final: str | None
) -> None:
    """Item 4: the first MX may have the message; trying the second would make a copy."""
    first, second = Smtp(final=final), Smtp()
    resolver = two_hosts(peers, port, first, second)
    timeouts = Timeouts(connect=1, command=5, data=0.5)
    result = deliver(deliverer(resolver, port, timeouts), ("a@dest.example", "b@dest.example"))
    assert result.outcome is Outcome.DEFERRED and result.status == "4.4.2"
    assert result.reply.endswith(MAY_BE_DELIVERED_TWICE)
    assert "mx1.dest.example[127.0.1.1]" in result.reply
    assert ("timed out" in result.reply) == (final == "hang")
    assert len(first.bodies) == 1
    assert peers[1].connections == 0 and second.bodies == []
    assert not result.unreachable


@pytest.mark.parametrize(
    ("final", "outcome"),
    [(b"554 5.6.0 rejected\r\n", Outcome.FAILED), (b"452 4.3.1 full\r\n", Outcome.DEFERRED)],
)
def test_a_reply_to_the_dot_counts_as_usual(
    peers: list[Peer], port: int, final: bytes, outcome: Outcome
) -> None:
    first, second = Smtp(final=final), Smtp()
    result = deliver(deliverer(two_hosts(peers, port, first, second), port))
    assert result.outcome is outcome and result.reply == final.decode().strip()
    assert peers[1].connections == 0


def test_a_connection_lost_before_the_dot_moves_on_to_the_next_mx(
    peers: list[Peer], port: int
) -> None:
    """Before the whole final dot is sent the peer cannot have the message."""

    def drop_at_data(conn: socket.socket) -> None:
        lines = Lines(conn)
        conn.sendall(b"220 peer.example\r\n")
        while not lines.until(b"\r\n").upper().startswith(b"DATA"):
            conn.sendall(b"250 ok\r\n")

    second = Smtp()
    resolver = two_hosts(peers, port, Smtp(), second)
    peers[0].script = drop_at_data
    result = deliver(deliverer(resolver, port, Timeouts(connect=1, command=5)))
    assert result.outcome is Outcome.DELIVERED
    assert len(second.bodies) == 1


# -- MX sanity -------------------------------------------------------------------------------


def test_at_most_ten_addresses_over_all_mx_hosts(peers: list[Peer], port: int) -> None:
    """Four hosts with four addresses each, all answering 421: ten connections, and the
    fourth host's addresses are not even looked up."""
    busy = Smtp(greeting=b"421 4.7.0 busy\r\n")
    addresses = {
        f"mx{h}.dest.example": [f"127.0.1.{20 + 4 * h + a}" for a in range(4)] for h in range(4)
    }
    for host_addresses in addresses.values():
        peers += [Peer(address, port, busy) for address in host_addresses]
    resolver = StaticResolver({"dest.example": sorted(addresses)}, addresses)
    result = deliver(deliverer(resolver, port, Timeouts(connect=1, command=2)))
    assert result.outcome is Outcome.DEFERRED and "421 4.7.0 busy" in result.reply
    assert sum(peer.connections for peer in peers) == 10
    assert [peer.connections for peer in peers[:10]] == [1] * 10
    assert resolver.looked_up == ["mx0.dest.example", "mx1.dest.example", "mx2.dest.example"]
    assert not result.unreachable  # they answered SMTP, if only with 421


def test_an_mx_that_is_our_own_listener_loops_back(peers: list[Peer], port: int) -> None:
    """The MX is the address and port we listen on: 554 5.4.6 without connecting."""
    ourselves = Smtp()
    peers.append(Peer("127.0.1.1", port, ourselves))
    resolver = StaticResolver(
        {"dest.example": ["mx.dest.example"]}, {"mx.dest.example": ["127.0.1.1"]}
    )
    d = deliverer(resolver, port, listeners=[("127.0.1.1", port)])
    result = deliver(d)
    assert (result.outcome, result.status) == (Outcome.FAILED, "5.4.6")
    assert result.reply == "554 5.4.6 mail for dest.example loops back to myself"
    assert peers[0].connections == 0
    assert not result.unreachable


def test_a_wildcard_listener_counts_every_local_address(peers: list[Peer], port: int) -> None:
    peers.append(Peer("127.0.1.9", port, Smtp()))
    resolver = StaticResolver({"dest.example": ["127.0.1.9"]}, {})
    result = deliver(deliverer(resolver, port, listeners=[("0.0.0.0", port)]))
    assert result.status == "5.4.6"
    assert peers[0].connections == 0


def test_another_loopback_address_or_port_is_not_us(peers: list[Peer], port: int) -> None:
    """Internal relays (and tests) on loopback and private addresses stay allowed."""
    relay = Smtp()
    peers.append(Peer("127.0.1.2", port, relay))
    resolver = StaticResolver({"dest.example": ["127.0.1.2"]}, {})
    listeners = [("127.0.1.1", port), ("127.0.1.2", port + 1), ("::1", port)]
    result = deliver(deliverer(resolver, port, listeners=listeners))
    assert result.outcome is Outcome.DELIVERED
    assert len(relay.bodies) == 1


def test_a_backup_mx_that_is_us_is_never_tried(peers: list[Peer], port: int) -> None:
    """We are the second MX: only the better one is tried; when it fails, the mail waits
    (deferred), as Postfix does, instead of being sent to ourselves or bounced."""
    ourselves = Smtp()
    peers.append(Peer("127.0.1.2", port, ourselves))
    resolver = StaticResolver(
        {"dest.example": ["mx1.dest.example", "mx2.dest.example"]},
        {"mx1.dest.example": ["127.0.1.1"], "mx2.dest.example": ["127.0.1.2"]},
    )  # nobody listens on 127.0.1.1
    result = deliver(
        deliverer(resolver, port, Timeouts(connect=1), listeners=[("127.0.1.2", port)])
    )
    assert result.outcome is Outcome.DEFERRED and "127.0.1.1" in result.reply
    assert peers[0].connections == 0


@pytest.mark.parametrize(
    ("greeting", "ehlo"),
    [
        (f"220 {OUR_NAME} ESMTP\r\n".encode(), b"250 peer.example\r\n"),
        (b"220 peer.example ESMTP\r\n", f"250-{OUR_NAME.upper()}\r\n250 8BITMIME\r\n".encode()),
    ],
    ids=["greeting", "ehlo"],
)
def test_a_peer_greeting_with_our_own_name_loops_back(
    peers: list[Peer], port: int, greeting: bytes, ehlo: bytes
) -> None:
    first, second = Smtp(greeting=greeting, ehlo=ehlo), Smtp()
    result = deliver(deliverer(two_hosts(peers, port, first, second), port))
    assert (result.outcome, result.status) == (Outcome.FAILED, "5.4.6")
    assert "loops back to myself" in result.reply
    assert first.bodies == [] and peers[1].connections == 0


def test_own_listeners() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent; asks for a route
        except OSError:
            pytest.skip("no IPv4 route off this machine, so no non-loopback address")
        mine = probe.getsockname()[0]
    wildcard = OwnListeners([("0.0.0.0", 25)])
    assert wildcard.includes(mine, 25) and wildcard.includes("127.0.0.53", 25)
    assert not wildcard.includes(mine, 26)
    assert not wildcard.includes("198.51.100.7", 25)  # TEST-NET-2: not ours
    assert OwnListeners([("::", 25)]).includes(mine, 25)  # dual-stack wildcard
    assert OwnListeners([("[::]", 25)]).includes("::ffff:127.0.0.1", 25)
    assert not OwnListeners([("0.0.0.0", 25)]).includes("::1", 25)
    assert not OwnListeners([("127.0.0.1", 25)]).includes("127.0.0.2", 25)
    assert OwnListeners([("localhost", 25)]).includes("127.0.0.1", 25)


def test_mail_targets_are_cut_at_ourselves() -> None:
    resolver = StaticResolver(
        {}, {"a": ["192.0.2.10"], "self": ["192.0.2.20", "127.0.0.1"], "c": ["192.0.2.30"]}
    )
    own = OwnListeners([("127.0.0.1", 25)])
    targets = mail_targets(resolver, ["a", "self", "c"], 25, own)
    assert [t.address for t in targets.addresses] == ["192.0.2.10"] and targets.loops_back
    best = mail_targets(resolver, ["self", "a"], 25, own)
    assert best.addresses == () and best.loops_back
    other_port = mail_targets(resolver, ["self"], 2525, own)
    assert len(other_port.addresses) == 2 and not other_port.loops_back


# -- reachability ---------------------------------------------------------------------------


def test_unreachable_when_no_address_answers(peers: list[Peer], port: int) -> None:
    """One address refuses the connection (nobody listens), the other closes it before
    the greeting: the destination is unreachable."""

    def close_at_once(conn: socket.socket) -> None:
        return None

    peers.append(Peer("127.0.1.2", port, close_at_once))
    resolver = StaticResolver({"dest.example": ["127.0.1.1", "127.0.1.2"]}, {})
    results = deliverer(resolver, port, Timeouts(connect=1)).deliver(
        MESSAGE, ["a@dest.example", "b@dest.example"]
    )
    assert [r.outcome for r in results] == [Outcome.DEFERRED] * 2
    assert all(r.unreachable for r in results)


def test_reachable_when_any_address_answers_even_with_4xx(peers: list[Peer], port: int) -> None:
    peers.append(Peer("127.0.1.2", port, Smtp(greeting=b"421 4.3.2 shutting down\r\n")))
    resolver = StaticResolver({"dest.example": ["127.0.1.1", "127.0.1.2"]}, {})
    result = deliver(deliverer(resolver, port, Timeouts(connect=1)))
    assert result.outcome is Outcome.DEFERRED and "421 4.3.2" in result.reply
    assert not result.unreachable


def test_a_dns_failure_is_not_unreachable(port: int) -> None:
    result = deliver(deliverer(StaticResolver({}, {}), port))
    assert (result.outcome, result.status) == (Outcome.DEFERRED, "4.4.3")
    assert not result.unreachable


# -- session reuse ---------------------------------------------------------------------------

EIGHT_BIT = QueuedMessage(
    MessageId("M8"), "bob@here.example", "Subject: é\r\n\r\ncafé\r\n".encode(), 0.0, False
)
BIG = QueuedMessage(
    MessageId("MB"), "bob@here.example", b"Subject: big\r\n\r\n" + b"x" * 2000, 0.0, False
)


def stale_sessions() -> float:
    return REGISTRY.get_sample_value("gsmtp_outbound_sessions_total", {"how": "stale"}) or 0.0


def one_host(peers: list[Peer], port: int, script: Smtp) -> StaticResolver:
    peers.append(Peer("127.0.1.1", port, script))
    return StaticResolver({"dest.example": ["mx.dest.example"]}, {"mx.dest.example": ["127.0.1.1"]})


def reusing(
    resolver: StaticResolver, port: int, reuse: int = 100, **kwargs: object
) -> SmtpDeliverer:
    kwargs.setdefault("timeouts", Timeouts(connect=1, command=5, data=5))
    return deliverer(resolver, port, connection_reuse=reuse, **kwargs)  # type: ignore[arg-type]


def test_the_next_message_goes_over_the_same_session_after_rset(
    peers: list[Peer], port: int
) -> None:
    script = Smtp()
    d = reusing(one_host(peers, port, script), port)
    assert deliver(d).outcome is Outcome.DELIVERED
    assert deliver(d, ("b@dest.example",)).outcome is Outcome.DELIVERED
    assert peers[0].connections == 1 and len(script.bodies) == 2
    assert script.verbs == ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA"]
    d.close()  # at shutdown the idle session gets its QUIT
    assert script.quit_seen.wait(5)
    assert deliver(d).outcome is Outcome.DELIVERED  # after close(): a connection each
    assert peers[0].connections == 2


PIPELINING_EHLO = b"250-peer.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"


def test_a_pipelining_peer_gets_the_rset_in_one_group_with_the_envelope(
    peers: list[Peer], port: int
) -> None:
    """Reuse costs no round trip of its own: RSET, MAIL, RCPT and DATA in one write."""
    script = Smtp(ehlo=PIPELINING_EHLO)
    d = reusing(one_host(peers, port, script), port)
    for recipient in ("a@dest.example", "b@dest.example", "c@dest.example"):
        assert deliver(d, (recipient,)).outcome is Outcome.DELIVERED
    assert peers[0].connections == 1 and len(script.bodies) == 3
    assert script.verbs == ["EHLO", *(["MAIL", "RCPT", "DATA", "RSET"] * 2), "MAIL", "RCPT", "DATA"]
    assert script.rset_grouped == [True, True]


def test_a_peer_without_pipelining_gets_the_rset_alone(peers: list[Peer], port: int) -> None:
    plain = Smtp()  # no PIPELINING: RSET alone, its reply awaited
    d = reusing(one_host(peers, port, plain), port)
    assert deliver(d).outcome is Outcome.DELIVERED
    assert deliver(d).outcome is Outcome.DELIVERED
    assert plain.rset_grouped == [False]


@pytest.mark.parametrize(("reuse", "connections"), [(1, 5), (2, 3), (100, 1)])
def test_connection_reuse_is_the_number_of_messages_per_session(
    peers: list[Peer], port: int, reuse: int, connections: int
) -> None:
    script = Smtp()
    d = reusing(one_host(peers, port, script), port, reuse=reuse)
    for _ in range(5):
        assert deliver(d).outcome is Outcome.DELIVERED
    assert peers[0].connections == connections
    assert script.verbs.count("RSET") == 5 - connections


@pytest.mark.parametrize(
    "stale",
    [
        Smtp(hang_up=True),
        Smtp(rset=b"421 4.4.2 idle too long\r\n"),
        Smtp(ehlo=PIPELINING_EHLO, hang_up=True),
        Smtp(ehlo=PIPELINING_EHLO, rset=b"421 4.4.2 idle too long\r\n"),
    ],
    ids=["closed-while-idle", "rset-refused", "pipelining-closed", "pipelining-rset-refused"],
)
def test_a_stale_cached_session_is_replaced_without_a_deferral(
    peers: list[Peer], port: int, stale: Smtp
) -> None:
    """The RSET refused (or the session gone), alone or in one group with the envelope:
    nothing of the message was sent, so it goes over a new connection, once."""
    d = reusing(one_host(peers, port, stale), port)
    assert deliver(d).outcome is Outcome.DELIVERED
    before = stale_sessions()
    result = deliver(d, ("b@dest.example",))
    assert result.outcome is Outcome.DELIVERED, result.reply
    assert peers[0].connections == 2 and len(stale.bodies) == 2
    assert stale_sessions() == before + 1  # the cached session was tried first


@pytest.mark.parametrize(
    ("first", "outcome", "connections"),
    [
        (b"554 5.6.0 rejected\r\n", Outcome.FAILED, 1),
        (b"452 4.3.1 full\r\n", Outcome.DEFERRED, 1),
        (b"421 4.3.2 closing\r\n", Outcome.DEFERRED, 2),
        (None, Outcome.DEFERRED, 2),  # connection lost after the dot
    ],
    ids=["5xx", "4xx", "421", "broken"],
)
def test_a_session_is_reused_after_a_refused_message_but_not_after_421_or_a_break(
    peers: list[Peer], port: int, first: bytes | None, outcome: Outcome, connections: int
) -> None:
    script = Smtp(finals=[first])
    d = reusing(one_host(peers, port, script), port)
    assert deliver(d).outcome is outcome
    before = stale_sessions()
    assert deliver(d, ("b@dest.example",)).outcome is Outcome.DELIVERED
    assert peers[0].connections == connections
    assert stale_sessions() == before  # an ended session was never cached
    assert script.verbs.count("RSET") == 2 - connections


def test_a_cached_session_lost_after_the_dot_is_not_retried_anywhere(
    peers: list[Peer], port: int
) -> None:
    """The after-the-dot rule holds on a reused session: deferred, "may be delivered
    twice", and neither a fresh connection nor the next MX is tried."""
    first, second = Smtp(finals=[b"250 2.0.0 Stored\r\n", None]), Smtp()
    d = reusing(two_hosts(peers, port, first, second), port)
    assert deliver(d).outcome is Outcome.DELIVERED
    result = deliver(d, ("b@dest.example",))
    assert result.outcome is Outcome.DEFERRED and result.status == "4.4.2"
    assert result.reply.endswith(MAY_BE_DELIVERED_TWICE)
    assert peers[0].connections == 1 and len(first.bodies) == 2
    assert peers[1].connections == 0


def test_each_attempt_has_its_own_deadline_on_a_cached_session(
    peers: list[Peer], port: int
) -> None:
    """The session outlives the attempt that opened it: the next attempt, 31 minutes on,
    runs within its own 30 minutes, not the first one's."""
    clock = FakeClock()
    d = reusing(one_host(peers, port, Smtp()), port, clock=clock, connection_idle=3600.0)
    assert deliver(d).outcome is Outcome.DELIVERED
    clock.now += 31 * 60
    result = deliver(d)
    assert result.outcome is Outcome.DELIVERED, result.reply
    assert peers[0].connections == 1


def test_size_8bitmime_and_smtputf8_are_checked_per_message_on_a_cached_session(
    peers: list[Peer], port: int
) -> None:
    script = Smtp(ehlo=b"250-peer.example\r\n250 SIZE 1000\r\n")
    d = reusing(one_host(peers, port, script), port)
    assert deliver(d).outcome is Outcome.DELIVERED
    (eight_bit,) = d.deliver(EIGHT_BIT, ["a@dest.example"])
    assert (eight_bit.outcome, eight_bit.status) == (Outcome.FAILED, "5.6.3")
    (big,) = d.deliver(BIG, ["a@dest.example"])
    assert (big.outcome, big.status) == (Outcome.FAILED, "5.3.4")
    (utf8,) = d.deliver(MESSAGE, ["josé@dest.example"])
    assert (utf8.outcome, utf8.status) == (Outcome.FAILED, "5.6.7")
    assert deliver(d).outcome is Outcome.DELIVERED
    assert peers[0].connections == 1 and len(script.bodies) == 2


def test_idle_sessions_are_closed_with_quit_after_connection_idle(
    peers: list[Peer], port: int
) -> None:
    clock = FakeClock()
    script = Smtp()
    d = reusing(one_host(peers, port, script), port, clock=clock, connection_idle=2.0)
    assert deliver(d).outcome is Outcome.DELIVERED
    clock.now += 1.9
    assert d.sweep() == 0
    clock.now += 0.1
    assert d.sweep() == 1
    assert script.quit_seen.wait(5)
    assert deliver(d).outcome is Outcome.DELIVERED
    assert peers[0].connections == 2 and "RSET" not in script.verbs


def test_a_session_is_used_only_while_its_address_is_a_target(peers: list[Peer], port: int) -> None:
    """The domain's MX moved: the session to the old host is not used for it."""
    old, new = Smtp(), Smtp()
    resolver = two_hosts(peers, port, old, new)
    d = reusing(resolver, port)
    assert deliver(d).outcome is Outcome.DELIVERED
    resolver.mx["dest.example"] = ["mx2.dest.example"]
    assert deliver(d).outcome is Outcome.DELIVERED
    assert (len(old.bodies), len(new.bodies)) == (1, 1)
    assert "RSET" not in old.verbs


def test_sessions_are_shared_by_destination(peers: list[Peer], port: int) -> None:
    """Two domains behind the same MX host each have their own sessions; through a
    smarthost every domain shares."""
    script = Smtp()
    peers.append(Peer("127.0.1.1", port, script))
    resolver = StaticResolver(
        {"one.example": ["mx.example"], "two.example": ["mx.example"]},
        {"mx.example": ["127.0.1.1"]},
    )
    by_mx = reusing(resolver, port)
    deliver(by_mx, ("a@one.example",))
    deliver(by_mx, ("a@two.example",))
    assert peers[0].connections == 2
    by_mx.close()
    smarthost = reusing(resolver, port, smarthost=Smarthost("127.0.1.1", port))
    deliver(smarthost, ("a@one.example",))
    deliver(smarthost, ("a@two.example",))
    assert peers[0].connections == 3
    assert [r.outcome for r in smarthost.deliver(MESSAGE, ["b@one.example"])] == [Outcome.DELIVERED]


def test_a_pipelining_peer_answering_rset_twice_is_stale_not_a_delivery(
    peers: list[Peer], port: int
) -> None:
    """A peer that answers the pipelined RSET with two replies puts every later reply
    of the group one place off: the DATA's place gets the RCPT's 250. That is no
    delivery (the body was never sent): the session is out of step, so stale, and the
    message goes over a new connection (the RSET alone used to show the extra reply as
    bytes left unread, `in_sync`)."""
    script = Smtp(ehlo=PIPELINING_EHLO, rset=b"250 2.0.0 Ok\r\n250 2.0.0 Ok again\r\n")
    d = reusing(one_host(peers, port, script), port)
    assert deliver(d).outcome is Outcome.DELIVERED
    before = stale_sessions()
    result = deliver(d, ("b@dest.example",))
    assert result.outcome is Outcome.DELIVERED, result.reply
    assert len(script.bodies) == 2, "reported delivered, but the peer never got the body"
    assert peers[0].connections == 2
    assert stale_sessions() == before + 1


def test_a_pipelining_peer_answering_rset_twice_bounces_no_accepted_recipient(
    peers: list[Peer], port: int
) -> None:
    """As above, with the last recipient refused: its 550 lands in DATA's place, and the
    recipient the peer accepted must not fail with it (a bounce for good mail). Behind a
    grouped RSET, a DATA reply other than 354 sends the message over a new session."""
    script = Smtp(
        ehlo=PIPELINING_EHLO,
        rset=b"250 2.0.0 Ok\r\n250 2.0.0 Ok again\r\n",
        refused=(b"<b@dest.example>",),
    )
    d = reusing(one_host(peers, port, script), port)
    assert deliver(d).outcome is Outcome.DELIVERED
    results = d.deliver(MESSAGE, ["a@dest.example", "b@dest.example"])
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.FAILED], results
    assert len(script.bodies) == 2


def test_a_message_refused_at_every_rcpt_keeps_the_pipelined_session(
    peers: list[Peer], port: int
) -> None:
    """A pipelining peer refuses the only recipient (550) and then the pipelined DATA
    (554 no valid recipients, as Postfix does): the outcome is the RCPT's refusal, and
    the session stays usable. Each such message on a reused session must not cost a new
    connection (and a stale count): a relay whose mail to a big provider is often for
    unknown users would open one connection per message, what reuse is meant to save."""
    script = Smtp(
        ehlo=PIPELINING_EHLO,
        refused=(b"<nobody@dest.example>",),
        no_valid_recipients=b"554 5.5.1 Error: no valid recipients\r\n",
    )
    d = reusing(one_host(peers, port, script), port)
    assert deliver(d).outcome is Outcome.DELIVERED
    before = stale_sessions()
    for _ in range(3):
        result = deliver(d, ("nobody@dest.example",))
        assert (result.outcome, result.status) == (Outcome.FAILED, "5.1.1"), result.reply
        assert result.reply.startswith("550 5.1.1")
    assert deliver(d).outcome is Outcome.DELIVERED
    assert len(script.bodies) == 2
    assert (peers[0].connections, stale_sessions() - before) == (1, 0)


@pytest.mark.parametrize(
    "no_valid", [None, b"554 5.5.1 Error: no valid recipients\r\n"], ids=["354", "554"]
)
def test_a_peer_answering_rset_twice_refusing_the_only_recipient_is_not_delivered(
    peers: list[Peer], port: int, no_valid: bytes | None
) -> None:
    """One place off, the refusal of the only RCPT lands in DATA's place and MAIL's 250
    in the RCPT's: the RSET sent alone to settle it gets DATA's own reply (354 or 554),
    so the session is broken and the message goes over a new one, refused there."""
    script = Smtp(
        ehlo=PIPELINING_EHLO,
        rset=b"250 2.0.0 Ok\r\n250 2.0.0 Ok again\r\n",
        refused=(b"<nobody@dest.example>",),
        no_valid_recipients=no_valid,
    )
    d = reusing(one_host(peers, port, script), port, timeouts=Timeouts(connect=1, rset=1))
    assert deliver(d).outcome is Outcome.DELIVERED
    result = deliver(d, ("nobody@dest.example",))
    assert (result.outcome, result.status) == (Outcome.FAILED, "5.1.1"), result.reply
    assert len(script.bodies) == 1 and peers[0].connections == 2
