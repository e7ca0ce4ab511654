"""The smarthost: where all remote mail goes when `delivery.smarthost` is set, the TLS
it demands, and the credentials gsmtp logs in with (`delivery.smarthost_auth_file`).

Reads one file (the credentials, at start-up); no network I/O: the AUTH exchange runs
in `smtp.SmtpDeliverer`. Credentials never travel in plaintext: with an auth file the
default TLS level is `verify` (the certificate must be valid for the smarthost's name,
so the password cannot be phished by whoever sits on the path), and the deliverer
refuses to send AUTH on a session without TLS whatever the level. The file must be
readable by its owner only (0600, like Postfix's sasl_passwd advice): a file others
can read is refused at start-up rather than trusted. A password never appears in a
repr, a log line or an error.

Policy lookups are by next hop, as in Postfix with a relayhost: the per-domain table and
MTA-STS govern deliveries to MX hosts; the hop to the smarthost has one level of its own
(`smarthost_tls`; else `verify` with credentials; else `delivery.tls`).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from gsmtp.delivery.tls_levels import TlsLevel, TlsRequirement

SMARTHOST_TLS_CHOICES = ("", "may", "encrypt", "verify", "implicit")


class AuthFileError(Exception):
    """The credentials file cannot be used; the message names the file and says why."""


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Smarthost:
    """`implicit`: TLS from the first byte (RFC 8314, port 465), with the certificate
    verified; else STARTTLS per `level`."""

    host: str
    port: int
    level: TlsLevel = TlsLevel.MAY
    implicit: bool = False
    credentials: Credentials | None = None

    @property
    def name(self) -> str:
        """ "[host]:port", how logs, deferral reasons and the session cache name it."""
        return f"[{self.host}]:{self.port}"

    @property
    def requirement(self) -> TlsRequirement:
        return TlsRequirement(self.level, "smarthost")


def smarthost_level(setting: str, *, with_credentials: bool, default: TlsLevel) -> Smarthost:
    """The level and mode of `delivery.smarthost_tls` ("" = `verify` with credentials,
    else `default`, the `delivery.tls` level), on a Smarthost without host yet."""
    if setting not in SMARTHOST_TLS_CHOICES:
        raise ValueError(f"unknown smarthost_tls {setting!r}")
    if setting == "implicit":
        return Smarthost("", 0, TlsLevel.VERIFY, implicit=True)
    if setting:
        return Smarthost("", 0, TlsLevel.parse(setting))
    return Smarthost("", 0, TlsLevel.VERIFY if with_credentials else default)


def read_auth_file(path: str) -> Credentials:
    """`user:password` from the first line of `path` (the password may hold ':').
    Refuses a file that its group or others may read or write."""
    try:
        with open(path, encoding="utf-8") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            text = handle.read()
    except OSError as error:
        raise AuthFileError(f"{path}: cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise AuthFileError(f"{path}: not UTF-8 text") from None
    if mode & 0o077:
        raise AuthFileError(
            f"{path}: mode {stat.S_IMODE(mode):04o} lets others read the smarthost password; "
            "it must be readable by its owner only (chmod 600)"
        )
    line = text.splitlines()[0] if text else ""
    username, colon, password = line.partition(":")
    if not colon or not username or not password:
        raise AuthFileError(f'{path}: expected one line "user:password"')
    return Credentials(username, password)
