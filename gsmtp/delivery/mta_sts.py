"""MTA-STS (RFC 8461) for MX delivery: which MX hosts a domain allows, and that their
certificates must verify.

Discovery and caching, per domain (§3, §5.1): the `_mta-sts.<domain>` TXT record
("v=STSv1; id=…") is looked up through the MX lookup's own resolver; when there is no
cached policy, the cached one has expired (`max_age`), or the record's id differs from
the cached policy's, the policy is fetched from
`https://mta-sts.<domain>/.well-known/mta-sts.txt` with a certificate valid for that
name, no redirect followed, at most 64 KiB of text/plain, within a time limit. A policy
that cannot be fetched or parsed leaves the cached unexpired one in force (the RFC's
defence against an attacker who blocks the refresh); with none cached, mail goes as
without MTA-STS. A failed fetch is not retried for the same id for `retry_after`
seconds, so a broken endpoint costs one attempt per domain now and then, not one per
delivery. The cache lives in memory: a restart fetches again (see `MtaSts`).

What a policy means for delivery is one value, the shared `TlsRequirement`: `enforce`
→ VERIFY with the policy's MX patterns (only matching hosts, each verified for its own
name); `testing` → nothing, but what would have failed is logged
(`mta_sts_testing_failure`); `none` → nothing. No SMTP here; the only I/O is the HTTPS
GET in `HttpsFetcher`, which translates every low-level error into `FetchError`.
"""

from __future__ import annotations

import enum
import http.client
import io
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gsmtp.delivery.mx import DnsTemporaryError
from gsmtp.delivery.tls_client import handshake
from gsmtp.delivery.tls_levels import TlsLevel, TlsRequirement
from gsmtp.delivery.tls_policy import mx_allowed
from gsmtp.log import get_logger

MAX_POLICY_BYTES = 64 * 1024  # §3.2: "MUST NOT exceed 64 KiB"
MAX_AGE_LIMIT = 31_557_600  # §3.2: one year, the largest max_age honoured
FETCH_TIMEOUT = 10.0  # the whole HTTPS fetch: connect, handshake, request, body
RETRY_AFTER = 300.0  # a failed fetch is not tried again for the same id before this
POLICY_PATH = "/.well-known/mta-sts.txt"

# §3.1: id = 1*32(ALPHA / DIGIT); an extension name and value.
_TXT_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_TXT_EXTENSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}=[\x21-\x3a\x3c\x3e-\x7e]+")
# §3.2: a field name, and an MX pattern (a domain name, possibly "*." and a domain).
_FIELD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_MX_PATTERN = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})+")


class Mode(enum.Enum):
    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Policy:
    """A domain's policy: `id` is the TXT record's id it was fetched under."""

    id: str
    mode: Mode
    mx: tuple[str, ...]
    max_age: int  # seconds, at most MAX_AGE_LIMIT


class PolicyError(ValueError):
    """The policy text is not a valid STSv1 policy."""


class FetchError(Exception):
    """The policy could not be fetched (DNS, connection, certificate, HTTP, size)."""


def parse_txt(records: Sequence[str]) -> str | None:
    """The policy id from the `_mta-sts` TXT records, or None when there is no valid one.

    §3.1: records not starting with "v=STSv1;" are discarded; not exactly one left, or
    one that is malformed, means no policy is announced."""
    candidates = [r for r in records if r.startswith("v=STSv1;")]
    if len(candidates) != 1:
        return None
    fields = [f.strip(" \t") for f in candidates[0].split(";")]
    if fields[-1] == "":
        fields.pop()  # a trailing delimiter is allowed
    policy_id = None
    for field in fields[1:]:
        if field.startswith("id="):
            if policy_id is not None or not _TXT_ID.fullmatch(field[3:]):
                return None
            policy_id = field[3:]
        elif not _TXT_EXTENSION.fullmatch(field):
            return None
    return policy_id


