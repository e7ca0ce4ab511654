"""The client side of SMTP, sans-I/O: parse replies, read EHLO, build commands and the
dot-stuffed message data.

No I/O. The delivery shell (`delivery/smtp.py`) decides what to send when; this module
says how the bytes look. Outbound data is always clean: every line ends in CRLF (a stray
CR or LF is turned into CRLF, so gsmtp never relays a smuggling vector, P-10) and every
line that starts with a dot gets a second one (RFC 5321 §4.5.2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gsmtp.protocol.dsnparams import (
    RecipientDsn,
    Ret,
    notify_text,
    orcpt_parameter,
    xtext_encode,
)

MAX_REPLY_LINE = 2048
MAX_REPLY_LINES = 100
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])(.*)")
_STRAY_EOL = re.compile(rb"\r(?!\n)|(?<!\r)\n")


class ReplyError(Exception):
    """The peer sent something that is not an SMTP reply (too long, garbage)."""


@dataclass(frozen=True, slots=True)
class ServerReply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """One line, for logs, last_error and bounces: `550 5.1.1 No such user`."""
        return f"{self.code} " + " ".join(self.lines)

    @property
    def enhanced(self) -> str | None:
        match = re.match(r"([245])\.(\d{1,3})\.(\d{1,3})\b", self.lines[0] if self.lines else "")
        return match.group(0) if match else None

    def status(self, default_detail: str = "0.0") -> str:
        """The RFC 3463 status for a DSN: the reply's own, else derived from its class."""
        return self.enhanced or f"{str(self.code)[0]}.{default_detail}"

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500


class ReplyParser:
    """Feed bytes, take complete (multi-line) replies."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines: list[str] = []

    def feed(self, data: bytes) -> list[ServerReply]:
        self._buffer += data
        replies: list[ServerReply] = []
        while True:
            end = self._buffer.find(b"\r\n")
            if end < 0:
                if len(self._buffer) > MAX_REPLY_LINE:
                    raise ReplyError("reply line too long")
                return replies
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 2]
            if len(line) > MAX_REPLY_LINE:
                raise ReplyError("reply line too long")
            match = _REPLY_LINE.fullmatch(line) or _REPLY_LINE.fullmatch(line + b" ")
            if match is None:
                raise ReplyError(f"not an SMTP reply: {line[:60]!r}")
            self._lines.append(match.group(3).decode("utf-8", "replace").strip())
            if len(self._lines) > MAX_REPLY_LINES:
                raise ReplyError("reply has too many lines")
            if match.group(2) == b" ":
                replies.append(ServerReply(int(match.group(1)), tuple(self._lines)))
                self._lines = []

    @property
    def idle(self) -> bool:
        """Nothing half-read: every byte fed so far belongs to a reply already taken."""
        return not self._buffer and not self._lines

    def discard_buffered(self) -> bool:
        """Drop unread bytes (after STARTTLS, D-29); True if there were any."""
        had = bool(self._buffer or self._lines)
        self._buffer.clear()
        self._lines = []
        return had


@dataclass(frozen=True, slots=True)
class Extensions:
    pipelining: bool = False
    size: int | None = None
    eightbitmime: bool = False
    smtputf8: bool = False
    starttls: bool = False
    dsn: bool = False


def parse_ehlo(reply: ServerReply) -> Extensions:
    """The keywords of an EHLO reply (RFC 5321 §4.1.1.1); the first line is the greeting."""
    found: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, value = line.partition(" ")
        found[keyword.upper()] = value.strip()
    size: int | None = None
    if "SIZE" in found and found["SIZE"].isdigit() and int(found["SIZE"]) > 0:
        size = int(found["SIZE"])
    return Extensions(
        pipelining="PIPELINING" in found,
        size=size,
        eightbitmime="8BITMIME" in found,
        smtputf8="SMTPUTF8" in found,
        starttls="STARTTLS" in found,
        dsn="DSN" in found,
    )


def mail_command(
    sender: str,
    *,
    size: int | None,
    eightbit: bool,
    smtputf8: bool,
    ret: Ret | None = None,
    envid: str | None = None,
) -> bytes:
    """MAIL FROM with its parameters; RET/ENVID (RFC 3461) only for a peer offering DSN."""
    params = ""
    if size is not None:
        params += f" SIZE={size}"
    if eightbit:
        params += " BODY=8BITMIME"
    if smtputf8:
        params += " SMTPUTF8"
    if ret is not None:
        params += f" RET={ret.value}"
    if envid is not None:
        params += f" ENVID={xtext_encode(envid)}"
    return _command(f"MAIL FROM:<{sender}>{params}")


def rcpt_command(recipient: str, dsn: RecipientDsn | None = None) -> bytes:
    """RCPT TO, with NOTIFY/ORCPT (RFC 3461) as received, only for a peer offering DSN."""
    params = ""
    if dsn is not None and dsn.notify is not None:
        params += f" NOTIFY={notify_text(dsn.notify)}"
    if dsn is not None and dsn.orcpt is not None:
        params += f" ORCPT={orcpt_parameter(dsn.orcpt)}"
    return _command(f"RCPT TO:<{recipient}>{params}")


def _command(text: str) -> bytes:
    if "\r" in text or "\n" in text:
        raise ValueError("CR or LF in an SMTP command")  # S-17: never on the wire
    return text.encode("utf-8") + b"\r\n"


def is_8bit(data: bytes) -> bool:
    return not data.isascii()


def encode_data(body: bytes) -> bytes:
    """Message data ready to send after 354: CRLF everywhere, dots doubled, and the
    terminating `.` line."""
    clean = _STRAY_EOL.sub(b"\r\n", body)
    if clean and not clean.endswith(b"\r\n"):
        clean += b"\r\n"
    stuffed = clean.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"
