"""Metrics and log pieces that need no server: how a failure is classed as a bounce,
the multiprocess mode of every gauge, when stderr counts as the journal."""

from __future__ import annotations

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
