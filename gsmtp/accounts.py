"""Local domains and mailboxes (the seed's `users` table), and the snapshot policy reads.

Addresses are stored normalised (`normalise_mailbox`: NFKC, case-folded local-part,
lower-case domain), and a local-part must be usable as one path component under the
Maildir root, so no address can name a path outside it. Passwords are kept as scrypt
PHC-style strings. Changes bump `meta.accounts_serial` (triggers), which a running
server checks to pick them up without a restart.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import apsw

from gsmtp.db import query, scalar, transaction
from gsmtp.protocol.address import (
    Address,
    AddressError,
    normalise_mailbox,
    parse_domain,
    parse_path,
)

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**15, 8, 1


class AccountError(Exception):
    """A refused account change, phrased for the operator."""


@dataclass(frozen=True, slots=True)
class AccountsSnapshot:
    """What policy needs to decide a RCPT, read at one point in time."""

    serial: int
    domains: frozenset[str]
    mailboxes: frozenset[str]

    def is_local_domain(self, domain: str) -> bool:
        return domain in self.domains

    def has_mailbox(self, address: Address) -> bool:
        return normalise_mailbox(address) in self.mailboxes


def normalise_domain(name: str) -> str:
    domain = parse_domain(name.strip())
    if isinstance(domain, AddressError) or domain.startswith("["):
        raise AccountError(f"not a valid domain name: {name!r}")
    return domain


def parse_mailbox(text: str) -> Address:
    """A mailbox address as typed by an operator, validated for use as a Maildir name."""
    address = parse_path(text, allow_null=False, allow_utf8=True)
    if isinstance(address, AddressError):
        raise AccountError(f"not a valid address: {text!r} ({address.reason})")
    local = normalise_mailbox(address).rpartition("@")[0]
    if local in (".", "..") or local.startswith(".") or any(c in local for c in "/\\\x00"):
        raise AccountError(f"local-part {address.local!r} cannot name a mailbox directory")
    return Address(local, address.domain)


def read_serial(connection: apsw.Connection) -> int:
    return int(scalar(connection, "SELECT value FROM meta WHERE key = 'accounts_serial'"))


def load_snapshot(connection: apsw.Connection) -> AccountsSnapshot:
    serial = read_serial(connection)
    domains = frozenset(str(row[0]) for row in query(connection, "SELECT name FROM domains"))
    mailboxes = frozenset(str(row[0]) for row in query(connection, "SELECT address FROM users"))
    return AccountsSnapshot(serial, domains, mailboxes)


class Accounts:
    """Account administration over a connection (used by the CLI)."""

    def __init__(self, connection: apsw.Connection) -> None:
        self._db = connection

    def add_domain(self, name: str) -> str:
        domain = normalise_domain(name)
        with transaction(self._db):
            if self._domain_exists(domain):
                raise AccountError(f"domain {domain} already exists")
            self._db.execute("INSERT INTO domains(name) VALUES (?)", (domain,))
        return domain

    def remove_domain(self, name: str) -> str:
        domain = normalise_domain(name)
        with transaction(self._db):
            if not self._domain_exists(domain):
                raise AccountError(f"no such domain: {domain}")
            self._db.execute("DELETE FROM domains WHERE name = ?", (domain,))
        return domain

    def list_domains(self) -> list[str]:
        return [str(row[0]) for row in query(self._db, "SELECT name FROM domains ORDER BY name")]

    def add_user(self, text: str, password: str | None = None) -> str:
        address = parse_mailbox(text)
        key = f"{address.local}@{address.domain}"
        hashed = hash_password(password) if password is not None else None
        with transaction(self._db):
            if not self._domain_exists(address.domain):
                raise AccountError(
                    f"domain {address.domain} is not local; add it first with "
                    f"'gsmtp domain add {address.domain}'"
                )
            if self._user_exists(key):
                raise AccountError(f"user {key} already exists")
            self._db.execute(
                "INSERT INTO users(address, domain, local_part, password_hash, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (key, address.domain, address.local, hashed, time.time()),
            )
        return key

    def remove_user(self, text: str) -> str:
        address = parse_mailbox(text)
        key = f"{address.local}@{address.domain}"
        with transaction(self._db):
            if not self._user_exists(key):
                raise AccountError(f"no such user: {key}")
            self._db.execute("DELETE FROM users WHERE address = ?", (key,))
        return key

    def set_password(self, text: str, password: str) -> str:
        address = parse_mailbox(text)
        key = f"{address.local}@{address.domain}"
        with transaction(self._db):
            if not self._user_exists(key):
                raise AccountError(f"no such user: {key}")
            self._db.execute(
                "UPDATE users SET password_hash = ? WHERE address = ?",
                (hash_password(password), key),
            )
        return key

    def list_users(self, domain: str | None = None) -> list[str]:
        if domain:
            rows = query(
                self._db,
                "SELECT address FROM users WHERE domain = ? ORDER BY address",
                (normalise_domain(domain),),
            )
        else:
            rows = query(self._db, "SELECT address FROM users ORDER BY domain, address")
        return [str(row[0]) for row in rows]

    def _domain_exists(self, domain: str) -> bool:
        return bool(query(self._db, "SELECT 1 FROM domains WHERE name = ?", (domain,)))

    def _user_exists(self, key: str) -> bool:
        return bool(query(self._db, "SELECT 1 FROM users WHERE address = ?", (key,)))


def hash_password(password: str) -> str:
    """scrypt in a PHC-style string: `$scrypt$ln=15,r=8,p=1$<salt>$<hash>`."""
    if not password:
        raise AccountError("the password must not be empty")
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P)
    ln = _SCRYPT_N.bit_length() - 1
    return f"$scrypt$ln={ln},r={_SCRYPT_R},p={_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        _, scheme, params, salt, digest = stored.split("$")
        values = dict(item.split("=") for item in params.split(","))
        n, r, p = 2 ** int(values["ln"]), int(values["r"]), int(values["p"])
    except (ValueError, KeyError):
        return False
    if scheme != "scrypt":
        return False
    computed = _scrypt(password, _unb64(salt), n, r, p)
    return hmac.compare_digest(computed, _unb64(digest))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=256 * 1024 * 1024, dklen=32
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))
