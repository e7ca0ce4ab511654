"""Which settings a SIGHUP reload applies and which need a restart; no I/O.

Every key of the configuration is in exactly one of LIVE (applied to the running server:
new sessions, the next delivery, the next handshake) or RESTART (needs new sockets, a new
spool, new threads or pools: named in a `warning` and left as it is). A test checks that
the two sets cover every key, so a key added later must be classified. A key in neither
is treated as needing a restart: never silently half-applied.

The composition root (app.py) does the applying; this module only compares.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gsmtp.config import Config

LIVE = frozenset(
    {
        "server.timeout",
        "server.command_deadline",
        "server.min_data_rate",
        "server.min_data_rate_grace",
        "server.max_connections_per_ip",
        "server.max_connection_rate",
        "server.max_message_size",
        "server.max_data_memory",
        "server.max_recipients",
        "server.soft_error_limit",
        "server.error_sleep",
        "server.junk_command_limit",
        "server.vrfy",
        "server.trusted_networks",
        "server.proxy_networks",
        "server.shutdown_grace",
        "server.greet_wait",
        "tls.cert",
        "tls.key",
        "tls.min_version",
        "spool.min_free",
        "delivery.retry",
        "delivery.max_age",
        "delivery.port",
        "delivery.smarthost",
        "delivery.smarthost_tls",  # read again with the auth file: a bad one fails the reload
        "delivery.smarthost_auth_file",
        "delivery.nameservers",
        "delivery.connect_timeout",
        "delivery.command_timeout",
        "delivery.data_timeout",
        "delivery.attempt_timeout",
        "delivery.delay_warning",
        "log.level",
        "dkim.keys",  # the signer, built again whole
    }
)
RESTART = frozenset(
    {
        "server.hostname",  # greeting, Received:, HELO, bounces: many objects hold it
        "server.listen",
        "server.max_connections",  # the size of the connection pool
        "server.ipv4_prefix",  # the keys of the per-network counters
        "server.ipv6_prefix",
        "server.proxy_protocol",
        "server.auth_failure_limit",
        "submission.listen",
        "submission.tls_listen",
        "submission.allow_plaintext_auth",
        "spool.path",
        "maildir.root",
        "maildir.group",  # the Maildir deliverer's file permissions, set at start
        "maildir.mode",
        "server.workers",  # the worker processes and their shards
        "server.cpu_affinity",  # set when a worker process starts
        "delivery.concurrency",  # the sender pool
        "delivery.max_per_domain",
        "delivery.active_limit",
        "delivery.connection_reuse",
        "delivery.connection_idle",
        "delivery.tls",  # the outbound TLS policy and contexts, built at start
        "delivery.tls_policy",
        "delivery.ca_file",
        "delivery.mta_sts",  # a source of the TLS policy, built at start
        "delivery.mta_sts_port",
        "metrics.listen",
        "log.format",
    }
)


def all_keys(config: Config) -> dict[str, Any]:
    """Every setting as {"section.key": value}."""
    keys: dict[str, Any] = {}
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if dataclasses.is_dataclass(value):
            for key in dataclasses.fields(value):
                keys[f"{section.name}.{key.name}"] = getattr(value, key.name)
    return keys


def changed(old: Config, new: Config) -> list[str]:
    """The keys whose value differs, in the file's order."""
    before, after = all_keys(old), all_keys(new)
    return [key for key, value in after.items() if before.get(key) != value]


def restart_needed(old: Config, new: Config) -> list[str]:
    """The changed keys a reload cannot apply. Turning TLS on or off (a certificate
    where there was none, or none any more) needs a restart: listeners offer STARTTLS
    or not from their start."""
    keys = [key for key in changed(old, new) if key not in LIVE]
    if old.tls.enabled != new.tls.enabled:
        keys += [key for key in ("tls.cert", "tls.key") if key not in keys]
    return keys


def in_effect(old: Config, new: Config, restart: list[str]) -> Config:
    """The configuration the server runs with after applying `new`: its values, except
    the `restart` keys, which keep `old`'s until the process restarts."""
    sections: dict[str, Any] = {}
    for section in dataclasses.fields(new):
        fresh = getattr(new, section.name)
        if not dataclasses.is_dataclass(fresh):
            continue
        kept = {
            key.name: getattr(getattr(old, section.name), key.name)
            for key in dataclasses.fields(fresh)
            if f"{section.name}.{key.name}" in restart
        }
        sections[section.name] = dataclasses.replace(fresh, **kept)  # type: ignore[type-var]
    return dataclasses.replace(new, **sections)
