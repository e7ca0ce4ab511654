"""DKIM signing (RFC 6376; Ed25519 by RFC 8463): the keys, which key signs a message,
and the DKIM-Signature header it gets.

No sockets and no spool. A body comes in as chunks: a large one, already in the spool
in parts, is fed part by part by the caller (`PartSource`, on the spool's reader
thread), so it is never held whole; only the header block is kept (at most
MAX_HEADER_BYTES). Time comes from an injected clock; the signing itself runs through
`run_blocking` (a thread: the event loop keeps serving meanwhile).

Header selection and canonicalisation are dkimpy's; the signature's folding is ours. The
private-key operation is `cryptography`'s (OpenSSL): ~0.3 ms for RSA-2048, with the GIL
released, where dkimpy's pure-Python RSA takes ~7 ms holding the GIL, which a thread
would not keep off the event loop. The verifiers in the tests (Mail::DKIM, dkimpy) check
the result.

Which key: the one whose domain equals the From: domain, else the envelope sender's
(exact match: a subdomain needs its own entry). A domain may have several keys (RSA and
Ed25519, RFC 8463 §4): the message is signed once with each. Relaxed/relaxed, rsa-sha256
or ed25519-sha256, From oversigned (a second From: added later breaks the signature).
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import os
import re
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import idna
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from dkim import MessageFormatError, hash_headers, rfc822_parse
from dkim.canonicalization import CanonicalizationPolicy

from gsmtp import metrics
from gsmtp.config import DkimConfig
from gsmtp.log import get_logger, printable
from gsmtp.message import MessageId

T = TypeVar("T")

# RFC 6376 §5.4.1's list, less what is rarely there; From counted twice (oversigned).
SIGNED_HEADERS = (
    b"from",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"mime-version",
    b"content-type",
    b"reply-to",
    b"in-reply-to",
    b"references",
)
OVERSIGNED = (b"from",)
# The header block is kept in memory to be signed; past this the message is not signed.
MAX_HEADER_BYTES = 1024 * 1024
RSA_BITS = 2048
_CANONICALIZATION = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
_HEADER_NAME = b"DKIM-Signature"
_CRLF = b"\r\n"
# RFC 5322 §2.1.1: a line SHOULD be at most 78 characters (CRLF excluded).
FOLD_WIDTH = 78
_BASE64_PIECE = 64  # b= is cut into pieces this long, each may start a line
_WSP = b" \t"

# Feeds a large body's parts, in order, to the consumer, and stops when it returns
# False; returns False itself if a part is missing.
PartSource = Callable[[Callable[[bytes], bool]], bool]
RunBlocking = Callable[[Callable[[], Any]], Any]


class DkimKeyError(Exception):
    """A key that cannot be used; the message names the file."""


@dataclass(frozen=True, slots=True)
class DkimKey:
    domain: str
    selector: str
    algorithm: bytes  # b"rsa-sha256" or b"ed25519-sha256"
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    path: str

    def sign(self, digest: bytes) -> bytes:
        """The signature of a SHA-256 digest (RFC 8463 §3: Ed25519 signs the digest)."""
        if isinstance(self.private, rsa.RSAPrivateKey):
            return self.private.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        return self.private.sign(digest)


def load_key(domain: str, selector: str, path: str) -> DkimKey:
    """Read a PEM private key (RSA of 1024 bits or more, or Ed25519). Refuses a file
    that others may read or write (any "other" bit): whoever can read it can sign as
    the domain. Group access stays allowed (root:gsmtp 0640 is the usual setup)."""
    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            data = handle.read()
    except OSError as error:
        raise DkimKeyError(f"{path}: cannot read the key: {error.strerror}") from None
    if mode & 0o007:
        raise DkimKeyError(
            f"{path}: mode {stat.S_IMODE(mode):04o} lets every user read the DKIM private "
            "key; it must not be readable by others (chmod 600, or 640 with the group gsmtp)"
        )
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise DkimKeyError(f"{path}: the key is encrypted; gsmtp needs it unencrypted") from None
    except ValueError as error:
        raise DkimKeyError(f"{path}: not a PEM private key ({error})") from None
    if isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < 1024:
            # RFC 8301 §3.2: verifiers must not accept keys under 1024 bits.
            raise DkimKeyError(f"{path}: RSA key of {private.key_size} bits; 1024 at least")
        return DkimKey(domain, selector, b"rsa-sha256", private, path)
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return DkimKey(domain, selector, b"ed25519-sha256", private, path)
    raise DkimKeyError(f"{path}: a {type(private).__name__}; DKIM keys are RSA or Ed25519")


def generate_key(kind: str) -> bytes:
    """A new private key as unencrypted PKCS#8 PEM: "rsa" (RSA_BITS) or "ed25519"."""
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if kind == "rsa":
        private = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    elif kind == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"unknown key type {kind!r}")
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_record(key: DkimKey) -> str:
    """The TXT record's text (RFC 6376 §3.6.1; RFC 8463 §4.2: the raw Ed25519 key)."""
    public = key.private.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        der = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"


