from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import GsmtpProcess, environment_has, free_port
from tests.integration.remote import Dnsmasq, ScriptedPeer, Sink

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


# The test zones dnsmasq serves: MX hosts on 127.0.0.x, each test's sinks listen there.
RECORDS = [
    "--mx-host=pref.test,mx1.pref.test,10",
    "--mx-host=pref.test,mx2.pref.test,20",
    "--host-record=mx1.pref.test,127.0.0.2",
    "--host-record=mx2.pref.test,127.0.0.3",
    "--mx-host=down.test,dead.down.test,10",
    "--mx-host=down.test,alive.down.test,20",
    "--host-record=dead.down.test,127.0.0.7",
    "--host-record=alive.down.test,127.0.0.3",
    "--host-record=implicit.test,127.0.0.4",
    "--dns-rr=null.test,15,000000",
    "--host-record=null.test,127.0.0.2",
    "--mx-host=remote.test,mx.remote.test,10",
    "--host-record=mx.remote.test,127.0.0.2",
    "--mx-host=tls.test,mx.tls.test,10",
    "--host-record=mx.tls.test,127.0.0.6",
]


@pytest.fixture(scope="session")
def dns_server() -> Iterator[Dnsmasq]:
    if not environment_has("dnsmasq"):
        pytest.skip("dnsmasq is not installed (apt-get install dnsmasq-base)")
    server = Dnsmasq(RECORDS)
    yield server
    server.stop()


@pytest.fixture
def mx_port() -> int:
    return free_port("127.0.0.2")


@pytest.fixture
def sinks() -> Iterator[dict[str, Sink]]:
    started: dict[str, Sink] = {}
    yield started
    for sink in started.values():
        sink.stop()


@pytest.fixture
def peers() -> Iterator[list[ScriptedPeer]]:
    """Scripted peers a test starts (`remote.start_peer`), stopped after it."""
    started: list[ScriptedPeer] = []
    yield started
    for peer in started:
        peer.stop()


@pytest.fixture
def relay(gsmtp_factory: Factory, dns_server: Dnsmasq, mx_port: int) -> Callable[..., GsmtpProcess]:
    """gsmtp relaying for 127.0.0.1, resolving through dnsmasq, MX hosts on mx_port."""

    def make(**delivery: Any) -> GsmtpProcess:
        settings = {
            "server": {"trusted_networks": ["127.0.0.1/32"]},
            "delivery": {
                "nameservers": [f"127.0.0.1:{dns_server.port}"],
                "port": mx_port,
                "retry": ["1s"],
                "connect_timeout": "2s",
                **delivery,
            },
        }
        return gsmtp_factory(settings)

    return make
