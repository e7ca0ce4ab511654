from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import GsmtpProcess

Factory = Callable[..., GsmtpProcess]


@pytest.fixture
def gsmtp_factory(tmp_path: Path) -> Iterator[Factory]:
    """Build (and always stop) gsmtp processes with extra settings."""
    started: list[GsmtpProcess] = []

    def make(
        settings: dict[str, dict[str, Any]] | None = None, *, start: bool = True
    ) -> GsmtpProcess:
        directory = tmp_path / f"gsmtp{len(started)}"
        directory.mkdir()
        process = GsmtpProcess(directory, settings)
        process.add_default_accounts()
        started.append(process)
        if start:
            process.start()
        return process

    yield make
    for process in started:
        process.stop()


@pytest.fixture
def gsmtp(gsmtp_factory: Factory) -> GsmtpProcess:
    return gsmtp_factory()
