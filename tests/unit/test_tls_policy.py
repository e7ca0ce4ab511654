"""The TLS policy's parts without a network: levels per domain (default, table, further
sources, strictest winning), RFC 8461 MX patterns, what a cached session may carry,
the smarthost's credentials file and level, the configuration keys, AUTH on the wire."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from gsmtp.config import ConfigError, parse
from gsmtp.delivery.connection_cache import SessionKey
from gsmtp.delivery.smarthost import AuthFileError, read_auth_file, smarthost_level
from gsmtp.delivery.tls_levels import TlsLevel, TlsRequirement
from gsmtp.delivery.tls_policy import TlsPolicy, mx_allowed, pattern_matches
from gsmtp.protocol import client
from gsmtp.protocol.client import ServerReply

STS = TlsRequirement(TlsLevel.VERIFY, "mta-sts", ("mx.example.org",))


class Fixed:
    """A requirement source with one answer for one domain."""

    def __init__(self, domain: str, requirement: TlsRequirement) -> None:
        self.domain = domain
        self.answer = requirement
        self.asked: list[str] = []

    def requirement(self, domain: str) -> TlsRequirement | None:
        self.asked.append(domain)
        return self.answer if domain == self.domain else None


def test_the_default_level_is_may() -> None:
    assert TlsPolicy().requirement("example.org") == TlsRequirement(TlsLevel.MAY, "default")


def test_the_table_replaces_the_default_for_its_domain_only() -> None:
    policy = TlsPolicy(
        TlsLevel.ENCRYPT, {"secure.example": TlsLevel.VERIFY, "Old.Example": TlsLevel.NONE}
    )
    assert policy.requirement("secure.example") == TlsRequirement(TlsLevel.VERIFY, "policy table")
    assert policy.requirement("OLD.example.").level is TlsLevel.NONE  # lowered: an override
    assert policy.requirement("sub.secure.example") == TlsRequirement(TlsLevel.ENCRYPT, "default")


def test_a_source_raises_the_level_and_brings_its_mx_patterns() -> None:
    sts = Fixed("example.org", STS)
    policy = TlsPolicy(TlsLevel.MAY, {"example.org": TlsLevel.NONE}, [sts])
    assert policy.requirement("Example.ORG") == STS  # strictest wins over the table
    assert policy.requirement("other.example") == TlsRequirement(TlsLevel.MAY, "default")
    assert sts.asked == ["example.org", "other.example"]


def test_a_weaker_source_never_lowers_the_level_but_adds_its_patterns() -> None:
    weak = Fixed("example.org", TlsRequirement(TlsLevel.MAY, "mta-sts", ("*.example.org",)))
    policy = TlsPolicy(TlsLevel.MAY, {"example.org": TlsLevel.ENCRYPT})
    policy.add_source(weak)
    assert policy.requirement("example.org") == TlsRequirement(
        TlsLevel.ENCRYPT, "policy table", ("*.example.org",)
    )


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("mx.example.org", "mx.example.org", True),
        ("mx.example.org", "MX.Example.org.", True),
        ("mx.example.org", "mx2.example.org", False),
        ("*.example.org", "mx.example.org", True),
        ("*.example.org", "example.org", False),  # RFC 8461 §4.1: one label, not zero
        ("*.example.org", "a.mx.example.org", False),  # nor two
        ("*.example.org", "mx.example.org.evil.test", False),
        ("*.example.org", ".example.org", False),
    ],
)
def test_mx_patterns_as_rfc_8461(pattern: str, host: str, matches: bool) -> None:
    assert pattern_matches(pattern, host) is matches


def test_without_patterns_every_host_is_allowed() -> None:
    assert mx_allowed("anything.example", None)
    assert not mx_allowed("mx.other.example", ("mx.example.org", "*.example.org"))
    assert mx_allowed("b.example.org", ("mx.example.org", "*.example.org"))


def key(level: TlsLevel, verified_name: str = "", tls: bool = True) -> SessionKey:
    return SessionKey("example.org", "mx.example.org", "192.0.2.1", 25, tls, level, verified_name)


def test_a_may_session_never_carries_mail_that_needs_more() -> None:
    may = key(TlsLevel.MAY)
    assert may.carries(TlsLevel.MAY) and may.carries(TlsLevel.NONE)
    assert not may.carries(TlsLevel.ENCRYPT) and not may.carries(TlsLevel.VERIFY)


def test_a_verified_session_carries_everything_for_its_host() -> None:
    verified = key(TlsLevel.VERIFY, "mx.example.org")
    assert all(verified.carries(level) for level in TlsLevel)
    assert not key(TlsLevel.VERIFY, "").carries(TlsLevel.VERIFY)
    assert not key(TlsLevel.VERIFY, "other.example").carries(TlsLevel.VERIFY)
    assert not key(TlsLevel.ENCRYPT).carries(TlsLevel.VERIFY)


# -- the smarthost --------------------------------------------------------------------------


def write(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "auth"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_the_auth_file_holds_user_colon_password(tmp_path: Path) -> None:
    credentials = read_auth_file(write(tmp_path, "user@example.org:pa:ss word\n"))
    assert (credentials.username, credentials.password) == ("user@example.org", "pa:ss word")
    assert "pa:ss" not in repr(credentials)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_an_auth_file_others_may_use_is_refused(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path, "user:secret\n", mode)
    with pytest.raises(AuthFileError, match=f"{path}: mode 0{mode:o} lets others read"):
        read_auth_file(path)


@pytest.mark.parametrize("text", ["", "user\n", ":secret\n", "user:\n"])
def test_a_malformed_auth_file_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(AuthFileError, match='expected one line "user:password"'):
        read_auth_file(write(tmp_path, text))


def test_a_missing_auth_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(AuthFileError, match="missing: cannot read"):
        read_auth_file(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("setting", "credentials", "level", "implicit"),
    [
        ("", True, TlsLevel.VERIFY, False),  # credentials: never to an unverified host
        ("", False, TlsLevel.ENCRYPT, False),  # else delivery.tls (here: encrypt)
        ("may", True, TlsLevel.MAY, False),
        ("encrypt", False, TlsLevel.ENCRYPT, False),
        ("implicit", False, TlsLevel.VERIFY, True),
    ],
)
def test_the_smarthost_level(
    setting: str, credentials: bool, level: TlsLevel, implicit: bool
) -> None:
    mode = smarthost_level(setting, with_credentials=credentials, default=TlsLevel.ENCRYPT)
    assert (mode.level, mode.implicit) == (level, implicit)


# -- configuration --------------------------------------------------------------------------


def test_the_delivery_tls_keys(tmp_path: Path) -> None:
    config = parse(
        {
            "delivery": {
                "tls": "verify",
                "ca_file": "ca.pem",
                "smarthost": "relay.example:587",
                "smarthost_auth_file": "auth",
                "smarthost_tls": "implicit",
                "tls_policy": {"B.example.": "none", "a.example": "encrypt"},
            }
        },
        tmp_path / "gsmtp.toml",
    )
    delivery = config.delivery
    assert delivery.tls == "verify"
    assert delivery.ca_file == str(tmp_path / "ca.pem")  # relative to the file
    assert delivery.smarthost_auth_file == str(tmp_path / "auth")
    assert delivery.smarthost_tls == "implicit"
    assert delivery.tls_policy == (("a.example", "encrypt"), ("b.example", "none"))


@pytest.mark.parametrize(
    ("delivery", "message"),
    [
        ({"tls": "secure"}, r"\[delivery\] tls: must be one of none, may, encrypt, verify"),
        ({"tls_policy": {"a.example": "strict"}}, r"\[delivery\] tls_policy: a.example: must be"),
        ({"tls_policy": {"not a domain": "may"}}, r"\[delivery\] tls_policy: not a domain"),
        ({"smarthost_tls": "none"}, r"\[delivery\] smarthost_tls: must be one of"),
        ({"smarthost_auth_file": "auth"}, "smarthost_auth_file and smarthost_tls need a smarthost"),
        (
            {
                "smarthost": "relay.example:587",
                "smarthost_auth_file": "auth",
                "smarthost_tls": "may",
            },
            r"smarthost_tls = 'may' with smarthost_auth_file: the password would go to a "
            "smarthost whose certificate is not verified",
        ),
        (
            {
                "smarthost": "relay.example:587",
                "smarthost_auth_file": "a",
                "smarthost_tls": "encrypt",
            },
            r"smarthost_tls = 'encrypt' with smarthost_auth_file",
        ),
    ],
)
def test_bad_tls_settings_name_the_key(
    tmp_path: Path, delivery: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse({"delivery": delivery}, tmp_path / "gsmtp.toml")


# -- AUTH on the wire ---------------------------------------------------------------------


def test_auth_plain_carries_the_credentials_in_one_line() -> None:
    line = client.auth_plain("user", "pa ss")
    assert line.startswith(b"AUTH PLAIN ") and line.endswith(b"\r\n")
    assert base64.b64decode(line.split()[2]) == b"\x00user\x00pa ss"
    assert client.auth_login_response("user") == base64.b64encode(b"user") + b"\r\n"


def test_ehlo_lists_the_auth_mechanisms() -> None:
    reply = ServerReply(250, ("relay.example", "PIPELINING", "AUTH login Plain", "STARTTLS"))
    assert client.parse_ehlo(reply).auth == frozenset({"LOGIN", "PLAIN"})
    assert client.parse_ehlo(ServerReply(250, ("relay.example",))).auth == frozenset()