def parse_policy(body: bytes, policy_id: str) -> Policy:
    """The policy in `body` (the HTTPS response), strictly (§3.2): `version: STSv1`,
    `mode`, `max_age` and, unless the mode is none, at least one `mx`. Lines end in LF
    or CRLF; unknown fields are ignored; a repeated field other than mx keeps its first
    value; max_age above one year is cut to one year. Raises PolicyError."""
    if len(body) > MAX_POLICY_BYTES:
        raise PolicyError(f"policy larger than {MAX_POLICY_BYTES} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("policy is not UTF-8") from None
    fields: dict[str, str] = {}
    mx: list[str] = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r").rstrip(" \t")
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not _FIELD_NAME.fullmatch(name):
            raise PolicyError(f"line {number} is not a 'name: value' field")
        value = value.lstrip(" \t")
        if name == "mx":
            pattern = value.lower().rstrip(".")
            if not _MX_PATTERN.fullmatch(pattern):
                raise PolicyError(f"bad mx pattern {value!r}")
            mx.append(pattern)
        else:
            fields.setdefault(name, value)
    if fields.get("version") != "STSv1":
        raise PolicyError(f"version is {fields.get('version')!r}, not 'STSv1'")
    try:
        mode = Mode(fields.get("mode", ""))
    except ValueError:
        raise PolicyError(f"mode {fields.get('mode')!r} is not enforce, testing or none") from None
    max_age = fields.get("max_age", "")
    if not (max_age.isascii() and max_age.isdigit() and len(max_age) <= 10):
        raise PolicyError(f"max_age {max_age!r} is not a number of seconds")
    if not mx and mode is not Mode.NONE:
        raise PolicyError("no mx pattern")
    return Policy(policy_id, mode, tuple(mx), min(int(max_age), MAX_AGE_LIMIT))


# -- fetching -------------------------------------------------------------------------


class AddressResolver(Protocol):
    def addresses(self, host: str) -> list[str]: ...


class HttpsFetcher:
    """GET https://mta-sts.<domain>:<port>/.well-known/mta-sts.txt. The name is resolved
    through `resolver` (the MX lookup's, so `delivery.nameservers` applies), each address
    tried in turn; the certificate must be valid for mta-sts.<domain> under `context`.
    The socket calls are gevent's under `serve` (monkey-patched), so the hub keeps
    serving during a fetch."""

    def __init__(
        self,
        resolver: AddressResolver,
        context: ssl.SSLContext,
        *,
        port: int = 443,
        timeout: float = FETCH_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resolver = resolver
        self._context = context
        self._port = port
        self._timeout = timeout
        self._clock = clock

    def fetch(self, domain: str) -> bytes:
        """The policy body; FetchError with the reason otherwise."""
        host = f"mta-sts.{domain}"
        try:
            addresses = self._resolver.addresses(host)
        except DnsTemporaryError as error:
            raise FetchError(str(error)) from None
        if not addresses:
            raise FetchError(f"{host} has no address")
        end = self._clock() + self._timeout
        reason = ""
        for address in addresses:
            try:
                return self._get(host, address, end)
            except TimeoutError:
                raise FetchError(f"{host}[{address}]: timed out") from None
            # ssl.SSLError is an OSError; a name the IDNA codec refuses, a ValueError.
            except (OSError, http.client.HTTPException, ValueError) as error:
                reason = f"{host}[{address}]: {error or type(error).__name__}"
        raise FetchError(reason)

    def _remaining(self, end: float) -> float:
        remaining = end - self._clock()
        if remaining <= 0:
            raise TimeoutError
        return remaining

    def _get(self, host: str, address: str, end: float) -> bytes:
        # One deadline for all of it: the connect, the handshake and every read are each
        # given what is left (a per-read timeout alone lets a trickling server hold the
        # fetch, the domain's lock and a delivery slot for as long as it likes).
        raw = socket.create_connection((address, self._port), timeout=self._remaining(end))
        with raw, handshake(raw, self._context, host, lambda: end - self._clock()) as sock:
            authority = host if self._port == 443 else f"{host}:{self._port}"
            sock.settimeout(self._remaining(end))
            sock.sendall(
                f"GET {POLICY_PATH} HTTP/1.1\r\nHost: {authority}\r\n"
                "User-Agent: gsmtp\r\nAccept: text/plain\r\nConnection: close\r\n\r\n".encode()
            )
            response = http.client.HTTPResponse(
                _DeadlineSocket(sock, lambda: self._remaining(end)),  # type: ignore[arg-type]
                method="GET",
            )
            response.begin()
            # §3.3: a redirect is not followed; only 200 carries a policy.
            if response.status != 200:
                raise FetchError(f"{host}: HTTP {response.status} {response.reason}")
            content_type = (response.getheader("Content-Type") or "").partition(";")[0]
            if content_type.strip().lower() != "text/plain":
                raise FetchError(f"{host}: content type {content_type!r}, not text/plain")
            body = b""
            while len(body) <= MAX_POLICY_BYTES:
                chunk = response.read1(MAX_POLICY_BYTES + 1 - len(body))
                if not chunk:
                    return body
                body += chunk
            raise FetchError(f"{host}: policy larger than {MAX_POLICY_BYTES} bytes")


class _DeadlineSocket:
    """What `http.client.HTTPResponse` reads from (it only calls `makefile`): each
    receive is given the time left before the fetch's deadline (`remaining` raises
    TimeoutError once it has passed), so the status line, headers and body together
    fit in it however slowly the server sends them."""

    def __init__(self, sock: socket.socket, remaining: Callable[[], float]) -> None:
        self._sock = sock
        self._remaining = remaining

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._remaining))


class _DeadlineReader(io.RawIOBase):
    def __init__(self, sock: socket.socket, remaining: Callable[[], float]) -> None:
        self._sock = sock
        self._remaining = remaining

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self._sock.settimeout(self._remaining())
        return self._sock.recv_into(buffer)


# -- the per-domain cache and what a policy demands -----------------------------------


class TxtResolver(Protocol):
    def txt(self, name: str) -> list[str]:
        """The TXT records at `name`, each record's strings joined; [] if none.
        Raises DnsTemporaryError."""
        ...


@dataclass(slots=True)
class _Cached:
    policy: Policy
    expires: float


