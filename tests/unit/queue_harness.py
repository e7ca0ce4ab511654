"""Fakes and a real spool for the queue manager's tests: a clock to set by hand, and
deliverers whose behaviour is chosen per destination domain."""

from __future__ import annotations

import email
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

import gevent
from gevent.event import Event

from gsmtp import db
from gsmtp.acceptance import Acceptor
from gsmtp.config import DeliveryConfig
from gsmtp.delivery.maildir import DELIVERIES_AT_ONCE
from gsmtp.message import MessageId, NewMessage, Outcome, QueuedMessage, RecipientResult
from gsmtp.queue import DeliveryPacer, Notices, NoticeSettings, QueueManager, RetryPolicy
from gsmtp.routing import Route
from gsmtp.spool import Spool
from gsmtp.spool_admin import SpoolAdmin
from gsmtp.writer import GroupCommitter

DEFAULTS = DeliveryConfig()  # the shape under test: pool 100, windows of 20, 10,000 held
HOSTNAME = "mx.local.example"
LOCAL_DOMAINS = ("local.example", HOSTNAME)


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


Behaviour = Callable[[QueuedMessage, Sequence[str]], list[RecipientResult]]


def reply(outcome: Outcome, **extra: Any) -> Behaviour:
    code = {
        Outcome.DELIVERED: ("2.0.0", "250 2.0.0 ok"),
        Outcome.DEFERRED: ("4.3.0", "451 4.3.0 try later"),
        Outcome.FAILED: ("5.1.1", "550 5.1.1 no such user"),
    }[outcome]
    return lambda message, rcpts: [
        RecipientResult(r, outcome, code[0], code[1], "mx.remote", **extra) for r in rcpts
    ]


UNREACHABLE = reply(Outcome.DEFERRED, unreachable=True)


@dataclass
class FakeDeliverer:
    """Delivers after `delay` seconds (real time: a greenlet sleep), doing what the
    behaviour for the recipients' domain says; `hold` blocks a domain until set."""

    delay: float = 0.001
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    hold: dict[str, Event] = field(default_factory=dict)
    calls: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    active: Counter[str] = field(default_factory=Counter)
    max_active: Counter[str] = field(default_factory=Counter)
    in_flight: set[str] = field(default_factory=set)
    overlaps: list[str] = field(default_factory=list)
    total_active: int = 0
    max_total: int = 0

    def deliver(self, message: QueuedMessage, recipients: Sequence[str]) -> list[RecipientResult]:
        domain = recipients[0].rpartition("@")[2]
        self.calls.append((message.id, tuple(recipients)))
        self.bodies.append(message.body)
        keys = [f"{message.id}/{r}" for r in recipients]
        self.overlaps += [key for key in keys if key in self.in_flight]
        self.in_flight.update(keys)
        self.active[domain] += 1
        self.max_active[domain] = max(self.max_active[domain], self.active[domain])
        self.total_active += 1
        self.max_total = max(self.max_total, self.total_active)
        try:
            gevent.sleep(self.delay)
            if domain in self.hold:
                self.hold[domain].wait()
            behaviour = self.behaviours.get(domain, reply(Outcome.DELIVERED))
            return behaviour(message, recipients)
        finally:
            self.active[domain] -= 1
            self.total_active -= 1
            self.in_flight.difference_update(keys)

    def calls_for(self, domain: str) -> list[tuple[str, tuple[str, ...]]]:
        return [c for c in self.calls if c[1][0].endswith("@" + domain)]


def route(address: str) -> Route:
    domain = address.rpartition("@")[2]
    return Route("local" if domain in LOCAL_DOMAINS else "smtp", domain)


class ClaimRecordingSpool(Spool):
    """Records each claim: how many rows it asked for and scanned, the lane its domain
    filter kept it to (None: any row), and how many recipients it took."""

    def __init__(self, inner: Spool) -> None:
        super().__init__(inner._writer, inner._reader)
        self.limits: list[int] = []
        self.scans: list[int] = []
        self.lanes: list[str | None] = []
        self.taken: list[int] = []

    def claim_due(self, now: float, limit: int, **kwargs: Any) -> Any:
        self.limits.append(limit)
        self.scans.append(kwargs.get("scan") or limit)
        domains = kwargs.get("domains")
        self.lanes.append(None if domains is None else "local" if domains.inside else "smtp")
        result = super().claim_due(now, limit, **kwargs)
        self.taken.append(sum(len(claim.recipients) for claim in result.claims))
        return result


