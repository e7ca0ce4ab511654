"""AUTH and submission in the bare session, with a fake verifier: the reliability
catalogue's AUTH rows (P-58, P-59, P-60, R-16, R-17, S-11) at the protocol level."""

from __future__ import annotations

import base64

import pytest

from gsmtp.protocol import replies
from gsmtp.protocol.session import (
    NEED_DATA,
    AuthRequested,
    Limits,
    ListenerRules,
    SmtpSession,
    StartTlsRequested,
)
from tests.unit.session_driver import SessionWire

PORT_25 = ListenerRules(auth=True)
SUBMISSION = ListenerRules(auth=True, submission=True)
SUBMISSION_PLAINTEXT = ListenerRules(auth=True, submission=True, plaintext_auth=True)


def plain(username: str, password: str, authzid: str = "") -> str:
    return base64.b64encode(f"{authzid}\x00{username}\x00{password}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def wire(*, tls: bool = True, rules: ListenerRules = PORT_25) -> SessionWire:
    result = SessionWire(tls=tls, rules=rules, greeted=True)
    result.send(b"EHLO c.example\r\n")
    result.read_reply()
    return result


def say(w: SessionWire, line: str) -> str:
    w.send(line.encode() + b"\r\n")
    return w.read_reply()[-1]


def ehlo_lines(w: SessionWire) -> list[str]:
    w.send(b"EHLO c.example\r\n")
    return [line[4:] for line in w.read_reply()]


def test_auth_in_cleartext_is_not_offered_and_refused_unchecked() -> None:
    """P-59: no AUTH in EHLO before TLS; AUTH → 538 5.7.11 and nothing is verified."""
    w = wire(tls=False)
    assert "AUTH PLAIN LOGIN" not in ehlo_lines(w)
    assert say(w, "AUTH PLAIN " + plain("jones@foo.com", "jones-secret")).startswith("538 5.7.11")
    assert say(w, "AUTH LOGIN").startswith("538 5.7.11")
    assert w.checked == []
    assert not w.session.authenticated
    # Port 25 without AUTH still takes mail for local users.
    assert say(w, "MAIL FROM:<a@remote.example>").startswith("250")
    assert say(w, "RCPT TO:<jones@foo.com>").startswith("250")


def test_auth_is_offered_under_tls() -> None:
    assert "AUTH PLAIN LOGIN" in ehlo_lines(wire(tls=True))


def test_auth_without_a_verifier_is_not_implemented() -> None:
    w = wire(tls=True, rules=ListenerRules())
    assert "AUTH PLAIN LOGIN" not in ehlo_lines(w)
    assert say(w, "AUTH PLAIN " + plain("jones@foo.com", "x")).startswith("502 5.5.1")


def test_plain_success_grants_relay_and_survives_rset() -> None:
    """R-16: relay after AUTH, and RSET keeps the authentication."""
    w = wire()
    assert say(w, "MAIL FROM:<jones@foo.com>").startswith("250")
    assert say(w, "RCPT TO:<x@remote.example>").startswith("554 5.7.1")  # not yet
    assert say(w, "RSET").startswith("250")
    assert say(w, "AUTH PLAIN " + plain("jones@foo.com", "jones-secret")) == (
        "235 2.7.0 Authentication successful"
    )
    for _ in range(2):
        assert say(w, "MAIL FROM:<jones@foo.com>").startswith("250")
        assert say(w, "RCPT TO:<x@remote.example>").startswith("250")
        assert say(w, "RSET").startswith("250")


def test_login_dialogue() -> None:
    w = wire()
    assert say(w, "AUTH LOGIN") == "334 VXNlcm5hbWU6"
    assert say(w, b64("brown@foo.com")) == "334 UGFzc3dvcmQ6"
    assert say(w, b64("brown-secret")).startswith("235 2.7.0")
    assert w.checked == ["brown@foo.com"]


def test_wrong_password_is_535() -> None:
    w = wire()
    assert say(w, "AUTH PLAIN " + plain("jones@foo.com", "wrong")).startswith("535 5.7.8")
    assert not w.session.authenticated
    assert say(w, "MAIL FROM:<a@remote.example>").startswith("250")
    assert say(w, "RCPT TO:<x@remote.example>").startswith("554 5.7.1")


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["AUTH PLAIN !!!"], "501 5.5.2"),
        (["AUTH PLAIN", "*"], "501 5.7.0"),
        (["AUTH LOGIN", b64("jones@foo.com"), "*"], "501 5.7.0"),
        (["AUTH PLAIN", "%%%%"], "501 5.5.2"),
        (["AUTH FOO"], "504 5.5.4"),
        (["AUTH"], "501 5.5.4"),
    ],
)
def test_auth_abuse(lines: list[str], expected: str) -> None:
    """P-60: every broken exchange ends with one refusal, nothing is verified, and the
    session is back in sync (the next command is a command again)."""
    w = wire()
    for line in lines[:-1]:
        assert say(w, line).startswith("334")
    assert say(w, lines[-1]).startswith(expected)
    assert w.checked == []
    assert say(w, "NOOP").startswith("250")


