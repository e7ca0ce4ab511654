"""Load generator: C concurrent SMTP sessions, each sending M messages of S bytes.

    python -m bench.load --target 127.0.0.1:2525 -c 100 -m 100 -s 1KiB

Uses PIPELINING when the server offers it (MAIL, RCPT and DATA in one write, as RFC 2920
allows; the body after the 354). Reports accepted messages/s, sessions/s, the latency
from the end of DATA to the reply (p50/p99), errors, and the server's CPU when given
its PID. Bounded by count and by time; refuses any target outside loopback.

Every client runs on one epoll loop in one thread (no gevent, no greenlets): the
generator shares the machine with the server it measures, and its CPU per message is
CPU the server does not get. It was a gevent client (a greenlet per connection) until
the workers cells showed it using ~110 µs of CPU per message, about a third of what
gsmtp itself uses; this loop uses about half of that, with the same writes and reads
on the wire.

With `--record FILE` every message carries its own number (`Subject: bench N`, N from 1,
the size unchanged) and the number of each message answered 250 is appended to FILE as
it is answered (RECORD_WIDTH digits and a newline, written at once): what a harness
needs to check that every acknowledged message arrived, and to follow the load's
progress from outside while it runs (the file's size ÷ bench.peers.RECORD_BYTES).
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import select
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.peers import RECORD_WIDTH

_UNITS = {"": 1, "B": 1, "KIB": 1024, "KB": 1024, "MIB": 1024**2, "MB": 1024**2}


def parse_size(text: str) -> int:
    number = text.rstrip("BbKkMmIi")
    unit = text[len(number) :].upper()
    if unit not in _UNITS or not number.isdigit():
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1KiB, 100KiB)")
    return int(number) * _UNITS[unit]


def parse_target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise argparse.ArgumentTypeError(f"target must be an IP address: {text!r}") from None
    if not address.is_loopback:
        raise argparse.ArgumentTypeError(
            f"refusing non-loopback target {host} (127.0.0.0/8, ::1 only)"
        )
    return host, int(port)


def make_body(size: int, index: int) -> bytes:
    """A message of exactly `size` bytes (headers included), CRLF lines, no leading dots."""
    head = (
        f"From: load@bench.test\r\nTo: user@bench.test\r\nSubject: bench {index}\r\n\r\n".encode()
    )
    line = b"x" * 76 + b"\r\n"
    remaining = max(size - len(head), 0)
    body = line * (remaining // len(line))
    tail = remaining - len(body)
    if tail >= 2:
        body += b"y" * (tail - 2) + b"\r\n"
    return head + body


@dataclass
class Result:
    target: str
    connections: int
    messages_per_connection: int
    size: int
    accepted: int = 0
    sessions: int = 0
    errors: int = 0
    seconds: float = 0.0
    msgs_per_s: float = 0.0
    sessions_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    server_cpu_percent: float | None = None
    cpu_seconds: float = 0.0  # this generator's own CPU while it ran (not its start-up)
    started_at: float = 0.0  # wall clock, before the first connect
    finished_at: float = 0.0  # wall clock, after the last reply
    error_samples: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """What every client does, and where they all record what happened."""

    target: tuple[str, int]
    messages: int
    body: bytes
    rcpt: str
    deadline: float
    repeat: bool
    result: Result
    latencies: list[float] = field(default_factory=list)
    mailboxes: int = 1  # >1: the recipient's local part gets a number, message by message
    total: int = 0  # >0: sessions repeat until this many messages were sent
    sent: int = 0  # messages started (counts towards `total`)
    last_recipient: str = ""
    record: int | None = None  # a file descriptor: number each message, log each 250

    def __post_init__(self) -> None:
        self.data = self.body + b".\r\n"  # what follows the 354

    def recipient(self) -> str:
        if self.mailboxes <= 1:
            return self.rcpt
        local, _, domain = self.rcpt.rpartition("@")
        return f"{local}{self.sent % self.mailboxes}@{domain}"

    def take(self) -> bool:
        """One more message may be sent (bounded by `total`)."""
        if self.total and self.sent >= self.total:
            return False
        self.sent += 1
        return True


class _Client:
    """One client: sessions of `plan.messages` messages, as a state machine that
    `_Loop` drives. The wire is what a blocking client writes, write for write: EHLO
    after the greeting; per message MAIL, RCPT and DATA in one write when PIPELINING is
    offered (one write each, each reply awaited, when it is not), the body after the
    354, the next message after the 250; QUIT after the last. Every reply is read and
    its code checked, never assumed."""

    __slots__ = (
        "data",
        "expect",
        "heard_at",
        "inbox",
        "left",
        "loop",
        "number",
        "outbox",
        "pipelining",
        "plan",
        "sent_at",
        "sock",
        "state",
    )

    def __init__(self, plan: Plan, loop: _Loop) -> None:
        self.plan, self.loop = plan, loop
        self.sock: socket.socket | None = None
        self.inbox = b""
        self.outbox = b""
        self.state = ""
        self.pipelining = False
        self.left = 0  # messages this session may still send
        self.expect: list[tuple[bytes, bytes | None]] = []  # (code, what to write on it)
        self.sent_at = 0.0  # when the body went (latency: to its reply)
        self.heard_at = 0.0  # last progress (the 30 s timeout)
        self.data = plan.data  # what follows this message's 354
        self.number = 0  # this message's number (with --record)

    def connect(self) -> None:
        target = self.plan.target
        family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex(target)  # an IP literal: no name lookup
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self._failed(f"connect: {os.strerror(code)}")
            return
        self.sock, self.inbox, self.outbox, self.state = sock, b"", b"", "connect"
        self.heard_at = time.monotonic()
        self.loop.watch(self, select.EPOLLOUT)

    def on_event(self, events: int) -> None:
        try:
            if self.state == "connect":
                assert self.sock is not None
                code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    self._failed(f"connect: {os.strerror(code)}")
                    return
                self.state = "greeting"
                self.loop.rewatch(self, select.EPOLLIN)
                return
            if events & select.EPOLLOUT and self.outbox:
                self._write(b"")
            if events & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                self._read()
        except (OSError, RuntimeError, ConnectionError) as error:
            self._failed(str(error))

    def timed_out(self, now: float) -> None:
        if self.sock is not None and now - self.heard_at > SOCKET_TIMEOUT:
            self._failed("timed out")

    def close(self) -> None:
        if self.sock is not None:
            self.loop.forget(self)
            self.sock.close()
            self.sock = None

    def _read(self) -> None:
        assert self.sock is not None
        try:
            chunk = self.sock.recv(65536)
        except BlockingIOError:
            return
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.heard_at = time.monotonic()
        self.inbox += chunk
        while self.sock is not None:
            lines = self._reply()
            if lines is None:
                return
            self._on_reply(lines)

    def _reply(self) -> list[bytes] | None:
        """The next whole reply's lines, if the buffer holds one."""
        buffer, start, lines = self.inbox, 0, []
        while True:
            end = buffer.find(b"\r\n", start)
            if end < 0:
                return None
            line = buffer[start:end]
            lines.append(line)
            start = end + 2
            if len(line) < 4 or line[3] == 32:  # b" ": the last line of the reply
                self.inbox = buffer[start:]
                return lines

    def _on_reply(self, lines: list[bytes]) -> None:
        last = lines[-1]
        state = self.state
        if state == "envelope":
            code, then = self.expect.pop(0)
            _expect(last, code)
            if then is self.data:
                self.state = "data"
                self.sent_at = time.perf_counter()
            if then is not None:
                self._write(then)
        elif state == "data":
            _expect(last, b"250")
            self.plan.latencies.append(time.perf_counter() - self.sent_at)
            self.plan.result.accepted += 1
            if self.plan.record is not None:
                os.write(self.plan.record, b"%0*d\n" % (RECORD_WIDTH, self.number))
            self._next_message()
        elif state == "greeting":
            _expect(last, b"220")
            self.state = "ehlo"
            self._write(b"EHLO bench.test\r\n")
        elif state == "ehlo":
            _expect(last, b"250")
            self.pipelining = any(b"PIPELINING" in line.upper() for line in lines)
            self.left = self.plan.messages
            self._next_message()
        elif state == "quit":
            self.plan.result.sessions += 1
            self.close()
            self.loop.ended(self)

    def _next_message(self) -> None:
        plan = self.plan
        if self.left <= 0 or time.monotonic() > plan.deadline or not _take(plan):
            self.state = "quit"
            self._write(b"QUIT\r\n")
            return
        self.left -= 1
        if plan.record is not None:
            self.number = plan.sent
            self.data = make_body(len(plan.body), self.number) + b".\r\n"
        rcpt = f"RCPT TO:<{plan.last_recipient}>\r\n".encode()
        self.state = "envelope"
        if self.pipelining:
            self.expect = [(b"250", None), (b"250", None), (b"354", self.data)]
            self._write(_MAIL + rcpt + _DATA)
        else:
            self.expect = [(b"250", rcpt), (b"250", _DATA), (b"354", self.data)]
            self._write(_MAIL)

    def _write(self, data: bytes) -> None:
        """Write now; what the socket does not take waits for EPOLLOUT (a 100 KiB body)."""
        assert self.sock is not None
        waiting = bool(self.outbox)
        if waiting:
            data = self.outbox + data
        try:
            sent = self.sock.send(data) if data else 0
        except BlockingIOError:
            sent = 0
        self.outbox = data[sent:]
        if self.outbox and not waiting:
            self.loop.rewatch(self, select.EPOLLIN | select.EPOLLOUT)
        elif waiting and not self.outbox:
            self.loop.rewatch(self, select.EPOLLIN)

    def _failed(self, message: str) -> None:
        result = self.plan.result
        result.errors += 1
        if len(result.error_samples) < 5:
            result.error_samples.append(message)
        self.close()
        self.loop.ended(self)