class MtaSts:
    """Each domain's current policy (see the module docstring), and what it demands.

    `fetch(domain)` returns the policy body or raises FetchError (`HttpsFetcher.fetch`).
    `clock` is monotonic seconds. The cache is in memory, at most one policy per domain
    that was sent to: a restart loses it and the next delivery fetches again; an attacker
    who could block that one fetch could have blocked the first ever too (RFC 8461 §10.2),
    so a persistent cache would narrow, not close, that window."""

    def __init__(
        self,
        resolver: TxtResolver,
        fetch: Callable[[str], bytes],
        *,
        clock: Callable[[], float] = time.monotonic,
        retry_after: float = RETRY_AFTER,
    ) -> None:
        self._resolver = resolver
        self._fetch = fetch
        self._clock = clock
        self._retry_after = retry_after
        self._cache: dict[str, _Cached] = {}
        self._failed: dict[str, tuple[str, float]] = {}  # domain → (id, until)
        # One fetch per domain at a time (gevent's lock under `serve`'s monkey-patching).
        self._locks: dict[str, threading.Lock] = {}
        self._log = get_logger(component="mta_sts")

    def policy(self, domain: str) -> Policy | None:
        """The policy in force for `domain`, or None (§5.1). Deliveries to one domain
        running at once share one fetch: the others wait for it and take its result."""
        domain = domain.lower().rstrip(".")
        current = self._cached(domain)
        try:
            announced = parse_txt(self._resolver.txt(f"_mta-sts.{domain}"))
        except DnsTemporaryError as error:
            self._log.info("mta_sts_lookup_failed", domain=domain, reason=str(error))
            return current
        if announced is None or (current is not None and current.id == announced):
            return current  # §3.1: no TXT record does not cancel a cached policy
        with self._locks.setdefault(domain, threading.Lock()):
            current = self._cached(domain)  # what a fetch we waited for brought
            if current is not None and current.id == announced:
                return current
            return self._refresh(domain, announced, current)

    def _cached(self, domain: str) -> Policy | None:
        cached = self._cache.get(domain)
        if cached is not None and cached.expires <= self._clock():
            del self._cache[domain]
            cached = None
        return cached.policy if cached is not None else None

    def _refresh(self, domain: str, announced: str, current: Policy | None) -> Policy | None:
        """Fetch the policy announced with id `announced`; `current` if that fails."""
        now = self._clock()
        failed = self._failed.get(domain)
        if failed is not None and failed[0] == announced and failed[1] > now:
            return current
        try:
            policy = parse_policy(self._fetch(domain), announced)
        except (FetchError, PolicyError) as error:
            self._failed[domain] = (announced, now + self._retry_after)
            self._log.warning(
                "mta_sts_fetch_failed",
                domain=domain,
                id=announced,
                reason=str(error),
                cached_id=current.id if current is not None else None,
            )
            return current
        self._failed.pop(domain, None)
        self._cache[domain] = _Cached(policy, now + policy.max_age)
        self._log.info(
            "mta_sts_policy_fetched",
            domain=domain,
            id=policy.id,
            mode=policy.mode.value,
            mx=list(policy.mx),
            max_age=policy.max_age,
        )
        return policy

    def requirement(self, domain: str, mx_hosts: Sequence[str] = ()) -> TlsRequirement | None:
        """What the policy demands of a delivery to `domain` (a `tls_policy` source):
        enforce → VERIFY limited to the policy's MX patterns; testing → a `report_only`
        requirement that demands nothing (NONE never wins over another level) but has the
        deliverer log an MX without STARTTLS or a certificate `verify` would refuse, after
        logging the MX hosts among `mx_hosts` that enforce would have refused; none, or
        no policy → None."""
        policy = self.policy(domain)
        if policy is None or policy.mode is Mode.NONE:
            return None
        if policy.mode is Mode.ENFORCE:
            return TlsRequirement(TlsLevel.VERIFY, source="mta-sts", mx_patterns=policy.mx)
        self._report(domain, policy, mx_hosts)
        return TlsRequirement(TlsLevel.NONE, source="mta-sts testing", report_only=True)

    def observe(self, domain: str, mx_hosts: Sequence[str]) -> None:
        """The MX hosts a delivery is about to use: a testing-mode policy (as cached by
        the `requirement` just asked) logs those it would refuse."""
        policy = self._cached(domain.lower().rstrip("."))
        if policy is not None and policy.mode is Mode.TESTING:
            self._report(domain, policy, mx_hosts)

    def _report(self, domain: str, policy: Policy, mx_hosts: Sequence[str]) -> None:
        if not mx_hosts:
            return
        refused = [host for host in mx_hosts if not mx_allowed(host, policy.mx)]
        if refused:
            self.testing_failure(
                domain,
                "MX hosts not matching the policy"
                if len(refused) < len(mx_hosts)
                else "no MX host matches the policy",
                hosts=refused,
            )
        return None

    def testing_failure(self, domain: str, what: str, **details: object) -> None:
        """Log what a testing-mode policy would have refused (§5: report, deliver)."""
        self._log.warning("mta_sts_testing_failure", domain=domain, failure=what, **details)