def test_auth_during_a_transaction_is_503() -> None:
    """P-60 / RFC 4954 §4: AUTH inside a mail transaction MUST be rejected with 503."""
    w = wire()
    assert say(w, "MAIL FROM:<a@remote.example>").startswith("250")
    assert say(w, "AUTH PLAIN " + plain("jones@foo.com", "jones-secret")).startswith("503 5.5.1")
    assert w.checked == []


def test_second_auth_is_503() -> None:
    w = wire()
    assert say(w, "AUTH PLAIN " + plain("jones@foo.com", "jones-secret")).startswith("235")
    assert say(w, "AUTH PLAIN " + plain("brown@foo.com", "brown-secret")).startswith("503 5.5.1")
    assert w.checked == ["jones@foo.com"]


@pytest.mark.parametrize("greeting", [None, "HELO c.example"])
def test_auth_needs_ehlo_first(greeting: str | None) -> None:
    w = SessionWire(tls=True, rules=PORT_25, greeted=True)
    if greeting:
        assert say(w, greeting).startswith("250")
    assert say(w, "AUTH PLAIN " + plain("jones@foo.com", "jones-secret")).startswith("503 5.5.1")
    assert w.checked == []


def test_a_long_response_line_is_read_and_an_endless_one_refused() -> None:
    """RFC 4954 §4: responses of up to 12288 octets are read (a command line stops at
    512); longer → 500 5.5.6, the exchange ends and the session stays in sync."""
    w = wire()
    assert say(w, "AUTH PLAIN").startswith("334")
    assert say(w, b64("x" * 250 + "\x00" + "jones@foo.com\x00" + "p" * 250)).startswith("535")
    assert say(w, "AUTH PLAIN").startswith("334")
    assert say(w, "A" * 20000).startswith("500 5.5.6")
    assert say(w, "NOOP").startswith("250")


def test_auth_fed_one_byte_at_a_time() -> None:
    w = wire()
    data = (
        f"AUTH LOGIN\r\n{b64('jones@foo.com')}\r\n{b64('jones-secret')}\r\n"
        "MAIL FROM:<jones@foo.com>\r\nRCPT TO:<x@remote.example>\r\n"
    ).encode()
    for index in range(len(data)):
        w.send(data[index : index + 1])
    assert [reply[:3] for reply in w.all_replies()] == ["334", "334", "235", "250", "250"]


def test_a_421_answer_closes_the_session() -> None:
    """Too many failures from the network: the shell answers 421 4.7.0 and it closes."""
    session = SmtpSession(Limits(), hostname="mx.foo.com", tls_active=True, rules=PORT_25)
    session.start()
    session.receive_data(b"EHLO c\r\n")  # EHLO ends a group (RFC 2920 §3.1)
    assert session.next_event() is NEED_DATA
    session.receive_data(b"AUTH PLAIN " + plain("a@b.c", "s3cr3t-pw").encode() + b"\r\n")
    event = session.next_event()
    assert isinstance(event, AuthRequested)
    assert "s3cr3t-pw" not in repr(event)
    session.respond(event, replies.AUTH_TOO_MANY_FAILURES)
    assert session.closed
    assert session.data_to_send().endswith(replies.AUTH_TOO_MANY_FAILURES.to_bytes())
    assert replies.AUTH_TOO_MANY_FAILURES.to_bytes().startswith(b"421 4.7.0 ")


