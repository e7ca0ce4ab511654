"""Load generator: C concurrent SMTP sessions, each sending M messages of S bytes.

    python -m bench.load --target 127.0.0.1:2525 -c 100 -m 100 -s 1KiB

Uses PIPELINING when the server offers it (MAIL, RCPT and DATA in one write, as RFC 2920
allows; the body after the 354). Reports accepted messages/s, sessions/s, the latency
from the end of DATA to the reply (p50/p99), errors, and the server's CPU when given
its PID. Bounded by count and by time; refuses any target outside loopback.

With `--record FILE` every message carries its own number (`Subject: bench N`, N from 1,
the size unchanged) and the number of each message answered 250 is appended to FILE as
it is answered (RECORD_WIDTH digits and a newline, written at once): what a harness
needs to check that every acknowledged message arrived, and to follow the load's
progress from outside while it runs (the file's size ÷ bench.peers.RECORD_BYTES).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import ipaddress  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
from gevent.pool import Pool  # noqa: E402

from bench.peers import RECORD_WIDTH  # noqa: E402

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
    started_at: float = 0.0  # wall clock, before the first connect
    finished_at: float = 0.0  # wall clock, after the last reply
    error_samples: list[str] = field(default_factory=list)


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def reply_lines(self) -> list[bytes]:
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("server closed the connection")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line)
            if len(line) < 4 or line[3:4] == b" ":
                return lines

    def reply(self) -> str:
        return self.reply_lines()[-1].decode("utf-8", "replace")


def _expect(reply: str, code: str) -> None:
    if not reply.startswith(code):
        raise RuntimeError(f"expected {code}, got {reply[:80]!r}")


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
    record: int | None = None  # a file descriptor: number each message, log each 250

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


def worker(plan: Plan) -> None:
    """One client: a session of `messages` messages; with `repeat`, new sessions until
    the deadline (how M=1 measures connection set-up)."""
    while True:
        session(plan)
        finished = plan.total and plan.sent >= plan.total
        if (
            finished
            or not plan.repeat
            or time.monotonic() > plan.deadline
            or plan.result.errors > 100
        ):
            return


def session(plan: Plan) -> None:
    target, messages, body = plan.target, plan.messages, plan.body
    result, latencies, deadline = plan.result, plan.latencies, plan.deadline
    family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(30)
    try:
        sock.connect(target)  # an IP literal: no name lookup (create_connection would)
    except OSError as error:
        sock.close()
        result.errors += 1
        if len(result.error_samples) < 5:
            result.error_samples.append(f"connect: {error}")
        return
    reader = _Reader(sock)
    try:
        _expect(reader.reply(), "220")
        sock.sendall(b"EHLO bench.test\r\n")
        ehlo = reader.reply_lines()
        pipelining = any(b"PIPELINING" in line.upper() for line in ehlo)
        data = body + b".\r\n"
        size = len(body)
        for _ in range(messages):
            if time.monotonic() > deadline:
                break
            rcpt = plan.recipient()
            if not plan.take():
                break
            number = plan.sent
            if plan.record is not None:
                data = make_body(size, number) + b".\r\n"
            envelope = [
                b"MAIL FROM:<load@bench.test>\r\n",
                f"RCPT TO:<{rcpt}>\r\n".encode(),
                b"DATA\r\n",
            ]
            if pipelining:
                sock.sendall(b"".join(envelope))
                for code in ("250", "250", "354"):
                    _expect(reader.reply(), code)
            else:
                for command, code in zip(envelope, ("250", "250", "354"), strict=True):
                    sock.sendall(command)
                    _expect(reader.reply(), code)
            started = time.perf_counter()
            sock.sendall(data)
            _expect(reader.reply(), "250")
            latencies.append(time.perf_counter() - started)
            result.accepted += 1
            if plan.record is not None:
                os.write(plan.record, b"%0*d\n" % (RECORD_WIDTH, number))
        sock.sendall(b"QUIT\r\n")
        reader.reply()
        result.sessions += 1
    except (OSError, RuntimeError, ConnectionError) as error:
        result.errors += 1
        if len(result.error_samples) < 5:
            result.error_samples.append(str(error))
    finally:
        sock.close()


def _cpu_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


def _progress(result: Result, started: float, total: int, stop: gevent.event.Event) -> None:
    while not stop.wait(1.0):
        elapsed = time.monotonic() - started
        rate = result.accepted / elapsed if elapsed else 0
        of = f"/{total}" if total else ""
        print(
            f"\r  {result.accepted}{of} messages, {rate:,.0f} msg/s, {result.errors} errors",
            end="",
            file=sys.stderr,
            flush=True,
        )
    print(file=sys.stderr)


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
    latencies: list[float] = []
    body = make_body(size, 0)
    pool = Pool(connections)
    ticks_before = _cpu_ticks(server_pid) if server_pid else None
    started = time.monotonic()
    deadline = started + min(max_seconds, duration or max_seconds)
    stop = gevent.event.Event()
    expected = total or (connections * messages if duration is None else 0)
    reporter = gevent.spawn(_progress, result, started, expected, stop) if progress else None
    repeat = duration is not None or total > 0
    plan = Plan(target, messages, body, rcpt, deadline, repeat, result, latencies)
    plan.mailboxes, plan.total = mailboxes, total
    if record is not None:
        plan.record = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o644)
    try:
        for _ in range(connections):
            pool.spawn(worker, plan)
        pool.join(timeout=max_seconds + 30)
        pool.kill()
    finally:
        if plan.record is not None:
            os.close(plan.record)
    elapsed = time.monotonic() - started
    result.finished_at = time.time()
    stop.set()
    if reporter is not None:
        reporter.join()
    result.seconds = round(elapsed, 3)
    result.msgs_per_s = round(result.accepted / elapsed, 1) if elapsed else 0.0
    result.sessions_per_s = round(result.sessions / elapsed, 1) if elapsed else 0.0
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