def zone_line(key: DkimKey) -> str:
    """The record as a zone file line, split into strings of at most 255 bytes (RFC 1035
    §3.3: a TXT string is one length octet; a resolver joins them, RFC 6376 §3.6.2.2)."""
    text = public_record(key)
    strings = " ".join(f'"{text[i : i + 255]}"' for i in range(0, len(text), 255))
    return f"{key.selector}._domainkey.{key.domain}. IN TXT ( {strings} )"


def normal_domain(domain: str) -> str:
    """Lower case, no trailing dot, A-labels (a UTF-8 From: domain matches its key)."""
    domain = domain.strip().rstrip(".").lower()
    if domain.isascii():
        return domain
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError:
        return domain


def _direct(work: Callable[[], T]) -> T:
    return work()


class DkimSigner:
    """The keys of [dkim], by domain, and the signing of messages with them. Built whole
    from the configuration (`from_config`); a reload builds a new one and the
    composition root swaps it in, so a message is signed with one consistent set."""

    def __init__(
        self,
        keys: Sequence[DkimKey] = (),
        *,
        hostname: str = "",
        run_blocking: RunBlocking = _direct,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys: dict[str, list[DkimKey]] = {}
        for key in keys:
            self._keys.setdefault(normal_domain(key.domain), []).append(key)
        self._hostname = normal_domain(hostname)
        self._run_blocking = run_blocking
        self._clock = clock
        self._log = get_logger(component="dkim")

    @classmethod
    def from_config(
        cls,
        config: DkimConfig,
        *,
        hostname: str,
        run_blocking: RunBlocking = _direct,
        clock: Callable[[], float] = time.time,
    ) -> DkimSigner:
        """Every key loaded, or DkimKeyError naming the first file that failed."""
        keys = [load_key(k.domain, k.selector, k.key) for k in config.keys]
        return cls(keys, hostname=hostname, run_blocking=run_blocking, clock=clock)

    @property
    def active(self) -> bool:
        """Any key configured (else nothing is signed, nor counted)."""
        return bool(self._keys)

    def keys_for(self, domain: str) -> list[DkimKey]:
        return self._keys.get(normal_domain(domain), [])

    def sign_message(
        self,
        *,
        msg_id: MessageId,
        sender: str,
        content: bytes,
        parts: PartSource | None = None,
    ) -> bytes:
        """The DKIM-Signature header(s) for a message from a trusted network or an
        authenticated session, b"" if it is not signed. `parts`: the body's start, in the
        spool (hashed as it is read; `content` is then the rest). Failures are counted
        and logged; the message is then accepted unsigned."""
        if not self._keys:
            return b""
        sender_domain = sender.rpartition("@")[2] if "@" in sender else ""

        def choose(from_domain: str) -> list[DkimKey]:
            return self.keys_for(from_domain) or self.keys_for(sender_domain)

        return self._sign(msg_id, _Signing(choose), content, parts)

    def sign_notice(self, content: bytes, msg_id: MessageId) -> bytes:
        """The DKIM-Signature header(s) for a notice of ours (From: MAILER-DAEMON@
        hostname): the hostname's key, else its nearest parent domain's."""
        if not self._keys:
            return b""
        labels = self._hostname.split(".")
        candidates = [".".join(labels[i:]) for i in range(len(labels) - 1)]

        def choose(from_domain: str) -> list[DkimKey]:
            for domain in candidates:
                if self._keys.get(domain):
                    return self._keys[domain]
            return []

        return self._sign(msg_id, _Signing(choose), content, None)

    def _sign(
        self, msg_id: MessageId, signing: _Signing, content: bytes, parts: PartSource | None
    ) -> bytes:
        now = self._clock()
        result: bytes | str
        if parts is not None and not parts(signing.feed):
            result = "a body part is missing from the spool"
        else:
            result = self._run_blocking(lambda: signing.finish(content, now))
        if isinstance(result, bytes) and result:
            metrics.DKIM_SIGNATURES.labels("signed").inc()
            self._log.info("dkim_signed", msg_id=msg_id, d=signing.domain, s=signing.selectors)
            return result
        if isinstance(result, bytes):
            metrics.DKIM_SIGNATURES.labels("no_key").inc()
            return b""
        metrics.DKIM_SIGNATURES.labels("error").inc()
        self._log.warning("dkim_not_signed", msg_id=msg_id, reason=printable(result))
        return b""


class _Signing:
    """One message on its way through the signer: the header block kept, the body
    canonicalised and hashed as it comes (sans I/O; fed on one thread at a time)."""

    def __init__(self, choose: Callable[[str], list[DkimKey]]) -> None:
        self._choose = choose
        self._head = bytearray()
        self._in_head = True
        self._headers: list[Any] = []
        self._keys: list[DkimKey] = []
        self._body = RelaxedBodyHash()
        self._failure = ""
        self.domain = ""
        self.selectors = ""

    def feed(self, data: bytes) -> bool:
        """Take the next piece of the message; False once the rest is not needed (no key
        for it, or it cannot be signed)."""
        try:
            return self._feed(data)
        except Exception as error:  # a bug here must not refuse the mail: not signed
            self._failure = f"{type(error).__name__}: {error}"
            return False

    def finish(self, rest: bytes, now: float) -> bytes | str:
        """The DKIM-Signature header(s); b"" when no key applies; a str says why the
        message cannot be signed."""
        try:
            return self._finish(rest, now)
        except Exception as error:  # as in feed: a failed key operation, say
            return f"{type(error).__name__}: {error}"

    def _feed(self, data: bytes) -> bool:
        if self._failure:
            return False
        if self._in_head:
            start = max(0, len(self._head) - 3)
            self._head += data
            if self._head.startswith(b"\r\n"):
                end, skip = 0, 2  # no header fields at all
            else:
                end = self._head.find(b"\r\n\r\n", start)
                skip = 4
            if (end if end >= 0 else len(self._head)) > MAX_HEADER_BYTES:
                self._failure = f"header block larger than {MAX_HEADER_BYTES} bytes"
                return False
            if end < 0:
                return True
            rest = bytes(self._head[end + skip :])
            del self._head[end + 2 :]
            if not self._end_of_head():
                return False
            data = rest
        if self._keys:
            self._body.update(data)
        return bool(self._keys)

    def _end_of_head(self) -> bool:
        self._in_head = False
        try:
            self._headers = rfc822_parse(bytes(self._head))[0]
        except (MessageFormatError, IndexError) as error:
            self._failure = f"header block does not parse: {error}"
            return False
        self._keys = self._choose(_from_domain(self._headers))
        return bool(self._keys)

    def _finish(self, rest: bytes, now: float) -> bytes | str:
        self._feed(rest)
        if self._in_head and not self._failure:
            self._end_of_head()  # headers only, no body
        if self._failure:
            return self._failure
        if not self._keys:
            return b""
        body_hash = base64.b64encode(self._body.digest())
        include = [name.lower() for name, _ in self._headers if name.lower() in SIGNED_HEADERS]
        if b"from" not in include:
            return "no From: header field"  # RFC 6376 §5.4: From must be signed
        include += [name for name in OVERSIGNED if name in include]
        self.domain = self._keys[0].domain
        self.selectors = ",".join(key.selector for key in self._keys)
        return b"".join(
            _signature(key, self._headers, tuple(include), body_hash, now) for key in self._keys
        )


def _signature(
    key: DkimKey,
    headers: list[Any],
    include: tuple[bytes, ...],
    body_hash: bytes,
    now: float,
) -> bytes:
    """One DKIM-Signature header field, CRLF-terminated (as dkimpy's DKIM.sign builds
    it: b= is hashed empty, then filled in). Relaxed header canonicalization unfolds the
    field before hashing it, so where the empty and the filled-in field are folded does
    not matter."""
    fields = [
        (b"v", b"1"),
        (b"a", key.algorithm),
        (b"c", _CANONICALIZATION.to_c_value()),
        (b"d", key.domain.encode("ascii")),
        (b"s", key.selector.encode("ascii")),
        (b"t", str(int(now)).encode("ascii")),
        (b"h", b" : ".join(include)),
        (b"bh", body_hash),
        (b"b", b""),
    ]
    unsigned = (_HEADER_NAME, _field(fields)[len(_HEADER_NAME) + 1 : -len(_CRLF)])
    hasher = hashlib.sha256()
    canonical = _CANONICALIZATION.canonicalize_headers(headers)
    hash_headers(hasher, _CANONICALIZATION, canonical, include, unsigned, dict(fields))
    fields[-1] = (b"b", base64.b64encode(key.sign(hasher.digest())))
    return _field(fields)


def _field(fields: list[tuple[bytes, bytes]]) -> bytes:
    """The DKIM-Signature field with these tags, folded to lines of at most FOLD_WIDTH
    characters where the tags allow it, and CRLF-terminated. A line is broken only where
    whitespace may stand: between tags, at the spaces around h='s colons, and inside b=
    (base64, whose whitespace a verifier ignores: RFC 6376 §3.5). Any other tag is never
    cut, however long (a line of its own): a verifier looks the key up under d= and s= as
    written. dkimpy's `fold`, used before, cut words at 72 characters: a 70-character
    domain or selector got a space inside and no verifier found its key; and folded with
    its CRLF, it parted CR from LF for RSA keys of 2089-2112 bits and two other ranges
    (a bare CR; once repaired for sending, an empty line that ended the header section).
    Both red-team findings."""
    words: list[bytes] = []
    for index, (tag, value) in enumerate(fields):
        if tag == b"h":
            pieces = value.split(b" ")
        elif tag == b"b" and value:
            pieces = [value[at : at + _BASE64_PIECE] for at in range(0, len(value), _BASE64_PIECE)]
        else:
            pieces = [value]
        pieces[0] = tag + b"=" + pieces[0]
        if index < len(fields) - 1:
            pieces[-1] += b";"
        words += pieces
    lines: list[bytes] = []
    line = _HEADER_NAME + b":"
    for word in words:
        if len(line) + 1 + len(word) > FOLD_WIDTH and line.strip() != _HEADER_NAME + b":":
            lines.append(line)
            line = b""
        line += b" " + word
    lines.append(line)
    return _CRLF.join(lines) + _CRLF


def _from_domain(headers: list[Any]) -> str:
    """The domain of the first address of the first From: field ("" if none)."""
    for name, value in headers:
        if name.lower() == b"from":
            text = re.sub(r"\r?\n", "", bytes(value).decode("utf-8", "replace"))
            for _, address in email.utils.getaddresses([text]):
                if "@" in address:
                    return address.rpartition("@")[2]
            return ""
    return ""


class RelaxedBodyHash:
    """SHA-256 of a body in RFC 6376 §3.4.4 relaxed canonical form, fed in chunks of
    any size, cut anywhere: whitespace runs become one space, whitespace at line ends
    goes, empty lines at the end go (held back until a line with content follows),
    and a last line without CRLF gets one. Only the unfinished end of a line is
    kept between chunks, at most TAIL_LIMIT of it."""

    TAIL_LIMIT = 64 * 1024
    # Work is done in slices of this much: the event loop's thread never waits long for
    # the GIL.
    SLICE = 64 * 1024

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._tail = b""  # the unfinished line's end not yet canonicalised
        self._empty_lines = 0  # held back: they count only if content follows
        self._mid_line = False  # part of the current line was hashed already

    def update(self, data: bytes) -> None:
        for start in range(0, len(data), self.SLICE):
            self._update(data[start : start + self.SLICE])

    def _update(self, data: bytes) -> None:
        data = self._tail + data
        cut = data.rfind(b"\r\n") + 2
        if cut >= 2:
            self._lines(data[:cut])
            data = data[cut:]
        if len(data) > self.TAIL_LIMIT:
            # A very long line: hash it up to its last character that cannot be
            # changed by what follows (not whitespace, not a CR that may start CRLF).
            end = len(data) - 1 if data.endswith(b"\r") else len(data)
            keep = len(data) - len(data[:end].rstrip(_WSP))
            if keep < len(data):
                self._emit(_compress(data[: len(data) - keep]))
                self._mid_line = True
            # What is kept is whitespace (and a CR): one space stands for a run of it.
            data = _compress(data[len(data) - keep :])
        self._tail = data

    def _lines(self, lines: bytes) -> None:
        """Whole lines (the first may continue one begun earlier)."""
        canonical = _canonical_lines(lines)
        end = len(canonical)
        empty = 0
        while end >= 2:
            start = end - 2  # the last line is just CRLF: is it empty?
            if (start == 0 and not self._mid_line) or (
                start >= 2 and canonical[start - 2 : start] == b"\r\n"
            ):
                empty += 1
                end = start
            else:
                break
        if end:
            self._emit(canonical[:end])
            self._empty_lines = empty
        else:
            self._empty_lines += empty
        self._mid_line = False

    def _emit(self, content: bytes) -> None:
        if self._empty_lines:
            self._hash.update(b"\r\n" * self._empty_lines)
            self._empty_lines = 0
        self._hash.update(content)

    def digest(self) -> bytes:
        """The hash, once the whole body was fed (an unfinished last line gets its CRLF,
        as dkimpy does; SMTP content always ends with one)."""
        if self._tail or self._mid_line:
            tail = _compress(self._tail)
            self._tail = b""
            if tail or self._mid_line:
                self._emit(tail + b"\r\n")
                self._mid_line = False
        return self._hash.digest()


def _compress(data: bytes) -> bytes:
    """Each run of whitespace as one space (RFC 6376 §3.4.4). Plain replaces, each
    halving the runs left: ten times faster than a regular expression on text."""
    data = data.replace(b"\t", b" ")
    while b"  " in data:
        data = data.replace(b"  ", b" ")
    return data


def _canonical_lines(block: bytes) -> bytes:
    """Whole lines in relaxed form: runs of whitespace as one space, then none at line
    ends (the same as dkimpy's strip-then-compress, in fewer passes)."""
    return _compress(block).replace(b" \r\n", b"\r\n")
