"""RFC 5321 paths: parse `<local@domain>` into a validated, normalised Address.

No I/O. Domains are normalised to A-labels by IDNA2008 with the UTS #46 mapping (the
`idna` package, pure Python; Python's own "idna" codec is IDNA2003, which turns
`faß.example` into another domain, `fass.example`). Accepts quoted local-parts, address
literals ([1.2.3.4], [IPv6:...]), source routes (ignored, RFC 5321 §3.6.1), the null path
`<>` (MAIL only) and UTF-8 (only when the transaction declared SMTPUTF8, RFC 6531).
Anything else is a value, `AddressError`, carrying the reply to send; nothing here raises
on bad input.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass

import idna

# RFC 5321 §4.5.3.1: size limits.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\x80-\U0010ffff]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
_QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\U0010ffff]|\\[\x20-\x7e])*"\Z')
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_ROUTE = re.compile(r"@[^,:]+(?:,@[^,:]+)*:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def has_control(text: str) -> bool:
    """True if `text` holds a C0 control character or DEL (CR and LF among them). No
    path `parse_path` accepts has one, so a stored address with one was written from
    outside; written into a header field (Return-Path:, a notice) it would inject more."""
    return _CONTROL.search(text) is not None


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox; `local` keeps its form as sent (quotes removed), `domain` is normalised
    (lower case, no trailing dot, A-labels). The null sender is `Address("", "")`."""

    local: str
    domain: str

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain

    @property
    def needs_smtputf8(self) -> bool:
        return not (self.local.isascii() and self.domain.isascii())

    def __str__(self) -> str:
        if self.is_null:
            return ""
        return f"{quote_local_part(self.local)}@{self.domain}"

    def bracketed(self) -> str:
        return f"<{self}>"


NULL_ADDRESS = Address("", "")


@dataclass(frozen=True, slots=True)
class AddressError:
    """Why a path was refused, in words fit for a 501 reply."""

    reason: str


def quote_local_part(local: str) -> str:
    """The local-part as it must appear on the wire (RFC 5321 §4.1.2)."""
    if _DOT_STRING.match(local):
        return local
    escaped = local.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def parse_path(text: str, *, allow_null: bool, allow_utf8: bool) -> Address | AddressError:
    """Parse a reverse-path or forward-path (the text after `FROM:` / `TO:`, parameters
    already removed). Brackets may be omitted, as Postfix and most clients allow."""
    text = text.strip()
    if text.startswith("<"):
        if not text.endswith(">") or len(text) < 2:
            return AddressError("missing closing '>'")
        inner = text[1:-1]
    else:
        inner = text
    if len(inner) > MAX_PATH:
        return AddressError("path too long")
    if not inner:
        return NULL_ADDRESS if allow_null else AddressError("empty address")
    route = _ROUTE.match(inner)
    if route:
        inner = inner[route.end() :]
    if not allow_utf8 and not inner.isascii():
        return AddressError("UTF-8 address without SMTPUTF8")
    local, sep, domain = _split_mailbox(inner)
    if not sep:
        return AddressError("address needs a domain")
    local_or_error = _parse_local_part(local)
    if isinstance(local_or_error, AddressError):
        return local_or_error
    domain_or_error = parse_domain(domain)
    if isinstance(domain_or_error, AddressError):
        return domain_or_error
    address = Address(local_or_error, domain_or_error)
    # The limit holds for the path as it goes on the wire: a UTF-8 domain becomes longer
    # as A-labels (found by the fuzzer: accepted here, refused when read back).
    if len(str(address)) > MAX_PATH:
        return AddressError("path too long")
    return address


def _split_mailbox(inner: str) -> tuple[str, str, str]:
    """Split at the '@' that ends the local-part; an '@' inside quotes does not count."""
    if inner.startswith('"'):
        index = 1
        while index < len(inner):
            char = inner[index]
            if char == "\\":
                index += 2
                continue
            if char == '"':
                break
            index += 1
        rest = inner[index + 1 :]
        if not rest.startswith("@"):
            return inner, "", ""
        return inner[: index + 1], "@", rest[1:]
    return inner.rpartition("@") if "@" in inner else (inner, "", "")


def _parse_local_part(local: str) -> str | AddressError:
    if local.startswith('"'):
        if not _QUOTED_STRING.match(local):
            return AddressError("bad quoted local-part")
        value = re.sub(r"\\(.)", r"\1", local[1:-1])
    else:
        if not _DOT_STRING.match(local):
            return AddressError("bad local-part")
        value = local
    if not value:
        return AddressError("empty local-part")
    if len(value.encode("utf-8")) > MAX_LOCAL_PART:
        return AddressError("local-part too long")
    if any(unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp") for char in value):
        return AddressError("control character in local-part")
    return value


def parse_domain(domain: str) -> str | AddressError:
    """Validate and normalise a domain or an address literal (RFC 5321 §4.1.3)."""
    if domain.startswith("["):
        return _parse_literal(domain)
    if domain.endswith("."):
        domain = domain[:-1]
    if not domain or len(domain) > MAX_DOMAIN:
        return AddressError("bad domain length")
    if not domain.isascii():
        domain_or_error = to_a_labels(domain)
        if isinstance(domain_or_error, AddressError):
            return domain_or_error
        domain = domain_or_error
        if len(domain) > MAX_DOMAIN:
            return AddressError("bad domain length")
    labels = domain.split(".")
    if not all(_LABEL.match(label) for label in labels):
        return AddressError("bad domain syntax")
    if any(label.lower().startswith("xn--") and not _valid_a_label(label) for label in labels):
        return AddressError("bad IDNA label")
    return domain.lower()


def to_a_labels(domain: str) -> str | AddressError:
    """A U-label domain in its ASCII form: UTS #46 mapping (non-transitional, so `ß`
    stays `ß`: `faß.example` → `xn--fa-hia.example`), then IDNA2008 (RFC 5891)."""
    try:
        return idna.encode(domain, uts46=True, transitional=False).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return AddressError("bad internationalised domain")


def _valid_a_label(label: str) -> bool:
    """An `xn--` label must decode to a valid IDNA2008 U-label (RFC 5891 §5.4)."""
    try:
        idna.decode(label)
    except (idna.IDNAError, UnicodeError):
        return False
    return True


def _parse_literal(literal: str) -> str | AddressError:
    if not literal.endswith("]"):
        return AddressError("bad address literal")
    body = literal[1:-1]
    try:
        if body[:5].lower() == "ipv6:":
            return f"[IPv6:{ipaddress.IPv6Address(body[5:]).compressed}]"
        return f"[{ipaddress.IPv4Address(body)}]"
    except ValueError:
        return AddressError("bad address literal")


def normalise_mailbox(address: Address) -> str:
    """The key under which a local mailbox is stored and looked up: NFKC, case-folded
    local-part (gsmtp's documented rule: local-parts of local users are
    case-insensitive), normalised domain."""
    local = unicodedata.normalize("NFKC", address.local).casefold()
    return f"{local}@{address.domain}"