class QueueWorld:
    """A real spool in a temporary directory, with a queue manager over fakes."""

    def __init__(self, directory: Path, clock: FakeClock) -> None:
        self.path = str(directory / "spool.sqlite")
        self.writer = GroupCommitter(self.path)
        self.spool = Spool(self.writer, db.connect(self.path))
        self.admin = SpoolAdmin(db.connect(self.path))
        self.clock = clock
        self.remote = FakeDeliverer()
        self.local = FakeDeliverer()
        self.managers: list[QueueManager] = []
        self._ids = 0

    def manager(
        self,
        *,
        spool: Spool | None = None,
        delay_warning: float | None = DEFAULTS.delay_warning,
        retry: tuple[float, ...] = DEFAULTS.retry,
        max_age: float = DEFAULTS.max_age,
        **overrides: Any,
    ) -> QueueManager:
        spool = spool or self.spool
        settings: dict[str, Any] = {
            "concurrency": DEFAULTS.concurrency,
            # A test that sets a small pool means it for the local fake too.
            "local_concurrency": overrides.get("concurrency", DELIVERIES_AT_ONCE),
            "max_per_domain": DEFAULTS.max_per_domain,
            "active_limit": DEFAULTS.active_limit,
            **overrides,
        }
        manager = QueueManager(
            spool=spool,
            deliverers={"smtp": self.remote, "local": self.local},
            route=route,
            local_domains=lambda: frozenset(LOCAL_DOMAINS),
            retry=RetryPolicy(retry, max_age, jitter=lambda: 0.0),
            notices=Notices(
                spool=spool,
                writer=Acceptor(HOSTNAME),
                settings=NoticeSettings(f"postmaster@{HOSTNAME}", delay_warning, max_age),
                clock=self.clock,
            ),
            clock=self.clock,
            # Other processes share the test machine: a pacer reading their load as
            # event-loop lag would change the shape under test.
            # No SMTP server here: no client is ever served (the local lane runs whole).
            pacer=DeliveryPacer(settings["concurrency"], high=float("inf"), clients=lambda: 0),
            **settings,
        )
        self.managers.append(manager)
        return manager

    def enqueue(
        self,
        recipients: Sequence[str],
        *,
        sender: str = "sender@local.example",
        body: bytes = b"Subject: test\r\n\r\nbody\r\n",
        received_at: float | None = None,
    ) -> MessageId:
        self._ids += 1
        message_id = MessageId(f"M{self._ids:05d}")
        self.spool.enqueue(
            NewMessage(
                message_id,
                sender,
                tuple(recipients),
                body,
                self.clock() if received_at is None else received_at,
                "192.0.2.1",
                "client.example",
            )
        )
        return message_id

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        return db.query(self.admin._db, sql, params)

    def owned(self, domain: str = "") -> int:
        """Recipients (of `domain`) owned by the running queue manager."""
        return int(
            self.rows(
                "SELECT COUNT(*) FROM recipients WHERE claimed_due IS NOT NULL AND address LIKE ?",
                f"%@{domain}" if domain else "%",
            )[0][0]
        )

    def messages_left(self) -> int:
        return int(self.rows("SELECT COUNT(*) FROM messages")[0][0])

    def notices_to(self, address: str) -> list[Message]:
        """Notices delivered (by the fakes) to `address`, parsed."""
        found = []
        for deliverer in (self.local, self.remote):
            for (_, rcpts), body in zip(deliverer.calls, deliverer.bodies, strict=True):
                if address in rcpts and b"report-type=delivery-status" in body:
                    found.append(email.message_from_bytes(body))
        return found

    def close(self) -> None:
        for manager in self.managers:
            manager.stop(1.0)
        # With a timeout, as the server stops it: waiting without one, while the thread
        # still ran a unit and nothing else kept the event loop alive, raised LoopExit,
        # and every later test of that pytest worker failed at its own stop.
        assert self.writer.stop(timeout=30.0), "the spool writer did not stop"


def report_blocks(notice: Message) -> list[Message]:
    """The per-recipient blocks of a notice's message/delivery-status part."""
    (part,) = [p for p in notice.walk() if p.get_content_type() == "message/delivery-status"]
    payload = part.get_payload()
    assert isinstance(payload, list)
    return payload[1:]


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> None:
    """Poll with a deadline (cooperatively: the queue manager runs meanwhile)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        gevent.sleep(0.005)


@contextmanager
def world(directory: Path, clock: FakeClock | None = None) -> Iterator[QueueWorld]:
    queue_world = QueueWorld(directory, clock or FakeClock())
    try:
        yield queue_world
    finally:
        queue_world.close()
