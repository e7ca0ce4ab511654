"""SIGHUP and SIGUSR1 during start-up (gsmtp.early_signals): remembered, not fatal."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from gsmtp import early_signals


@pytest.fixture
def handlers() -> Iterator[None]:
    """The test process's own handlers, put back afterwards."""
    saved = {signum: signal.getsignal(signum) for signum in early_signals.DEFERRED}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_signals_before_the_handlers_are_remembered_once(handlers: None) -> None:
    early_signals.defer()
    os.kill(os.getpid(), signal.SIGHUP)  # the default action would end this process
    os.kill(os.getpid(), signal.SIGHUP)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert early_signals.take() == {signal.SIGHUP, signal.SIGUSR1}
    assert early_signals.take() == frozenset()


def test_deferring_again_keeps_what_arrived_unless_told_to_forget(handlers: None) -> None:
    """The CLI defers, then `serve`: a SIGHUP in between is kept. A forked worker
    defers with forget: its parent's signals are not its own."""
    early_signals.defer()
    os.kill(os.getpid(), signal.SIGHUP)
    early_signals.defer()
    assert early_signals.take() == {signal.SIGHUP}
    os.kill(os.getpid(), signal.SIGUSR1)
    early_signals.defer(forget=True)
    assert early_signals.take() == frozenset()
