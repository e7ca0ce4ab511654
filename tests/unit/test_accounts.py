"""Accounts for AUTH: password hashes, disabled users, may-send-as, the snapshot policy
reads; the Received protocol after AUTH; submission configuration."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from gsmtp import accounts, db
from gsmtp.acceptance import Acceptor
from gsmtp.accounts import AccountError, Accounts, AccountsSnapshot, Login
from gsmtp.config import ConfigError, load
from gsmtp.policy import Client, Policy
from gsmtp.protocol import replies
from gsmtp.protocol.address import Address, parse_path
from gsmtp.protocol.session import Envelope


@pytest.fixture
def admin(tmp_path: Path) -> Accounts:
    admin = Accounts(db.connect(str(tmp_path / "spool.sqlite")))
    admin.add_domain("foo.com")
    return admin


def test_passwords_are_hashed_with_owasp_parameters() -> None:
    """S-07: scrypt N=2^15, r=8, p=3 (an OWASP setting), salted, in a PHC string."""
    first, second = accounts.hash_password("pässword"), accounts.hash_password("pässword")
    assert first.startswith("$scrypt$ln=15,r=8,p=3$") and first != second
    assert accounts.verify_password("pässword", first)
    assert not accounts.verify_password("password", first)
    assert not accounts.needs_rehash(first)


@pytest.mark.parametrize(
    ("params", "weaker"),
    [
        ("ln=15,r=8,p=1", True),  # the parameters of earlier versions
        ("ln=14,r=8,p=3", True),
        ("ln=15,r=8,p=3", False),
        ("ln=17,r=8,p=1", False),  # OWASP's first setting: more memory and more work
        ("ln=16,r=8,p=2", False),
    ],
)
def test_needs_rehash(params: str, weaker: bool) -> None:
    assert accounts.needs_rehash(f"$scrypt${params}$c2FsdA$ZGlnZXN0") is weaker


@pytest.mark.parametrize("stored", ["", "plain", "$argon2id$v=19$x$y", "$scrypt$ln=40,r=8,p=1$a$b"])
def test_unusable_hashes_never_verify_and_are_replaced(stored: str) -> None:
    assert not accounts.verify_password("x", stored)
    assert accounts.needs_rehash(stored)


def test_disable_enable_and_may_send_as_reach_the_snapshot(admin: Accounts) -> None:
    connection = admin._db
    admin.add_user("Jones@foo.com", "pw", ["Sales@FOO.com", "@Jones.Example"])
    snapshot = accounts.load_snapshot(connection)
    login = snapshot.login("jones@foo.com")
    assert login is not None and not login.disabled
    assert login.may_send_as == {"sales@foo.com", "@jones.example"}
    assert accounts.verify_password("pw", login.password_hash or "")
    serial = snapshot.serial
    admin.set_disabled("jones@foo.com", True)
    after = accounts.load_snapshot(connection)
    assert after.serial > serial  # a running server notices (AccountsCache)
    assert after.login("jones@foo.com") == Login(login.password_hash, True, login.may_send_as)
    assert admin.list_user_details() == [
        ("jones@foo.com", True, ["@jones.example", "sales@foo.com"])
    ]
    admin.set_disabled("jones@foo.com", False)
    admin.set_may_send_as("jones@foo.com", [])
    final = accounts.load_snapshot(connection).login("jones@foo.com")
    assert final is not None and not final.disabled and final.may_send_as == frozenset()


@pytest.mark.parametrize("grant", ["not an address", "@", "@bad..domain", "x@[127.0.0.1]"])
def test_bad_grants_are_refused(admin: Accounts, grant: str) -> None:
    with pytest.raises(AccountError):
        admin.add_user("jones@foo.com", None, [grant])
    admin.add_user("brown@foo.com")
    with pytest.raises(AccountError):
        admin.set_may_send_as("brown@foo.com", [grant])


def test_unknown_users_cannot_be_changed(admin: Accounts) -> None:
    with pytest.raises(AccountError, match="no such user"):
        admin.set_disabled("ghost@foo.com", True)
    with pytest.raises(AccountError, match="no such user"):
        admin.set_may_send_as("ghost@foo.com", ["@foo.com"])


def test_a_rehash_never_overwrites_a_newer_password(admin: Accounts) -> None:
    admin.add_user("jones@foo.com", "old")
    connection = admin._db
    (stored,) = [
        login.password_hash for login in accounts.load_snapshot(connection).logins.values()
    ]
    assert stored is not None
    admin.set_password("jones@foo.com", "new")  # an operator's passwd meanwhile
    assert not accounts.replace_password_hash(connection, "jones@foo.com", stored, "$x")
    assert accounts.replace_password_hash(
        connection,
        "jones@foo.com",
        accounts.load_snapshot(connection).logins["jones@foo.com"].password_hash or "",
        "$scrypt$new",
    )


def _policy(snapshot: AccountsSnapshot) -> Policy:
    return Policy(
        hostname="mx.foo.com",
        trusted_networks=[],
        snapshot=lambda fresh=False: snapshot,
        vrfy=False,
    )


def _address(text: str) -> Address:
    address = parse_path(text, allow_null=True, allow_utf8=True)
    assert isinstance(address, Address)
    return address


def test_a_disabled_user_loses_relay_and_senders_at_once() -> None:
    """`gsmtp user disable`: an open authenticated session cannot relay any more."""
    enabled = AccountsSnapshot(
        1, frozenset({"foo.com"}), frozenset({"jones@foo.com"}), {"jones@foo.com": Login("h")}
    )
    disabled = AccountsSnapshot(
        2,
        frozenset({"foo.com"}),
        frozenset({"jones@foo.com"}),
        {"jones@foo.com": Login("h", disabled=True)},
    )
    client = Client(ipaddress.ip_address("198.51.100.7"), user="jones@foo.com")
    remote, own = _address("x@remote.example"), _address("jones@foo.com")
    assert _policy(enabled).check_recipient(remote, client) == replies.RECIPIENT_OK
    assert _policy(enabled).check_sender(own, client) == replies.SENDER_OK
    assert _policy(disabled).check_recipient(remote, client) == replies.RELAY_DENIED
    assert _policy(disabled).check_sender(own, client) == replies.SENDER_NOT_OWNED
    # Local mail still reaches the disabled user.
    anonymous = Client(ipaddress.ip_address("198.51.100.7"))
    assert _policy(disabled).check_recipient(own, anonymous) == replies.RECIPIENT_OK


def test_unauthenticated_senders_are_not_checked() -> None:
    snapshot = AccountsSnapshot(1, frozenset({"foo.com"}), frozenset())
    client = Client(ipaddress.ip_address("198.51.100.7"))
    assert _policy(snapshot).check_sender(_address("ceo@bank.example"), client) == (
        replies.SENDER_OK
    )


@pytest.mark.parametrize(
    ("tls", "authenticated", "protocol"),
    [
        (False, False, "ESMTP"),
        (True, False, "ESMTPS"),
        (True, True, "ESMTPSA"),
        (False, True, "ESMTPA"),
    ],
)
def test_received_names_the_protocol(tls: bool, authenticated: bool, protocol: str) -> None:
    """RFC 3848: ESMTPA / ESMTPSA after AUTH (the user is not named)."""
    envelope = Envelope(
        helo="c.example",
        sender=_address("jones@foo.com"),
        recipients=(_address("x@remote.example"),),
        content=b"Subject: x\r\n\r\nbody\r\n",
        smtputf8=False,
        esmtp=True,
    )
    message = Acceptor("mx.foo.com").accept(
        envelope, client_ip="198.51.100.7", tls=tls, authenticated=authenticated, now=1e9
    )
    assert f"(gsmtp) with {protocol} id ".encode() in message.body
    assert b"jones" not in message.body.split(b"\r\n\r\n")[0].split(b"Subject")[0]


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gsmtp.toml"
    path.write_text(text)
    return path


def test_a_plaintext_submission_listener_needs_to_be_allowed(tmp_path: Path) -> None:
    path = _config(tmp_path, '[submission]\nlisten = ["127.0.0.1:2587"]\n')
    with pytest.raises(ConfigError, match=r"\[submission\] listen: without \[tls\]"):
        load(path)
    path = _config(
        tmp_path, '[submission]\nlisten = ["127.0.0.1:2587"]\nallow_plaintext_auth = true\n'
    )
    assert load(path).submission.allow_plaintext_auth


def test_implicit_tls_needs_a_certificate(tmp_path: Path) -> None:
    path = _config(tmp_path, '[submission]\ntls_listen = ["127.0.0.1:2465"]\n')
    with pytest.raises(ConfigError, match=r"\[submission\] tls_listen: implicit TLS needs"):
        load(path)
    path.write_text(
        '[tls]\ncert = "c.pem"\nkey = "k.pem"\n'
        '[submission]\ntls_listen = ["127.0.0.1:2465"]\nlisten = ["127.0.0.1:2587"]\n'
    )
    loaded = load(path)
    assert [str(a) for a in loaded.submission.tls_listen] == ["127.0.0.1:2465"]


def test_auth_failure_limit_is_checked(tmp_path: Path) -> None:
    assert load(_config(tmp_path, "")).server.auth_failure_limit == 10
    with pytest.raises(ConfigError, match=r"\[server\] auth_failure_limit: must be at least 1"):
        load(_config(tmp_path, "[server]\nauth_failure_limit = 0\n"))
