"""Metrics and log pieces that need no server: how a failure is classed as a bounce,
the multiprocess mode of every gauge, when stderr counts as the journal."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
from prometheus_client import Gauge

from gsmtp import log, metrics
from gsmtp.message import MessageId, Outcome
from gsmtp.queue.attempt import ADMIN_BOUNCE_REPLY, bounce_reason
from gsmtp.spool import RecipientUpdate


def failed(error: str, status: str) -> RecipientUpdate:
    return RecipientUpdate(MessageId("m"), "a@b.test", Outcome.FAILED, error, 0.0, status=status)


def test_bounce_reasons() -> None:
    assert bounce_reason(failed(ADMIN_BOUNCE_REPLY, "5.0.0")) == "admin"
    assert bounce_reason(failed("Delivery time expired; last error: 451", "4.4.7")) == "expired"
    assert bounce_reason(failed("550 5.1.1 no such user", "5.1.1")) == "rejected"
    assert {"admin", "expired", "rejected"} == set(metrics.BOUNCE_REASONS)


def test_every_gauge_says_how_it_combines_over_worker_processes() -> None:
    """prometheus_client's default ("all": one series per PID) is never what a gauge
    here means; each names a mode that leaves dead workers out: livesum (counts),
    livemax (ages, facts of the build), livemin (the weakest worker: reload status,
    the soonest certificate expiry)."""
    gauges = [value for value in vars(metrics).values() if isinstance(value, Gauge)]
    assert len(gauges) >= 10
    for gauge in gauges:
        assert gauge._multiprocess_mode in ("livesum", "livemax", "livemin"), gauge._name


def test_unknown_tls_versions_are_one_bounded_label() -> None:
    before = metrics.TLS_SESSIONS.labels("other")._value.get()
    metrics.tls_session("SSLv3")
    metrics.tls_session(None)
    assert metrics.TLS_SESSIONS.labels("other")._value.get() == before + 2


def test_under_journald_only_when_stderr_is_the_named_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "stream"
    path.touch()
    with path.open("w") as stream:
        status = os.fstat(stream.fileno())
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        assert not log.under_journald(stream)
        monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")
        assert log.under_journald(stream)
        monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino + 1}")
        assert not log.under_journald(stream)


@pytest.mark.parametrize(
    ("now", "written"),
    [
        (1_764_753_456_677_997_123, "2025-12-03T09:17:36.677997Z"),
        (1_764_753_456_000_000_000, "2025-12-03T09:17:36.000000Z"),
        (1_764_753_459_999_999_999, "2025-12-03T09:17:39.999999Z"),
        (951_782_400_500_000_000, "2000-02-29T00:00:00.500000Z"),
    ],
)
def test_log_lines_are_stamped_in_utc_as_structlogs_iso_stamper_would(
    now: int, written: str
) -> None:
    """The stamper that formats the date and time once a second writes what structlog's
    TimeStamper(fmt="iso", utc=True) writes (datetime's isoformat), the microseconds
    always there; a second's text is never reused for another second."""
    clock = iter([now - 1_500_000_000, now])
    stamper = log._UtcStamper(clock=lambda: next(clock))
    stamper(None, "info", {})
    assert stamper(None, "info", {}) == {"timestamp": written}
    at = datetime.datetime.fromtimestamp(now // 1000 / 1_000_000, tz=datetime.UTC)
    assert at.isoformat(timespec="microseconds").replace("+00:00", "Z") == written