def test_starttls_forgets_the_authentication() -> None:
    """P-58: after STARTTLS everything said before, AUTH included, is forgotten."""
    session = SmtpSession(
        Limits(), hostname="mx.foo.com", tls_available=True, rules=SUBMISSION_PLAINTEXT
    )
    session.start()
    session.receive_data(b"EHLO c\r\n")  # EHLO ends a group (RFC 2920 §3.1)
    assert session.next_event() is NEED_DATA
    session.receive_data(b"AUTH PLAIN " + plain("a@b.c", "pw").encode() + b"\r\n")
    event = session.next_event()
    assert isinstance(event, AuthRequested)
    session.respond(event, replies.AUTH_SUCCEEDED)
    assert session.authenticated
    session.receive_data(b"STARTTLS\r\n")
    event = session.next_event()
    assert isinstance(event, StartTlsRequested)
    session.respond(event, replies.READY_FOR_TLS)
    assert not session.authenticated
    session.data_to_send()
    session.receive_data(b"EHLO c\r\n")
    assert session.next_event() is NEED_DATA
    session.receive_data(b"MAIL FROM:<a@b.c>\r\n")
    assert session.next_event() is NEED_DATA
    assert session.data_to_send().endswith(b"530 5.7.0 Authentication required\r\n")


# -- submission (RFC 6409, S-11) ------------------------------------------------------


def test_submission_before_tls_allows_only_the_greeting_verbs() -> None:
    w = wire(tls=False, rules=SUBMISSION)
    assert "AUTH PLAIN LOGIN" not in ehlo_lines(w)
    for line in ("MAIL FROM:<jones@foo.com>", "RCPT TO:<x@remote.example>", "DATA", "VRFY x"):
        assert say(w, line) == "530 5.7.0 Must issue a STARTTLS command first"
    assert say(w, "AUTH PLAIN " + plain("jones@foo.com", "jones-secret")).startswith("538 5.7.11")
    for line in ("NOOP", "RSET", "HELP"):
        assert say(w, line)[0] == "2"
    assert w.checked == []


def test_submission_requires_auth_before_mail() -> None:
    w = wire(tls=True, rules=SUBMISSION)
    assert "AUTH PLAIN LOGIN" in ehlo_lines(w)
    assert say(w, "MAIL FROM:<jones@foo.com>") == "530 5.7.0 Authentication required"
    assert say(w, "AUTH PLAIN " + plain("jones@foo.com", "jones-secret")).startswith("235")
    assert say(w, "MAIL FROM:<jones@foo.com>").startswith("250")


def test_submission_with_plaintext_auth_offers_auth_without_tls() -> None:
    w = wire(tls=False, rules=SUBMISSION_PLAINTEXT)
    assert "AUTH PLAIN LOGIN" in ehlo_lines(w)
    assert say(w, "MAIL FROM:<jones@foo.com>") == "530 5.7.0 Authentication required"
    assert say(w, "AUTH PLAIN " + plain("jones@foo.com", "jones-secret")).startswith("235")


@pytest.mark.parametrize(
    ("sender", "code"),
    [
        ("jones@foo.com", "250"),
        ("JONES@foo.com", "250"),
        ("", "250"),  # the null sender: MDNs
        ("sales@foo.com", "250"),  # --may-send-as sales@foo.com
        ("anyone@jones.example", "250"),  # --may-send-as @jones.example
        ("brown@foo.com", "553 5.7.1"),  # another local user
        ("ceo@bank.example", "553 5.7.1"),
        ("x@sub.jones.example", "553 5.7.1"),
    ],
)
@pytest.mark.parametrize("rules", [SUBMISSION, PORT_25], ids=["submission", "port25"])
def test_an_authenticated_sender_must_be_owned(
    sender: str, code: str, rules: ListenerRules
) -> None:
    w = wire(tls=True, rules=rules)
    assert say(w, "AUTH PLAIN " + plain("jones@foo.com", "jones-secret")).startswith("235")
    assert say(w, f"MAIL FROM:<{sender}>").startswith(code)


def test_auth_never_relays_to_address_literals() -> None:
    """S-18 / R-10: an authenticated client still cannot relay to an address literal."""
    w = wire()
    assert say(w, "AUTH PLAIN " + plain("jones@foo.com", "jones-secret")).startswith("235")
    assert say(w, "MAIL FROM:<jones@foo.com>").startswith("250")
    for literal in ("[127.0.0.1]", "[169.254.169.254]", "[IPv6:::1]"):
        assert say(w, f"RCPT TO:<x@{literal}>").startswith("554 5.7.1"), literal
    assert say(w, "RCPT TO:<x@remote.example>").startswith("250")
