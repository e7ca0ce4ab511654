"""Local domains and mailboxes (the seed's `users` table), and the snapshot policy reads.

Addresses are stored normalised (`normalise_mailbox`: NFKC, case-folded local-part,
lower-case domain), and a local-part must be usable as one path component under the
Maildir root, so no address can name a path outside it. Passwords are kept as scrypt
PHC-style strings with OWASP's parameters (N=2^15, r=8, p=3: ~32 MiB and ~0.1-0.2 s of
one core per check; callers run checks off the event loop); a hash made with weaker
parameters is replaced at the next successful login (`needs_rehash`). A disabled user
keeps its mailbox but cannot log in; `may_send_as` lists the other senders (addresses or
"@domain") it may use after AUTH. Changes bump `meta.accounts_serial` (triggers), which
a running server checks to pick them up without a restart.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import apsw

from gsmtp.db import query, scalar, transaction
from gsmtp.protocol.address import (
    Address,
    AddressError,
    normalise_mailbox,
    parse_domain,
    parse_path,
)

# OWASP Password Storage Cheat Sheet, scrypt: N=2^15, r=8, p=3 is one of its equivalent
# settings (as strong as N=2^17, p=1, with a quarter of the memory).
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**15, 8, 3
# Stored parameters are trusted (only operators write them), but bounded all the same.
_MAX_LN = 20


class AccountError(Exception):
    """A refused account change, phrased for the operator."""


@dataclass(frozen=True, slots=True)
class Login:
    """What AUTH and the sender check need of one user."""

    password_hash: str | None
    disabled: bool = False
    # Normalised addresses and "@domain" entries this user may use as MAIL FROM.
    may_send_as: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class AccountsSnapshot:
    """What policy needs to decide a RCPT, a login or a sender, read at one time."""

    serial: int
    domains: frozenset[str]
    mailboxes: frozenset[str]
    logins: Mapping[str, Login] = field(default_factory=dict)

    def is_local_domain(self, domain: str) -> bool:
        return domain in self.domains

    def has_mailbox(self, address: Address) -> bool:
        return normalise_mailbox(address) in self.mailboxes

    def login(self, user: str) -> Login | None:
        """The user (a normalised address, as `login_name` gives it), or None."""
        return self.logins.get(user)

    def may_use_sender(self, user: str, sender: Address) -> bool:
        """An enabled `user` may send as itself, as any address it was given and as
        any address of a domain it was given (`--may-send-as`)."""
        login = self.logins.get(user)
        if login is None or login.disabled:
            return False
        mailbox = normalise_mailbox(sender)
        return (
            mailbox == user
            or mailbox in login.may_send_as
            or f"@{sender.domain}" in login.may_send_as
        )


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


def login_name(text: str) -> str | None:
    """The user an AUTH username names (normalised like every stored address), or None
    when it is not an address at all."""
    address = parse_path(text, allow_null=False, allow_utf8=True)
    if isinstance(address, AddressError):
        return None
    return normalise_mailbox(address)


def parse_sender_grant(text: str) -> str:
    """A `--may-send-as` value: an address, or "@domain" for every address there."""
    text = text.strip()
    if text.startswith("@"):
        return "@" + normalise_domain(text[1:])
    address = parse_path(text, allow_null=False, allow_utf8=True)
    if isinstance(address, AddressError) or address.domain.startswith("["):
        raise AccountError(f"not an address or @domain: {text!r}")
    return normalise_mailbox(address)


def read_serial(connection: apsw.Connection) -> int:
    return int(scalar(connection, "SELECT value FROM meta WHERE key = 'accounts_serial'"))


def load_snapshot(connection: apsw.Connection) -> AccountsSnapshot:
    serial = read_serial(connection)
    domains = frozenset(str(row[0]) for row in query(connection, "SELECT name FROM domains"))
    logins = {
        str(address): Login(
            str(hashed) if hashed else None, bool(disabled), frozenset(json.loads(grants))
        )
        for address, hashed, disabled, grants in query(
            connection, "SELECT address, password_hash, disabled, may_send_as FROM users"
        )
    }
    return AccountsSnapshot(serial, domains, frozenset(logins), logins)


def replace_password_hash(connection: apsw.Connection, user: str, old: str, new: str) -> bool:
    """Store a rehashed password, unless the hash changed meanwhile (a `passwd` wins)."""
    connection.execute(
        "UPDATE users SET password_hash = ? WHERE address = ? AND password_hash = ?",
        (new, user, old),
    )
    return connection.changes() > 0


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

    def add_user(
        self, text: str, password: str | None = None, may_send_as: Iterable[str] = ()
    ) -> str:
        address = parse_mailbox(text)
        key = f"{address.local}@{address.domain}"
        hashed = hash_password(password) if password is not None else None
        grants = _grants_json(may_send_as)
        with transaction(self._db):
            if not self._domain_exists(address.domain):
                raise AccountError(
                    f"domain {address.domain} is not local; add it first with "
                    f"'gsmtp domain add {address.domain}'"
                )
            if self._user_exists(key):
                raise AccountError(f"user {key} already exists")
            self._db.execute(
                "INSERT INTO users(address, domain, local_part, password_hash, created_at,"
                " may_send_as) VALUES (?, ?, ?, ?, ?, ?)",
                (key, address.domain, address.local, hashed, time.time(), grants),
            )
        return key

    def set_may_send_as(self, text: str, may_send_as: Iterable[str]) -> str:
        """Replace the senders the user may use besides its own address."""
        grants = _grants_json(may_send_as)
        return self._update(text, "may_send_as = ?", (grants,))

    def set_disabled(self, text: str, disabled: bool) -> str:
        """A disabled user cannot log in (AUTH fails, open sessions lose relay and
        sender rights); mail to it is still delivered."""
        return self._update(text, "disabled = ?", (int(disabled),))

    def user_details(self, text: str) -> tuple[bool, list[str]]:
        """(disabled, may_send_as) of one user."""
        key = self._key(text)
        rows = query(self._db, "SELECT disabled, may_send_as FROM users WHERE address = ?", (key,))
        if not rows:
            raise AccountError(f"no such user: {key}")
        return bool(rows[0][0]), sorted(json.loads(rows[0][1]))

    def _update(self, text: str, assignment: str, values: tuple[object, ...]) -> str:
        key = self._key(text)
        with transaction(self._db):
            if not self._user_exists(key):
                raise AccountError(f"no such user: {key}")
            self._db.execute(f"UPDATE users SET {assignment} WHERE address = ?", (*values, key))
        return key

    @staticmethod
    def _key(text: str) -> str:
        address = parse_mailbox(text)
        return f"{address.local}@{address.domain}"

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

    def list_user_details(self, domain: str | None = None) -> list[tuple[str, bool, list[str]]]:
        """(address, disabled, may_send_as) for each user, in `list_users` order."""
        where, params = ("WHERE domain = ?", (normalise_domain(domain),)) if domain else ("", ())
        rows = query(
            self._db,
            f"SELECT address, disabled, may_send_as FROM users {where} ORDER BY domain, address",
            params,
        )
        return [(str(row[0]), bool(row[1]), sorted(json.loads(row[2]))) for row in rows]

    def _domain_exists(self, domain: str) -> bool:
        return bool(query(self._db, "SELECT 1 FROM domains WHERE name = ?", (domain,)))

    def _user_exists(self, key: str) -> bool:
        return bool(query(self._db, "SELECT 1 FROM users WHERE address = ?", (key,)))


def _grants_json(may_send_as: Iterable[str]) -> str:
    return json.dumps(sorted({parse_sender_grant(text) for text in may_send_as}))


def hash_password(password: str) -> str:
    """scrypt in a PHC-style string: `$scrypt$ln=15,r=8,p=3$<salt>$<hash>`. CPU-heavy:
    the server calls it off the event loop."""
    if not password:
        raise AccountError("the password must not be empty")
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P)
    return _phc(_SCRYPT_N, _SCRYPT_R, _SCRYPT_P, salt, digest)


def dummy_hash() -> str:
    """A hash with today's parameters that no password matches: verified for unknown
    users, so that they cost as much time as known ones (no user enumeration, S-08)."""
    return _phc(_SCRYPT_N, _SCRYPT_R, _SCRYPT_P, secrets.token_bytes(16), secrets.token_bytes(32))


def verify_password(password: str, stored: str) -> bool:
    """Constant-time comparison of scrypt digests. CPU-heavy (hashlib releases the
    GIL while scrypt runs): the server calls it off the event loop."""
    parsed = _parse_phc(stored)
    if parsed is None:
        return False
    n, r, p, salt, digest = parsed
    computed = _scrypt(password, salt, n, r, p)
    return hmac.compare_digest(computed, digest)


def needs_rehash(stored: str) -> bool:
    """True when `stored` is weaker than today's parameters, in work or in memory."""
    parsed = _parse_phc(stored)
    if parsed is None:
        return True
    n, r, p, _, _ = parsed
    return n * r * p < _SCRYPT_N * _SCRYPT_R * _SCRYPT_P or n * r < _SCRYPT_N * _SCRYPT_R


def _phc(n: int, r: int, p: int, salt: bytes, digest: bytes) -> str:
    ln = n.bit_length() - 1
    return f"$scrypt$ln={ln},r={r},p={p}${_b64(salt)}${_b64(digest)}"


def _parse_phc(stored: str) -> tuple[int, int, int, bytes, bytes] | None:
    try:
        _, scheme, params, salt, digest = stored.split("$")
        values = dict(item.split("=") for item in params.split(","))
        ln, r, p = int(values["ln"]), int(values["r"]), int(values["p"])
        raw_salt, raw_digest = _unb64(salt), _unb64(digest)
    except (ValueError, KeyError):
        return None
    if scheme != "scrypt" or not (1 <= ln <= _MAX_LN) or r < 1 or p < 1 or r * p >= 2**20:
        return None
    return 2**ln, r, p, raw_salt, raw_digest


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    # OpenSSL needs room for V (128·r·N bytes) and B (128·r·p); its default limit of
    # 32 MiB is a few KiB short for N=2^15, r=8.
    maxmem = 128 * r * (n + p + 2) + 1024 * 1024
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=32
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))
