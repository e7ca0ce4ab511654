"""Every configuration key is either applied by a reload or named as needing a restart."""

from __future__ import annotations

import dataclasses
import ipaddress

from gsmtp.config import Config, HostPort, ServerConfig, TlsConfig
from gsmtp.reload import LIVE, RESTART, all_keys, changed, in_effect, restart_needed


def test_every_key_is_classified_once() -> None:
    keys = set(all_keys(Config()))
    assert LIVE.isdisjoint(RESTART)
    assert keys - (LIVE | RESTART) == set(), "classify the new key in gsmtp/reload.py"
    assert (LIVE | RESTART) - keys == set(), "a classified key no longer exists"


def test_restart_keys_are_reported_and_keep_their_old_value() -> None:
    old = Config()
    new = Config(
        server=ServerConfig(
            listen=(HostPort("127.0.0.1", 2600),),
            max_message_size=1024,
            trusted_networks=(ipaddress.ip_network("10.0.0.0/8"),),
        )
    )
    assert changed(old, new) == [
        "server.listen",
        "server.max_message_size",
        "server.trusted_networks",
    ]
    restart = restart_needed(old, new)
    assert restart == ["server.listen"]
    effective = in_effect(old, new, restart)
    assert effective.server.listen == old.server.listen
    assert effective.server.max_message_size == 1024
    assert effective.server.trusted_networks == new.server.trusted_networks
    assert restart_needed(effective, new) == ["server.listen"]  # still said next time


def test_turning_tls_on_or_off_needs_a_restart_and_new_paths_do_not() -> None:
    plain = Config()
    with_tls = dataclasses.replace(plain, tls=TlsConfig(cert="/a.pem", key="/a.key"))
    renewed = dataclasses.replace(plain, tls=TlsConfig(cert="/b.pem", key="/b.key"))
    assert restart_needed(plain, with_tls) == ["tls.cert", "tls.key"]
    assert restart_needed(with_tls, plain) == ["tls.cert", "tls.key"]
    assert restart_needed(with_tls, renewed) == []
    assert in_effect(with_tls, plain, ["tls.cert", "tls.key"]).tls == with_tls.tls
