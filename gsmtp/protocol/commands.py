"""Parse one SMTP command line into a verb and its argument; parse MAIL/RCPT parameters.

No I/O. Input is a line already stripped of its CRLF. A malformed line is a `Reply`
value, never an exception (RFC 5321 §4.1.1, RFC 1869 for ESMTP parameters).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from gsmtp.protocol import replies
from gsmtp.protocol.replies import Reply


class Verb(enum.Enum):
    EHLO = "EHLO"
    HELO = "HELO"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    RSET = "RSET"
    NOOP = "NOOP"
    QUIT = "QUIT"
    VRFY = "VRFY"
    HELP = "HELP"
    EXPN = "EXPN"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"
    BDAT = "BDAT"


_VERBS = {verb.value: verb for verb in Verb}
# Cross-protocol attempts (ALPACA, HTTP to port 25): close at once (RFC 5321 §7; chasquid).
_FOREIGN_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "DELETE"})
_HEADER_LIKE = re.compile(r"[A-Za-z0-9-]+:")
_PATH_PREFIX = {Verb.MAIL: "FROM:", Verb.RCPT: "TO:"}


@dataclass(frozen=True, slots=True)
class Command:
    verb: Verb
    argument: str


@dataclass(frozen=True, slots=True)
class Foreign:
    """A line that is not SMTP at all (HTTP, a header sent as a command)."""


@dataclass(frozen=True, slots=True)
class PathArgument:
    """MAIL FROM:/RCPT TO: split into the path text and its ESMTP parameters."""

    path: str
    parameters: dict[str, str | None] = field(default_factory=dict)


def parse_command(line: bytes) -> Command | Foreign | Reply:
    """Decode and split a command line; the verb is case-insensitive (RFC 5321 §2.4)."""
    if not line.strip():
        return replies.EMPTY_COMMAND
    if b"\x00" in line:
        return replies.NUL_IN_COMMAND
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return replies.BAD_UTF8
    word, _, argument = text.partition(" ")
    upper = word.upper()
    verb = _VERBS.get(upper)
    if verb is None:
        if upper in _FOREIGN_VERBS or _HEADER_LIKE.fullmatch(word):
            return Foreign()
        return replies.UNKNOWN_COMMAND
    return Command(verb, argument.strip(" "))


def split_path_argument(verb: Verb, argument: str) -> PathArgument | Reply:
    """`FROM:<path> KEY=VALUE ...` → path text and parameters (RFC 5321 §4.1.2).

    A space after the colon is tolerated (common in the wild); keywords are
    case-insensitive; a repeated keyword is an error (501)."""
    prefix = _PATH_PREFIX[verb]
    if argument[: len(prefix)].upper() != prefix:
        return replies.SYNTAX_ERROR
    rest = argument[len(prefix) :].lstrip(" ")
    if not rest:
        return replies.SYNTAX_ERROR
    path, params_text = _split_path(rest)
    parameters: dict[str, str | None] = {}
    for token in params_text.split():
        key, eq, value = token.partition("=")
        key = key.upper()
        if not key:
            return replies.SYNTAX_ERROR
        if key in parameters:
            return replies.DUPLICATE_PARAMETER.with_text(f"Duplicate {key[:32]} parameter")
        parameters[key] = value if eq else None
    return PathArgument(path, parameters)


def _split_path(rest: str) -> tuple[str, str]:
    """Find the end of the path: the '>' that closes it, skipping quoted text."""
    if not rest.startswith("<"):
        path, _, params = rest.partition(" ")
        return path, params
    in_quotes = False
    index = 1
    while index < len(rest):
        char = rest[index]
        if char == "\\" and in_quotes:
            index += 2
            continue
        if char == '"':
            in_quotes = not in_quotes
        elif char == ">" and not in_quotes:
            return rest[: index + 1], rest[index + 1 :]
        index += 1
    return rest, ""
