"""Where mail for a domain goes: MX lookup with dnspython (RFC 5321 §5.1, RFC 7505).

MX records by preference, shuffled among equal preferences; no MX → the domain itself
(implicit MX, when it has an address); null MX `0 .` → permanent failure, no connection;
NXDOMAIN → permanent; SERVFAIL and time-outs → temporary. Answers are cached within
their TTL. `nameservers` ("ip", port) pairs override the system resolver.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

MAX_MX_HOSTS = 5
_NEGATIVE_TTL = 60.0


class DnsPermanentError(Exception):
    """The domain cannot receive mail; carries the RFC 3463 status and a reply text."""

    def __init__(self, status: str, text: str) -> None:
        super().__init__(text)
        self.status = status


class DnsTemporaryError(Exception):
    """Try again later (SERVFAIL, time-out)."""


class Resolver(Protocol):
    def mail_hosts(self, domain: str) -> list[str]:
        """Host names to try, best first. Raises DnsPermanentError / DnsTemporaryError."""
        ...

    def addresses(self, host: str) -> list[str]:
        """IPv4 and IPv6 addresses of a host; [] if it has none."""
        ...


@dataclass(frozen=True, slots=True)
class MxRecord:
    preference: int
    host: str


def order_mx(records: Sequence[MxRecord], shuffle: Callable[[list[Any]], None]) -> list[str]:
    """Lowest preference first; equal preferences in random order (RFC 5321 §5.1)."""
    by_preference: dict[int, list[str]] = {}
    for record in records:
        by_preference.setdefault(record.preference, []).append(record.host)
    ordered: list[str] = []
    for preference in sorted(by_preference):
        hosts = by_preference[preference]
        shuffle(hosts)
        ordered += [h for h in hosts if h not in ordered]
    return ordered[:MAX_MX_HOSTS]


class DnsResolver:
    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]] = (),
        *,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        shuffle: Callable[[list[Any]], None] = random.shuffle,
    ) -> None:
        if nameservers:
            self._resolver = dns.resolver.Resolver(configure=False)
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers
            ]
        else:
            self._resolver = dns.resolver.Resolver()
        self._resolver.lifetime = timeout
        self._clock = clock
        self._shuffle = shuffle
        self._cache: dict[tuple[str, str], tuple[float, Any]] = {}

    def mail_hosts(self, domain: str) -> list[str]:
        answer = self._query(domain, "MX")
        if isinstance(answer, dns.resolver.NXDOMAIN):
            raise DnsPermanentError("5.1.2", f"550 5.1.2 Domain {domain} does not exist")
        if answer is None:
            # RFC 5321 §5.1: no MX at all → the domain itself, if it has an address.
            if self.addresses(domain):
                return [domain]
            raise DnsPermanentError("5.1.2", f"550 5.1.2 Domain {domain} has no MX and no address")
        records = [
            MxRecord(int(r.preference), r.exchange.to_text(omit_final_dot=True)) for r in answer
        ]
        if len(records) == 1 and records[0].host in ("", "."):
            raise DnsPermanentError(
                "5.1.10", f"556 5.1.10 Domain {domain} does not accept mail (null MX, RFC 7505)"
            )
        return order_mx([r for r in records if r.host not in ("", ".")], self._shuffle)

    def addresses(self, host: str) -> list[str]:
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = self._query(host, rdtype)
            except DnsTemporaryError:
                continue
            if answer is not None and not isinstance(answer, dns.resolver.NXDOMAIN):
                found += [record.to_text() for record in answer]
        return found

    def _query(self, name: str, rdtype: str) -> Any:
        """The rrset, None for no such record, an NXDOMAIN instance for no such name."""
        key = (name.lower(), rdtype)
        cached = self._cache.get(key)
        now = self._clock()
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            answer = self._resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN as error:
            self._cache[key] = (now + _NEGATIVE_TTL, error)
            return error
        except dns.resolver.NoAnswer:
            self._cache[key] = (now + _NEGATIVE_TTL, None)
            return None
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as error:
            raise DnsTemporaryError(f"DNS lookup of {name} {rdtype} failed: {error}") from None
        except dns.exception.DNSException as error:
            raise DnsTemporaryError(f"DNS lookup of {name} {rdtype} failed: {error}") from None
        rrset = answer.rrset
        self._cache[key] = (now + float(rrset.ttl if rrset is not None else 0), rrset)
        return rrset
