"""Fixtures shared by the unit tests that talk to peers over loopback."""

from __future__ import annotations

import socket

import pytest


@pytest.fixture
def port() -> int:
    """A port free on 127.0.1.1 (used on 127.0.1.2 too)."""
    with socket.socket() as probe:
        probe.bind(("127.0.1.1", 0))
        return int(probe.getsockname()[1])
