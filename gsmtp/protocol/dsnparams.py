"""RFC 3461 delivery status notification parameters: RET and ENVID on MAIL, NOTIFY and
ORCPT on RCPT, and the xtext encoding that carries ENVID and ORCPT on the wire.

No I/O. The session parses what a client sends into these values (a bad value is a
`Reply`, never an exception); the spool stores them; the SMTP client writes them again
for a next hop that offers DSN; the notice builder quotes them. ENVID and ORCPT are kept
*decoded* and must decode to printable US-ASCII (RFC 3461 §4.2, §4.4: the DSN format
cannot carry anything else), so no value taken from a client can break a header line of
a notice (CVE-2020-28026, Exim: ORCPT with a newline written into the spool).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass

from gsmtp.protocol import replies
from gsmtp.protocol.replies import Reply

# RFC 3461 §4.4 and §4.2: the longest ENVID and ORCPT values (as sent, xtext-encoded).
MAX_ENVID = 100
MAX_ORCPT = 500
MAIL_KEYWORDS = frozenset({"RET", "ENVID"})
RCPT_KEYWORDS = frozenset({"NOTIFY", "ORCPT"})

# xtext (RFC 3461 §4): "!".."~" stand for themselves except "+" and "=", which (like
# anything else) are written "+" and two upper-case hex digits.
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-Fa-f]{2})*")
_HEXCHAR = re.compile(r"\+([0-9A-Fa-f]{2})")
_PRINTABLE = re.compile(r"[ -~]*")
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")


class Ret(enum.Enum):
    """RET: what a failure notice returns of the message (RFC 3461 §4.3)."""

    FULL = "FULL"
    HDRS = "HDRS"


class Notify(enum.Enum):
    """The conditions NOTIFY may ask a notice for (RFC 3461 §4.1). NOTIFY=NEVER is the
    empty set; no NOTIFY at all is `None` (the RFC default, FAILURE and DELAY)."""

    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    DELAY = "DELAY"


NEVER: frozenset[Notify] = frozenset()
DEFAULT_NOTIFY = frozenset({Notify.FAILURE, Notify.DELAY})  # RFC 3461 §4.1


@dataclass(frozen=True, slots=True)
class RecipientDsn:
    """What a client asked for one recipient. `notify` None: NOTIFY not given; empty:
    NEVER. `orcpt`: "addr-type;address", decoded (e.g. "rfc822;a@b.example")."""

    notify: frozenset[Notify] | None = None
    orcpt: str | None = None


@dataclass(frozen=True, slots=True)
class MailDsn:
    """What a client asked for the whole message on MAIL."""

    ret: Ret | None = None
    envid: str | None = None


def xtext_encode(text: str) -> str:
    """RFC 3461 §4: every character outside "!".."~", and "+" and "=", as +XX."""
    return "".join(
        char if "!" <= char <= "~" and char not in "+=" else f"+{ord(char):02X}" for char in text
    )


def xtext_decode(text: str) -> str | None:
    """The decoded value, or None for malformed xtext (a stray "+", a space, non-ASCII)."""
    if not _XTEXT.fullmatch(text):
        return None
    return _HEXCHAR.sub(lambda match: chr(int(match.group(1), 16)), text)


def notify_text(notify: frozenset[Notify]) -> str:
    """The NOTIFY value as written on the wire and in the spool, in a fixed order."""
    if not notify:
        return "NEVER"
    return ",".join(item.value for item in Notify if item in notify)


def parse_notify(value: str | None) -> frozenset[Notify] | Reply:
    """`NEVER`, or a comma list of SUCCESS, FAILURE, DELAY (case-insensitive, each at
    most once); NEVER must stand alone (RFC 3461 §4.1)."""
    if not value:
        return replies.bad_parameter("NOTIFY", "a value is required")
    words = value.upper().split(",")
    if "NEVER" in words:
        if len(words) > 1:
            return replies.bad_parameter("NOTIFY", "NEVER must stand alone")
        return NEVER
    found: set[Notify] = set()
    for word in words:
        if word not in Notify.__members__:
            return replies.bad_parameter(
                "NOTIFY", "must be NEVER or a list of SUCCESS, FAILURE, DELAY"
            )
        if Notify[word] in found:
            return replies.bad_parameter("NOTIFY", f"{word} is given twice")
        found.add(Notify[word])
    return frozenset(found)


def parse_mail_parameters(parameters: Mapping[str, str | None]) -> MailDsn | Reply:
    """RET and ENVID out of MAIL's parameters (the others are checked by the session)."""
    ret = None
    if "RET" in parameters:
        value = (parameters["RET"] or "").upper()
        if value not in Ret.__members__:
            return replies.bad_parameter("RET", "must be FULL or HDRS")
        ret = Ret[value]
    envid = None
    if "ENVID" in parameters:
        decoded = _decode("ENVID", parameters["ENVID"], MAX_ENVID)
        if isinstance(decoded, Reply):
            return decoded
        envid = decoded
    return MailDsn(ret, envid)


def parse_rcpt_parameters(parameters: Mapping[str, str | None]) -> RecipientDsn | Reply:
    """NOTIFY and ORCPT out of RCPT's parameters; any other keyword is unknown."""
    unknown = set(parameters) - RCPT_KEYWORDS
    if unknown:
        return replies.UNKNOWN_PARAMETER
    notify = None
    if "NOTIFY" in parameters:
        parsed = parse_notify(parameters["NOTIFY"])
        if isinstance(parsed, Reply):
            return parsed
        notify = parsed
    orcpt = None
    if "ORCPT" in parameters:
        value = parameters["ORCPT"] or ""
        if len(value) > MAX_ORCPT:
            return replies.bad_parameter("ORCPT", f"longer than {MAX_ORCPT} characters")
        addr_type, semicolon, encoded = value.partition(";")
        if not semicolon or not _ATOM.fullmatch(addr_type) or not encoded:
            return replies.bad_parameter("ORCPT", "must be addr-type;xtext, e.g. rfc822;a@b")
        address = _decode("ORCPT", encoded, MAX_ORCPT)
        if isinstance(address, Reply):
            return address
        orcpt = f"{addr_type};{address}"
    return RecipientDsn(notify, orcpt)


def orcpt_parameter(orcpt: str) -> str:
    """A stored ORCPT ("addr-type;address") as it goes on the wire: the address xtext."""
    addr_type, _, address = orcpt.partition(";")
    return f"{addr_type};{xtext_encode(address)}"


def _decode(keyword: str, value: str | None, limit: int) -> str | Reply:
    if not value:
        return replies.bad_parameter(keyword, "a value is required")
    if len(value) > limit:
        return replies.bad_parameter(keyword, f"longer than {limit} characters")
    decoded = xtext_decode(value)
    if decoded is None:
        return replies.bad_parameter(keyword, "not valid xtext")
    if not _PRINTABLE.fullmatch(decoded):
        return replies.bad_parameter(keyword, "must decode to printable US-ASCII")
    return decoded
