"""The catalogue of SMTP replies that gsmtp sends, named by meaning.

No I/O. Code and tests share these constants, so a test asserts a reply by name and a
change of wording happens in one place. Codes follow RFC 5321 §4.2, enhanced codes
RFC 3463.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: a three-digit code, an optional enhanced code, and text lines."""

    code: int
    enhanced: str
    text: str

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_error(self) -> bool:
        return self.code >= 400

    def with_text(self, text: str) -> Reply:
        """The same code with another text (e.g. naming the offending address)."""
        return Reply(self.code, self.enhanced, text)

    def to_bytes(self, enhanced: bool = True) -> bytes:
        """Wire form; several text lines become a multi-line reply (RFC 5321 §4.2.1)."""
        lines = self.text.split("\n")
        prefix = f"{self.enhanced} " if enhanced and self.enhanced else ""
        out = []
        for index, line in enumerate(lines):
            sep = " " if index == len(lines) - 1 else "-"
            out.append(f"{self.code}{sep}{prefix}{line}\r\n")
        return "".join(out).encode("utf-8", "replace")


def _r(code: int, enhanced: str, text: str) -> Reply:
    return Reply(code, enhanced, text)


# 2xx
OK = _r(250, "2.0.0", "Ok")
SENDER_OK = _r(250, "2.1.0", "Sender ok")
RECIPIENT_OK = _r(250, "2.1.5", "Recipient ok")
RESET_OK = _r(250, "2.0.0", "Reset state")
NOOP_OK = _r(250, "2.0.0", "Ok")
CLOSING = _r(221, "2.0.0", "Bye")
CANNOT_VRFY = _r(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = _r(
    214,
    "2.0.0",
    "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP\nSee RFC 5321",
)
START_MAIL_INPUT = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
READY_FOR_TLS = _r(220, "2.0.0", "Ready to start TLS")
AUTH_SUCCEEDED = _r(235, "2.7.0", "Authentication successful")

# 4xx
SHUTTING_DOWN = _r(421, "4.3.2", "Service shutting down, closing transmission channel")
IDLE_TIMEOUT = _r(421, "4.4.2", "Timeout exceeded, closing transmission channel")
COMMAND_TIMEOUT = _r(421, "4.4.2", "Command not completed in time, closing transmission channel")
DATA_TOO_SLOW = _r(421, "4.4.2", "Data rate too low, closing transmission channel")
TOO_MANY_ERRORS = _r(421, "4.7.0", "Too many errors, closing transmission channel")
TOO_MANY_CONNECTIONS = _r(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_CONNECTIONS_FROM = _r(421, "4.7.0", "Too many connections from")
TOO_MANY_NEW_CONNECTIONS_FROM = _r(421, "4.7.0", "Too many new connections from")
SPOOL_ERROR = _r(451, "4.3.0", "Local error in processing, message not accepted, try again")
TEMPORARY_LOOKUP_FAILURE = _r(451, "4.3.0", "Temporary lookup failure, try again")
TOO_MANY_RECIPIENTS = _r(452, "4.5.3", "Too many recipients")
INSUFFICIENT_STORAGE = _r(452, "4.3.1", "Insufficient system storage")
AUTH_TOO_MANY_FAILURES = _r(
    421, "4.7.0", "Too many failed authentication attempts, closing transmission channel"
)
AUTH_TEMPORARY_FAILURE = _r(454, "4.7.0", "Temporary authentication failure, try again")

# 5xx: syntax and sequence
UNKNOWN_COMMAND = _r(500, "5.5.1", "Command unrecognized")
LINE_TOO_LONG = _r(500, "5.5.2", "Command line too long")
EMPTY_COMMAND = _r(500, "5.5.2", "Empty command")
BARE_LINE_ENDING = _r(500, "5.5.2", "Line must end in <CR><LF>")
BAD_UTF8 = _r(500, "5.5.2", "Bad UTF-8 syntax")
NUL_IN_COMMAND = _r(501, "5.5.2", "NUL characters are not allowed in commands")
SYNTAX_ERROR = _r(501, "5.5.4", "Syntax error in parameters or arguments")
NO_ARGUMENTS_ALLOWED = _r(501, "5.5.4", "Syntax error (no parameters allowed)")
HELO_NEEDS_DOMAIN = _r(501, "5.5.4", "Syntax: EHLO hostname")
BAD_SENDER = _r(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = _r(501, "5.1.3", "Bad recipient address syntax")
BAD_SIZE = _r(501, "5.5.4", "Bad message size syntax")
BAD_BODY = _r(501, "5.5.4", "BODY can only be one of 7BIT, 8BITMIME")
DUPLICATE_PARAMETER = _r(501, "5.5.4", "Duplicate parameter")
BAD_PARAMETER = _r(501, "5.5.4", "Bad parameter value")
NOT_IMPLEMENTED = _r(502, "5.5.1", "Command not implemented")
HELO_FIRST = _r(503, "5.5.1", "Send HELO/EHLO first")
NESTED_MAIL = _r(503, "5.5.1", "Nested MAIL command")
NEED_MAIL = _r(503, "5.5.1", "Need MAIL command")
NEED_RCPT = _r(503, "5.5.1", "Need RCPT command")
TLS_ALREADY_ACTIVE = _r(503, "5.5.1", "TLS already active")
UNKNOWN_PARAMETER = _r(555, "5.5.4", "Unsupported option")
ALREADY_AUTHENTICATED = _r(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = _r(503, "5.5.1", "AUTH not permitted during a mail transaction")
AUTH_NEEDS_EHLO = _r(503, "5.5.1", "Send EHLO first")

# 5xx: AUTH (RFC 4954 §4, §6)
AUTH_MECHANISM_UNKNOWN = _r(504, "5.5.4", "Unrecognized authentication type")
AUTH_CANCELLED = _r(501, "5.7.0", "Authentication cancelled")
AUTH_BAD_BASE64 = _r(501, "5.5.2", "Cannot decode the response as base64")
AUTH_MALFORMED = _r(501, "5.5.2", "Malformed authentication response")
AUTH_LINE_TOO_LONG = _r(500, "5.5.6", "Authentication exchange line is too long")
AUTH_FAILED = _r(535, "5.7.8", "Authentication credentials invalid")
AUTH_NEEDS_TLS = _r(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_REQUIRED = _r(530, "5.7.0", "Authentication required")
TLS_REQUIRED = _r(530, "5.7.0", "Must issue a STARTTLS command first")
SENDER_NOT_OWNED = _r(553, "5.7.1", "Sender address not owned by the authenticated user")
BDAT_NOT_OFFERED = _r(521, "5.5.1", "CHUNKING is not offered, closing connection")
NOT_SMTP = _r(554, "5.7.0", "This is an SMTP server, closing connection")
PIPELINING_VIOLATION = _r(554, "5.5.0", "Protocol synchronization error, closing connection")

# 5xx: policy and content
NO_SUCH_USER = _r(550, "5.1.1", "No such user here")
RELAY_DENIED = _r(554, "5.7.1", "Relay access denied")
UTF8_SENDER_NEEDS_SMTPUTF8 = _r(550, "5.6.7", "Must declare SMTPUTF8 to send a UTF-8 address")
UTF8_RCPT_NEEDS_SMTPUTF8 = _r(553, "5.6.7", "Must declare SMTPUTF8 to send a UTF-8 address")
MESSAGE_TOO_BIG = _r(552, "5.3.4", "Message size exceeds fixed limit")
NO_VALID_RECIPIENTS = _r(554, "5.5.1", "No valid recipients")
BARE_LINE_ENDING_IN_DATA = _r(550, "5.5.2", "Bare <CR> or <LF> in message data, message refused")
MAIL_LOOP = _r(554, "5.4.6", "Too many Received: headers, mail loop suspected")


def queued(message_id: str) -> Reply:
    """The 250 after DATA, sent only once the message is committed to the spool."""
    return Reply(250, "2.0.0", f"Ok: queued as {message_id}")


def bad_parameter(keyword: str, reason: str) -> Reply:
    """501 5.5.4 naming the MAIL/RCPT parameter and what is wrong with its value."""
    return BAD_PARAMETER.with_text(f"Bad {keyword} parameter: {reason}")


def too_many_connections_from(client: str) -> Reply:
    """421 4.7.0 naming the client's address or network (Postfix: "too many connections
    from %s"), so an operator reading a client's log sees which limit it hit."""
    return TOO_MANY_CONNECTIONS_FROM.with_text(f"Too many connections from {client}")


def too_many_new_connections_from(client: str) -> Reply:
    """421 4.7.0 for the connection-rate limit."""
    return TOO_MANY_NEW_CONNECTIONS_FROM.with_text(
        f"Too many new connections from {client}, try again later"
    )


def auth_challenge(data: str) -> Reply:
    """`334 <base64>`: a SASL challenge (RFC 4954 §4); no enhanced code on a 3xx."""
    return Reply(334, "", data)


def greeting(hostname: str) -> Reply:
    return Reply(220, "", f"{hostname} ESMTP gsmtp")


def ehlo(hostname: str, client_name: str, extensions: list[str]) -> Reply:
    return Reply(250, "", "\n".join([f"{hostname} greets {client_name}", *extensions]))


def helo(hostname: str) -> Reply:
    return Reply(250, "", hostname)
