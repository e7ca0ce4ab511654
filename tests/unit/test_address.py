"""RFC 5321 paths (P-36..P-43, S-15, S-16)."""

from __future__ import annotations

import pytest

from gsmtp.accounts import AccountError, parse_mailbox
from gsmtp.protocol.address import Address, AddressError, normalise_mailbox, parse_path


def ok(text: str, **kwargs: bool) -> Address:
    result = parse_path(
        text, allow_null=kwargs.get("null", False), allow_utf8=kwargs.get("utf8", False)
    )
    assert isinstance(result, Address), result
    return result


@pytest.mark.parametrize(
    ("text", "local", "domain"),
    [
        ("<alice@local.example>", "alice", "local.example"),
        ("alice@local.example", "alice", "local.example"),  # brackets optional (P-36)
        ("<Alice@LOCAL.EXAMPLE.>", "Alice", "local.example"),  # P-43
        ('<"a b"@x.example>', "a b", "x.example"),  # P-41
        ('<"a\\"b"@x.example>', 'a"b', "x.example"),
        ('<"a>b"@x.example>', "a>b", "x.example"),
        ("<@a.example,@b.example:bob@remote.example>", "bob", "remote.example"),  # P-40
        ("<a@[192.0.2.25]>", "a", "[192.0.2.25]"),  # P-42
        ("<a@[IPv6:2001:db8::25]>", "a", "[IPv6:2001:db8::25]"),
        ("<" + "a" * 64 + "@x.example>", "a" * 64, "x.example"),
    ],
)
def test_valid_paths(text: str, local: str, domain: str) -> None:
    address = ok(text)
    assert (address.local, address.domain) == (local, domain)


@pytest.mark.parametrize(
    "text",
    [
        "<a>",
        "<a@>",
        "<@a>",
        "<@>",
        "<a@b@c.example>",
        "<" + "a" * 65 + "@x.example>",  # P-17
        "<x@" + "a" * 64 + ".example>",  # P-18: label over 63
        "<a@[300.1.1.1]>",
        "<a@[1.2.3]>",
        "<a@[IPv6:zz]>",
        "<a@[stuff>",
        "<a@local..example>",
        "<a@.local.example>",
        "<a@-x.example>",
        "<a@xn--->",
        "< @a.example>",
        "<a@ >",
        "<wietse @ porcupine.org>",
        "<alice@local.example",
    ],
)
def test_invalid_paths(text: str) -> None:
    assert isinstance(parse_path(text, allow_null=True, allow_utf8=True), AddressError)


def test_null_path_only_where_allowed() -> None:
    assert ok("<>", null=True).is_null
    assert isinstance(parse_path("<>", allow_null=False, allow_utf8=False), AddressError)


def test_utf8_needs_permission() -> None:
    assert isinstance(
        parse_path("<jörg@x.example>", allow_null=False, allow_utf8=False), AddressError
    )
    assert ok("<jörg@exämple.example>", utf8=True).domain == "xn--exmple-cua.example"


def test_quoted_local_part_roundtrips() -> None:
    assert str(ok('<"a b"@x.example>')) == '"a b"@x.example'


@pytest.mark.parametrize("text", ["alice@x.example", "ALICE@X.example", "ａｌｉｃｅ@x.example"])
def test_normalisation_is_one_idempotent_mapping(text: str) -> None:
    """S-16: case and width fold to one key, f(f(x)) == f(x)."""
    key = normalise_mailbox(ok(text, utf8=True))
    assert key == "alice@x.example"
    assert normalise_mailbox(ok(key, utf8=True)) == key


@pytest.mark.parametrize(
    "text",
    [
        "../../etc@x.example",
        '"../x"@x.example',
        '"a/b"@x.example',
        "a／b@x.example",
        ".x@x.example",
    ],
)
def test_mailbox_names_cannot_escape_the_maildir_root(text: str) -> None:
    """S-15: the names a user can be created under never contain a path separator."""
    with pytest.raises(AccountError):
        parse_mailbox(text)