_MAIL = b"MAIL FROM:<load@bench.test>\r\n"
_DATA = b"DATA\r\n"
SOCKET_TIMEOUT = 30.0  # no progress on a connection for this long: an error


def _take(plan: Plan) -> bool:
    """One more message may be sent (bounded by `total`); its recipient is chosen
    first, from the count before it."""
    plan.last_recipient = plan.recipient()
    return plan.take()


def _expect(reply: bytes, code: bytes) -> None:
    if not reply.startswith(code):
        raise RuntimeError(f"expected {code.decode()}, got {reply[:80]!r}")


class _Loop:
    """Every client on one epoll: no threads, no greenlets, so the generator spends its
    CPU on the sockets (it shares the machine with the server it measures)."""

    def __init__(self, plan: Plan, clients: int, progress: bool) -> None:
        self.plan = plan
        self.epoll = select.epoll()
        self.by_fd: dict[int, _Client] = {}
        self.clients = [_Client(plan, self) for _ in range(clients)]
        self.running = len(self.clients)
        self.progress = progress

    def watch(self, client: _Client, events: int) -> None:
        assert client.sock is not None
        self.by_fd[client.sock.fileno()] = client
        self.epoll.register(client.sock.fileno(), events)

    def rewatch(self, client: _Client, events: int) -> None:
        assert client.sock is not None
        self.epoll.modify(client.sock.fileno(), events)

    def forget(self, client: _Client) -> None:
        assert client.sock is not None
        fd = client.sock.fileno()
        self.by_fd.pop(fd, None)
        self.epoll.unregister(fd)

    def ended(self, client: _Client) -> None:
        """A session ended: the client starts another, or is done."""
        plan = self.plan
        finished = plan.total and plan.sent >= plan.total
        if (
            finished
            or not plan.repeat
            or time.monotonic() > plan.deadline
            or plan.result.errors > 100
        ):
            self.running -= 1
        else:
            client.connect()

    def run(self, started: float, stop_at: float, expected: int) -> None:
        for client in self.clients:
            client.connect()
        by_fd, poll = self.by_fd, self.epoll.poll
        next_tick = time.monotonic() + 1.0
        while self.running > 0:
            for fd, events in poll(0.25):
                ready = by_fd.get(fd)
                if ready is not None:
                    ready.on_event(events)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + 1.0
                for client in self.clients:
                    client.timed_out(now)
                if self.progress:
                    _progress(self.plan.result, started, expected, now)
            if now > stop_at:
                break
        for client in self.clients:
            client.close()
        self.epoll.close()
        if self.progress:
            print(file=sys.stderr)


