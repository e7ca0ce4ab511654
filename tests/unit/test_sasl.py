"""protocol.sasl on its own: AUTH arguments and response lines in, steps out (RFC 4954,
RFC 4616 PLAIN, LOGIN)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gsmtp.protocol import replies
from gsmtp.protocol.sasl import Challenge, Credentials, SaslExchange


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def test_plain_with_initial_response() -> None:
    exchange, step = SaslExchange.begin("PLAIN " + b64(b"\x00alice@foo.com\x00pw").decode())
    assert exchange is None
    assert step == Credentials("PLAIN", "alice@foo.com", "pw", "")


def test_plain_without_initial_response_gets_an_empty_challenge() -> None:
    exchange, step = SaslExchange.begin("plain")
    assert isinstance(step, Challenge)
    assert step.reply.to_bytes() == b"334 \r\n"
    assert exchange is not None
    assert exchange.feed(b64(b"admin\x00alice\x00pw")) == Credentials(
        "PLAIN", "alice", "pw", "admin"
    )


def test_login_prompts_for_username_then_password() -> None:
    exchange, step = SaslExchange.begin("LOGIN")
    assert isinstance(step, Challenge)
    assert step.reply.to_bytes() == b"334 VXNlcm5hbWU6\r\n"  # "Username:"
    assert exchange is not None
    step = exchange.feed(b64(b"alice@foo.com"))
    assert isinstance(step, Challenge)
    assert step.reply.to_bytes() == b"334 UGFzc3dvcmQ6\r\n"  # "Password:"
    assert exchange.feed(b64("pässword".encode())) == Credentials(
        "LOGIN", "alice@foo.com", "pässword"
    )


def test_login_with_initial_response_skips_the_username_prompt() -> None:
    exchange, step = SaslExchange.begin("LOGIN " + b64(b"alice").decode())
    assert isinstance(step, Challenge) and "UGFzc3dvcmQ6" in step.reply.text
    assert exchange is not None
    assert exchange.feed(b64(b"pw")) == Credentials("LOGIN", "alice", "pw")


@pytest.mark.parametrize(
    ("argument", "reply"),
    [
        ("FOO", replies.AUTH_MECHANISM_UNKNOWN),  # 504 5.5.4
        ("CRAM-MD5", replies.AUTH_MECHANISM_UNKNOWN),
        ("", replies.SYNTAX_ERROR),
        ("PLAIN a b", replies.SYNTAX_ERROR),
        ("PLAIN !!!", replies.AUTH_BAD_BASE64),  # 501 5.5.2
        ("PLAIN AGFsaWNl", replies.AUTH_MALFORMED),  # one NUL only
        ("PLAIN =", replies.AUTH_MALFORMED),  # the empty response
        ("PLAIN " + b64(b"\x00alice\x00").decode(), replies.AUTH_MALFORMED),  # no password
        ("PLAIN " + b64(b"\x00\x00pw").decode(), replies.AUTH_MALFORMED),  # no username
        ("PLAIN " + b64(b"a\x00b\x00c\x00d").decode(), replies.AUTH_MALFORMED),
        ("PLAIN " + b64(b"\x00alice\x00\xff\xfe").decode(), replies.AUTH_MALFORMED),  # not UTF-8
        ("PLAIN " + b64(b"\x00alice\x00" + b"p" * 256).decode(), replies.AUTH_MALFORMED),
        ("PLAIN *", replies.AUTH_CANCELLED),
    ],
)
def test_refusals(argument: str, reply: replies.Reply) -> None:
    exchange, step = SaslExchange.begin(argument)
    assert exchange is None
    assert step == reply


def test_star_cancels_and_bad_base64_is_refused_mid_exchange() -> None:
    """P-60: `*` → 501 5.7.0 (RFC 4954 §4); a response that is not base64 → 501 5.5.2."""
    exchange, _ = SaslExchange.begin("LOGIN")
    assert exchange is not None
    assert exchange.feed(b"*") == replies.AUTH_CANCELLED
    assert replies.AUTH_CANCELLED.to_bytes().startswith(b"501 5.7.0")
    exchange, _ = SaslExchange.begin("PLAIN")
    assert exchange is not None
    assert exchange.feed(b"not base64!") == replies.AUTH_BAD_BASE64
    assert replies.AUTH_BAD_BASE64.to_bytes().startswith(b"501 5.5.2")


def test_the_password_is_not_in_the_repr() -> None:
    credentials = Credentials("PLAIN", "alice", "hunter2-very-secret")
    assert "hunter2-very-secret" not in repr(credentials)
    assert "alice" in repr(credentials)


_SAFE = st.text(
    alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=60,
)


@given(authzid=st.one_of(st.just(""), _SAFE), username=_SAFE, password=_SAFE)
def test_plain_round_trip(authzid: str, username: str, password: str) -> None:
    message = "\x00".join([authzid, username, password]).encode("utf-8")
    _, step = SaslExchange.begin("PLAIN " + b64(message).decode())
    assert step == Credentials("PLAIN", username, password, authzid)
