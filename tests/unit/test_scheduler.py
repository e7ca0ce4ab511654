"""The queue runner with fake deliverers over a real spool file."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import gevent
import pytest

from gsmtp import db
from gsmtp.acceptance import Acceptor
from gsmtp.message import MessageId, NewMessage, Outcome, QueuedMessage, RecipientResult
from gsmtp.routing import Route
from gsmtp.scheduler import RetryPolicy, Scheduler
from gsmtp.spool import Spool, SpoolAdmin
from gsmtp.writer import GroupCommitter


class FakeDeliverer:
    def __init__(self, outcome: Outcome = Outcome.DELIVERED, raise_for: str = "") -> None:
        self.outcome = outcome
        self.raise_for = raise_for
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.active = 0
        self.max_active = 0

    def deliver(self, message: QueuedMessage, recipients: Sequence[str]) -> list[RecipientResult]:
        self.calls.append((message.id, tuple(recipients)))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            gevent.sleep(0.01)
            if message.id == self.raise_for:
                raise RuntimeError("poison")
            code = "250 ok" if self.outcome is Outcome.DELIVERED else "550 5.1.1 no"
            return [RecipientResult(r, self.outcome, "5.1.1", code) for r in recipients]
        finally:
            self.active -= 1


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[tuple[Spool, SpoolAdmin]]:
    path = str(tmp_path / "spool.sqlite")
    writer = GroupCommitter(path)
    yield Spool(writer, db.connect(path)), SpoolAdmin(db.connect(path))
    writer.stop()


def make_scheduler(spool: Spool, deliverer: FakeDeliverer, max_per_domain: int = 20) -> Scheduler:
    return Scheduler(
        spool=spool,
        deliverers={"smtp": deliverer},
        route=lambda rcpt: Route("smtp", rcpt.rpartition("@")[2]),
        retry=RetryPolicy((3600.0,), max_age=86400.0, jitter=lambda: 0.0),
        acceptor=Acceptor("mx.local.example"),
        concurrency=10,
        max_per_domain=max_per_domain,
    )


def enqueue(
    spool: Spool, index: int, recipients: tuple[str, ...], sender: str = "s@local.example"
) -> None:
    import time

    spool.enqueue(
        NewMessage(
            MessageId(f"M{index:04d}"),
            sender,
            recipients,
            b"Subject: x\r\n\r\nb\r\n",
            time.time(),
            "c",
            "h",
        )
    )


def wait_until(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    with gevent.Timeout(timeout):
        while not condition():
            gevent.sleep(0.01)


def test_batches_by_domain_and_marks_delivered(spool) -> None:  # type: ignore[no-untyped-def]
    store, admin = spool
    deliverer = FakeDeliverer()
    enqueue(store, 1, ("a@x.example", "b@x.example", "c@y.example"))
    scheduler = make_scheduler(store, deliverer)
    scheduler.start()
    wait_until(lambda: admin.stats()["messages"] == 0)
    scheduler.stop(1)
    assert sorted(r for _, r in deliverer.calls) == [
        ("a@x.example", "b@x.example"),
        ("c@y.example",),
    ]


def test_a_crashing_delivery_defers_and_the_runner_goes_on(spool) -> None:  # type: ignore[no-untyped-def]
    """D-44: one poison message does not stop the others."""
    store, admin = spool
    deliverer = FakeDeliverer(raise_for="M0001")
    enqueue(store, 1, ("a@x.example",))
    enqueue(store, 2, ("b@x.example",))
    scheduler = make_scheduler(store, deliverer)
    scheduler.start()
    wait_until(lambda: admin.stats()["messages"] == 1)
    scheduler.stop(1)
    row = admin.message("M0001")
    assert row is not None
    assert row.recipients[0].status == "queued" and row.recipients[0].attempts == 1
    assert "451 4.3.0" in (row.recipients[0].last_error or "")


def test_per_domain_cap(spool) -> None:  # type: ignore[no-untyped-def]
    store, admin = spool
    deliverer = FakeDeliverer()
    for index in range(12):
        enqueue(store, index, (f"u{index}@same.example",))
    scheduler = make_scheduler(store, deliverer, max_per_domain=3)
    scheduler.start()
    wait_until(lambda: admin.stats()["messages"] == 0)
    scheduler.stop(1)
    assert len(deliverer.calls) == 12
    assert deliverer.max_active == 3


def test_failure_bounces_once_to_the_sender_and_never_to_null(spool) -> None:  # type: ignore[no-untyped-def]
    store, admin = spool
    deliverer = FakeDeliverer(Outcome.FAILED)
    enqueue(store, 1, ("a@x.example", "b@x.example"))
    enqueue(store, 2, ("c@x.example",), sender="")
    scheduler = make_scheduler(store, deliverer)
    scheduler.start()
    # The bounce to s@local.example is itself routed through the failing fake; it is
    # from <>, so it fails without a bounce of its own.
    wait_until(lambda: admin.stats()["messages"] == 0 and len(deliverer.calls) >= 3)
    scheduler.stop(1)
    bounce_calls = [rcpts for _, rcpts in deliverer.calls if rcpts == ("s@local.example",)]
    assert len(bounce_calls) == 1
    assert len(deliverer.calls) == 3
