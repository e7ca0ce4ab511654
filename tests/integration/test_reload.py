"""SIGHUP applies what needs no restart (limits, trusted networks, the TLS pair, the log
level), all or nothing; what needs a restart is named in a warning; the outcome is in
gsmtp_config_last_reload_successful and ..._success_timestamp_seconds."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

from tests.integration.conftest import Factory
from tests.integration.harness import GsmtpProcess, SmtpWire, free_port, wait_for
from tests.integration.test_tls_policy import (
    fingerprint_of,
    make_pair,
    served_fingerprint,
)

SUCCESSFUL = "gsmtp_config_last_reload_successful"
SUCCESS_TIME = "gsmtp_config_last_reload_success_timestamp_seconds"
TRUSTED = 'trusted_networks = ["127.0.0.2/32"]'


def advertised_size(port: int) -> int:
    with SmtpWire(port) as wire:
        wire.read_reply()
        wire.send(b"EHLO c.example\r\n")
        for line in wire.read_reply():
            if line[4:].startswith("SIZE "):
                return int(line[9:])
    raise AssertionError("no SIZE in the EHLO reply")


def relay_reply(port: int) -> str:
    """RCPT to a remote domain from 127.0.0.2 (trusted in the harness's default)."""
    with SmtpWire(port, source="127.0.0.2") as wire:
        wire.read_reply()
        wire.send(b"EHLO c.example\r\n")
        wire.read_reply()
        wire.send(b"MAIL FROM:<a@c.example>\r\n")
        assert wire.read_reply()[0].startswith("250")
        wire.send(b"RCPT TO:<x@elsewhere.example>\r\n")
        return wire.read_reply()[0]


def send_body(port: int, size: int) -> str:
    """A message of `size` bytes (SIZE not announced): the reply at the end of DATA."""
    with SmtpWire(port) as wire:
        wire.read_reply()
        wire.send(b"EHLO c.example\r\n")
        wire.read_reply()
        wire.send(b"MAIL FROM:<a@c.example>\r\n")
        assert wire.read_reply()[0].startswith("250")
        wire.send(b"RCPT TO:<jones@foo.com>\r\n")
        assert wire.read_reply()[0].startswith("250")
        wire.send(b"DATA\r\n")
        assert wire.read_reply()[0].startswith("354")
        line = b"x" * 998 + b"\r\n"
        wire.send(b"Subject: big\r\n\r\n" + line * (size // len(line)) + b".\r\n")
        return wire.read_reply()[0]


def reload(gsmtp: GsmtpProcess, event: str) -> dict[str, object]:
    """SIGHUP, and wait for the `event` line it causes (one more than before)."""
    before = len(gsmtp.events(event))
    gsmtp.signal(signal.SIGHUP)
    found = wait_for(lambda: gsmtp.events(event)[before:], what=event)
    return found[0]  # type: ignore[no-any-return]


def test_reload_applies_a_smaller_size_and_revokes_a_removed_trusted_network(
    gsmtp_factory: Factory,
) -> None:
    gsmtp = gsmtp_factory({"server": {"max_message_size": "100KB"}})
    assert advertised_size(gsmtp.port) == 100 * 1024
    assert relay_reply(gsmtp.port).startswith("250")
    assert send_body(gsmtp.port, 20 * 1024).startswith("250")
    started = gsmtp.metrics()
    assert started[SUCCESSFUL] == 1.0

    text = gsmtp.config.read_text()
    assert TRUSTED in text
    text = text.replace(TRUSTED, "trusted_networks = []")
    gsmtp.config.write_text(text.replace('max_message_size = "100KB"', 'max_message_size = "10KB"'))
    reloaded = reload(gsmtp, "config_reloaded")

    assert {"server.max_message_size", "server.trusted_networks"} <= set(reloaded["applied"])  # type: ignore[call-overload]
    assert advertised_size(gsmtp.port) == 10 * 1024
    assert send_body(gsmtp.port, 20 * 1024).startswith("552")
    assert "5.7.1" in relay_reply(gsmtp.port)
    after = gsmtp.metrics()
    assert after[SUCCESSFUL] == 1.0
    assert after[SUCCESS_TIME] > started[SUCCESS_TIME]
    assert gsmtp.events("config_restart_needed") == []


def test_reload_serves_a_new_certificate(gsmtp_factory: Factory, tmp_path: Path) -> None:
    """New paths in the file: the next handshake presents the new certificate."""
    first_cert, first_key = make_pair(tmp_path, "first")
    second_cert, second_key = make_pair(tmp_path, "second")
    gsmtp = gsmtp_factory({"tls": {"cert": str(first_cert), "key": str(first_key)}})
    assert served_fingerprint(gsmtp.port) == fingerprint_of(first_cert)
    text = gsmtp.config.read_text().replace(str(first_cert), str(second_cert))
    gsmtp.config.write_text(text.replace(str(first_key), str(second_key)))
    reload(gsmtp, "config_reloaded")
    assert served_fingerprint(gsmtp.port) == fingerprint_of(second_cert)
    assert gsmtp.metrics()[SUCCESSFUL] == 1.0


def test_a_broken_file_keeps_every_old_setting(gsmtp_factory: Factory) -> None:
    """A smaller SIZE next to a key that does not parse: nothing is applied."""
    gsmtp = gsmtp_factory({"server": {"max_message_size": "100KB"}})
    started = gsmtp.metrics()[SUCCESS_TIME]
    good = gsmtp.config.read_text()
    broken = good.replace('max_message_size = "100KB"', 'max_message_size = "10KB"')
    gsmtp.config.write_text(broken.replace('timeout = "30s"', 'timeout = "forever"'))
    failed = reload(gsmtp, "reload_failed")
    assert failed["level"] == "error"
    assert "[server] timeout" in str(failed["error"])
    assert advertised_size(gsmtp.port) == 100 * 1024
    metrics = gsmtp.metrics()
    assert metrics[SUCCESSFUL] == 0.0
    assert metrics[SUCCESS_TIME] == started
    assert metrics['gsmtp_reloads_total{outcome="failed"}'] == 1.0

    gsmtp.config.write_text(good)
    reload(gsmtp, "config_reloaded")
    assert gsmtp.metrics()[SUCCESSFUL] == 1.0


def test_a_broken_certificate_pair_keeps_every_old_setting(
    gsmtp_factory: Factory, tmp_path: Path
) -> None:
    """The certificate renewed and the key not (a mismatch), together with a smaller
    SIZE and a removed network: none of it applies, the old pair is still served."""
    cert, key = make_pair(tmp_path, "live")
    gsmtp = gsmtp_factory(
        {"server": {"max_message_size": "100KB"}, "tls": {"cert": str(cert), "key": str(key)}}
    )
    old = fingerprint_of(cert)
    other_cert, _ = make_pair(tmp_path, "other")
    shutil.copy(other_cert, cert)
    text = gsmtp.config.read_text().replace(TRUSTED, "trusted_networks = []")
    gsmtp.config.write_text(text.replace('max_message_size = "100KB"', 'max_message_size = "10KB"'))
    failed = reload(gsmtp, "reload_failed")
    assert failed["level"] == "error"
    assert str(failed["error"]).startswith("[tls] cannot load certificate")
    assert served_fingerprint(gsmtp.port) == old
    assert advertised_size(gsmtp.port) == 100 * 1024
    assert relay_reply(gsmtp.port).startswith("250")
    assert gsmtp.metrics()[SUCCESSFUL] == 0.0
    assert gsmtp.events("config_reloaded") == []


def test_restart_only_settings_are_named_in_a_warning_and_the_rest_applies(
    gsmtp_factory: Factory,
) -> None:
    gsmtp = gsmtp_factory({"server": {"max_message_size": "100KB"}})
    text = gsmtp.config.read_text()
    new_port = free_port()
    text = text.replace(f"127.0.0.1:{gsmtp.port}", f"127.0.0.1:{new_port}")
    text = text.replace('path = "spool.sqlite"', 'path = "elsewhere.sqlite"')
    text = text.replace('max_message_size = "100KB"', 'max_message_size = "10KB"')
    gsmtp.config.write_text(text + '[log]\nlevel = "warning"\n')
    warning = reload(gsmtp, "config_restart_needed")
    assert warning["level"] == "warning"
    assert warning["settings"] == ["server.listen", "spool.path"]
    assert advertised_size(gsmtp.port) == 10 * 1024  # still on the old port; SIZE applied
    assert gsmtp.metrics()[SUCCESSFUL] == 1.0

    # The log level applied too, before the reload's own info line (logged right after
    # the warning): it was not written.
    assert gsmtp.events("config_reloaded") == []