def _cpu_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


def _progress(result: Result, started: float, total: int, now: float) -> None:
    elapsed = now - started
    rate = result.accepted / elapsed if elapsed else 0
    of = f"/{total}" if total else ""
    print(
        f"\r  {result.accepted}{of} messages, {rate:,.0f} msg/s, {result.errors} errors",
        end="",
        file=sys.stderr,
        flush=True,
    )


def run(
    target: tuple[str, int],
    connections: int,
    messages: int,
    size: int,
    *,
    rcpt: str = "user@bench.test",
    max_seconds: float = 60.0,
    server_pid: int | None = None,
    progress: bool = True,
    duration: float | None = None,
    mailboxes: int = 1,
    total: int = 0,
    record: Path | None = None,
) -> Result:
    """Run the load. With `duration`, every client repeats sessions for that long
    (bounded by max_seconds too); with `total`, until that many messages were sent
    (bounded by max_seconds too); else each runs one session. `mailboxes` > 1 spreads
    the messages over that many recipients (`user0@…`, `user1@…`, …). With `record`, each
    message is numbered and each number answered 250 is appended to that file (see the
    module's docstring)."""
    result = Result(f"{target[0]}:{target[1]}", connections, messages, size)
    result.started_at = time.time()
    ticks_before = _cpu_ticks(server_pid) if server_pid else None
    own_cpu = time.process_time()
    started = time.monotonic()
    deadline = started + min(max_seconds, duration or max_seconds)
    expected = total or (connections * messages if duration is None else 0)
    repeat = duration is not None or total > 0
    plan = Plan(target, messages, make_body(size, 0), rcpt, deadline, repeat, result)
    plan.mailboxes, plan.total = mailboxes, total
    if record is not None:
        plan.record = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o644)
    try:
        _Loop(plan, connections, progress).run(started, started + max_seconds + 30, expected)
    finally:
        if plan.record is not None:
            os.close(plan.record)
    elapsed = time.monotonic() - started
    result.finished_at = time.time()
    result.seconds = round(elapsed, 3)
    result.cpu_seconds = round(time.process_time() - own_cpu, 3)
    result.msgs_per_s = round(result.accepted / elapsed, 1) if elapsed else 0.0
    result.sessions_per_s = round(result.sessions / elapsed, 1) if elapsed else 0.0
    latencies = plan.latencies
    if latencies:
        ordered = sorted(latencies)
        result.p50_ms = round(ordered[len(ordered) // 2] * 1000, 2)
        result.p99_ms = round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 2)
    if server_pid and ticks_before is not None:
        ticks_after = _cpu_ticks(server_pid)
        if ticks_after is not None:
            hertz = os.sysconf("SC_CLK_TCK")
            result.server_cpu_percent = round(
                (ticks_after - ticks_before) / hertz / elapsed * 100, 1
            )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--target", type=parse_target, default=("127.0.0.1", 2525))
    parser.add_argument("-c", "--connections", type=int, default=10)
    parser.add_argument("-m", "--messages", type=int, default=100, help="messages per connection")
    parser.add_argument("-s", "--size", type=parse_size, default=1024)
    parser.add_argument("--to", default="user@bench.test", help="recipient of every message")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="stop sending after this")
    parser.add_argument(
        "--duration", type=float, help="repeat sessions for this many seconds (bounded)"
    )
    parser.add_argument(
        "--mailboxes", type=int, default=1, help="spread over N recipients: user0@…, user1@…"
    )
    parser.add_argument(
        "--total", type=int, default=0, help="repeat sessions until N messages were sent"
    )
    parser.add_argument(
        "--record", type=Path, help="number the messages, append each one answered 250 here"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.add_argument("--pid", type=int, help="server PID, to report its CPU use")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.connections < 1 or args.messages < 1 or args.connections * args.messages > 10_000_000:
        parser.error("connections and messages must be positive and bounded")
    result = run(
        args.target,
        args.connections,
        args.messages,
        args.size,
        rcpt=args.to,
        max_seconds=args.max_seconds,
        server_pid=args.pid,
        progress=not args.quiet,
        duration=args.duration,
        mailboxes=args.mailboxes,
        total=args.total,
        record=args.record,
    )
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        for key, value in asdict(result).items():
            print(f"{key}: {value}")
    return 0 if result.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
