"""The server side of one SMTP AUTH exchange (RFC 4954): PLAIN (RFC 4616) and LOGIN.

No I/O, and no decision: the exchange turns the AUTH argument and the client's response
lines into either a challenge to send (`334 ...`), a refusal (a `Reply`), or the
`Credentials` the client presented. Whether they are right is decided outside (the
session raises an event, the shell verifies off the event loop). A password never
appears in a reply, a repr or an exception.

Rules (RFC 4954 §4): a response is base64 (else 501 5.5.2); `*` cancels (501 5.7.0,
as Postfix and aiosmtpd answer); an initial response of zero length is sent as `=`;
an unknown mechanism gets 504 5.5.4.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from gsmtp.protocol import replies
from gsmtp.protocol.replies import Reply

MECHANISMS = ("PLAIN", "LOGIN")
# RFC 4954 §4: a server SHOULD accept response lines of at least 12288 octets.
MAX_RESPONSE_LINE = 12288
# RFC 4616 §2: authzid, authcid and passwd are at most 255 octets each.
_MAX_FIELD = 255
# LOGIN's prompts, base64 of "Username:" and "Password:" (draft-murchison-sasl-login).
_USERNAME_PROMPT = base64.b64encode(b"Username:").decode("ascii")
_PASSWORD_PROMPT = base64.b64encode(b"Password:").decode("ascii")


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the client presented; `authzid` is "" when it asked for no other identity."""

    mechanism: str
    username: str
    password: str = field(repr=False)
    authzid: str = ""


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send this 334 reply and feed the client's next line to `SaslExchange.feed`."""

    reply: Reply


Step = Challenge | Credentials | Reply


class SaslExchange:
    """One AUTH command from its argument to credentials (or a refusal)."""

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism
        self._username: str | None = None  # LOGIN, once the first response arrived

    @classmethod
    def begin(cls, argument: str) -> tuple[SaslExchange | None, Step]:
        """`AUTH <mechanism> [initial-response]` → the exchange (None when it ended at
        once) and its first step."""
        words = argument.split(" ")
        mechanism = words[0].upper()
        if not mechanism or len(words) > 2:
            return None, replies.SYNTAX_ERROR
        if mechanism not in MECHANISMS:
            return None, replies.AUTH_MECHANISM_UNKNOWN
        exchange = cls(mechanism)
        if len(words) == 2:
            step = exchange.feed(words[1].encode("ascii", "replace"))
        elif mechanism == "PLAIN":
            step = Challenge(replies.auth_challenge(""))
        else:
            step = Challenge(replies.auth_challenge(_USERNAME_PROMPT))
        return (exchange if isinstance(step, Challenge) else None), step

    def feed(self, line: bytes) -> Step:
        """The client's response line (CRLF removed)."""
        if line == b"*":
            return replies.AUTH_CANCELLED
        decoded = _decode(line)
        if isinstance(decoded, Reply):
            return decoded
        if self.mechanism == "PLAIN":
            return _plain(decoded)
        if self._username is None:
            self._username = decoded
            return Challenge(replies.auth_challenge(_PASSWORD_PROMPT))
        return _credentials("LOGIN", "", self._username, decoded)


def _decode(line: bytes) -> str | Reply:
    """Base64 (RFC 4648, strict) of UTF-8 text; "=" is the empty response."""
    if line == b"=":
        return ""
    try:
        raw = base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        return replies.AUTH_BAD_BASE64
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return replies.AUTH_MALFORMED


def _plain(message: str) -> Step:
    """RFC 4616 §2: message = [authzid] NUL authcid NUL passwd."""
    parts = message.split("\x00")
    if len(parts) != 3:
        return replies.AUTH_MALFORMED
    authzid, username, password = parts
    return _credentials("PLAIN", authzid, username, password)


def _credentials(mechanism: str, authzid: str, username: str, password: str) -> Step:
    if not username or not password:
        return replies.AUTH_MALFORMED
    if any(len(item.encode("utf-8")) > _MAX_FIELD for item in (authzid, username, password)):
        return replies.AUTH_MALFORMED
    return Credentials(mechanism, username, password, authzid)
