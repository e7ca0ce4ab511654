"""What each component is given from the configuration: the values built from `Config`
for the SMTP server, the queue, the outbound deliverer, at start and again at each
reload (gsmtp.app is their only caller, the composition root). A value that needs a
file (the smarthost's credentials) may fail: StartupError names the file and why.
"""

from __future__ import annotations

import dataclasses

from gsmtp import shards
from gsmtp.config import Config, parse_host_port, split_limits
from gsmtp.delivery.mx import DnsResolver
from gsmtp.delivery.smarthost import AuthFileError, Smarthost, read_auth_file, smarthost_level
from gsmtp.delivery.smtp import Timeouts
from gsmtp.delivery.tls_levels import TlsLevel
from gsmtp.protocol.session import Limits
from gsmtp.queue import NoticeSettings
from gsmtp.server import Deadlines
from gsmtp.worker_link import Role


class StartupError(Exception):
    """The server cannot start; the message says why, for the operator."""


def worker_config(config: Config, role: Role) -> Config:
    """What one worker runs with: its spool shard as `spool.path`, and every node-wide
    limit divided among the workers (`split_limits`)."""
    shard = shards.shard_path(config.spool.path, role.index)
    config = split_limits(config, role.count)
    return dataclasses.replace(config, spool=dataclasses.replace(config.spool, path=shard))


def limits(config: Config) -> Limits:
    server = config.server
    return Limits(
        max_message_size=server.max_message_size,
        max_recipients=server.max_recipients,
        soft_error_limit=server.soft_error_limit,
        junk_command_limit=server.junk_command_limit,
    )


def deadlines(config: Config) -> Deadlines:
    server = config.server
    return Deadlines(
        command=server.command_deadline,
        min_data_rate=server.min_data_rate,
        data_rate_grace=server.min_data_rate_grace,
    )


def notice_settings(config: Config) -> NoticeSettings:
    return NoticeSettings(
        postmaster=f"postmaster@{config.server.hostname}",
        delay_warning=config.delivery.delay_warning,
        max_age=config.delivery.max_age,
    )


def resolver(config: Config) -> DnsResolver:
    return DnsResolver([(n.host, n.port) for n in config.delivery.nameservers])


def smarthost(config: Config) -> Smarthost | None:
    """`delivery.smarthost` with its TLS level and credentials; an auth file that others
    may read, or that cannot be read, is a StartupError (at a reload: a failed reload)."""
    delivery = config.delivery
    if not delivery.smarthost:
        return None
    address = parse_host_port(delivery.smarthost)
    credentials = None
    if delivery.smarthost_auth_file:
        try:
            credentials = read_auth_file(delivery.smarthost_auth_file)
        except AuthFileError as error:
            raise StartupError(f"[delivery] smarthost_auth_file: {error}") from None
    mode = smarthost_level(
        delivery.smarthost_tls,
        with_credentials=credentials is not None,
        default=TlsLevel.parse(delivery.tls),
    )
    return Smarthost(address.host, address.port, mode.level, mode.implicit, credentials)


def timeouts(config: Config) -> Timeouts:
    delivery = config.delivery
    return Timeouts(
        delivery.connect_timeout,
        delivery.command_timeout,
        delivery.data_timeout,
        delivery.attempt_timeout,
    )
