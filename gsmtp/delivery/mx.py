"""Where mail for a domain goes: MX lookup with dnspython (RFC 5321 §5.1, RFC 7505), and
the list of addresses one attempt may try.

MX records by preference, shuffled among equal preferences; no MX → the domain itself
(implicit MX, when it has an address); null MX `0 .` → permanent failure, no connection;
NXDOMAIN → permanent; SERVFAIL and time-outs → temporary. Answers are cached within
their TTL. `nameservers` ("ip", port) pairs override the system resolver.

`mail_targets` turns the host list into at most MAX_MX_ADDRESSES (address, port) pairs
and cuts it at the first host that is this server (one of our own listeners), as
Postfix's smtp_addr.c does: a best MX that is us means "mail loops back to myself"; a
backup MX that is us means only the better ones are tried. Other loopback and private
addresses stay allowed: internal relays (and the tests) live there.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

MAX_MX_HOSTS = 5
# Addresses tried in one attempt over all MX hosts together (Postfix: smtp_mx_address_limit).
MAX_MX_ADDRESSES = 10
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

    def txt(self, name: str) -> list[str]:
        """The TXT records at `name`, each record's strings joined into one (RFC 8461
        §3.1, RFC 7208 §3.3); [] when there are none. Raises DnsTemporaryError."""
        answer = self._query(name, "TXT")
        if answer is None or isinstance(answer, dns.resolver.NXDOMAIN):
            return []
        return [b"".join(record.strings).decode("utf-8", "replace") for record in answer]

    def _query(self, name: str, rdtype: str) -> Any:
        """The rrset, None for no such record, an NXDOMAIN instance for no such name."""
        key = (name.lower(), rdtype)
        cached = self._cache.get(key)
        now = self._clock()
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            # IDNA2008 + UTS #46, like the address parser (dnspython's IDNA2003 would
            # look up `fass.example` for `faß.example`); A-labels pass through unchanged.
            qname = dns.name.from_text(name, idna_codec=dns.name.IDNA_2008_Practical)
            answer = self._resolver.resolve(qname, rdtype, search=False)
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


# -- the addresses one attempt tries -------------------------------------------------------

_IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Target:
    """One address to try: `host` is the MX name (for replies and Remote-MTA)."""

    host: str
    address: str
    port: int


@dataclass(frozen=True, slots=True)
class Targets:
    """What one attempt may try, best first. `loops_back`: the list was cut at a host that
    is this server, so an empty list means the mail would loop back to us."""

    addresses: tuple[Target, ...]
    loops_back: bool = False


def is_ip(host: str) -> bool:
    return _parse_ip(host) is not None


def _parse_ip(text: str) -> _IpAddress | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_local_address(address: _IpAddress) -> bool:
    """True if `address` belongs to this machine. Loopback always does. For the rest the
    kernel's routing table says: a UDP socket "connected" to one of our own addresses
    (no packet is sent) takes that same address as its source, because the kernel routes
    it through its `local` table. Unlike a bind test, this is not fooled by
    net.ipv4.ip_nonlocal_bind (set on many load-balanced hosts), which lets any address be
    bound and would make every MX look like ourselves."""
    if address.is_loopback:
        return True
    if address.is_unspecified or address.is_multicast:
        return False
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((str(address), 9))
            source = probe.getsockname()[0]
    except OSError:  # no route, a link-local address without a scope: not ours
        return False
    return _parse_ip(source) == address


class OwnListeners:
    """The (address, port) pairs this server accepts SMTP on, to recognise an MX that is
    ourselves. A wildcard listener (0.0.0.0, or :: which on Linux also takes IPv4) stands
    for every local address; a listener on one address only for that address — so an MX on
    127.0.0.2 is not us when we listen on 127.0.0.1 only. Listener host names are resolved
    once, here."""

    def __init__(
        self,
        listeners: Sequence[tuple[str, int]] = (),
        *,
        is_local: Callable[[_IpAddress], bool] = is_local_address,
    ) -> None:
        self._is_local = is_local
        self._listeners: list[tuple[_IpAddress, int]] = []
        for host, port in listeners:
            address = _parse_ip(host.strip("[]"))
            if address is not None:
                self._listeners.append((address, port))
                continue
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError:
                continue  # the server cannot listen there either
            for info in infos:
                resolved = _parse_ip(str(info[4][0]))
                if resolved is not None:
                    self._listeners.append((resolved, port))

    def includes(self, address: str, port: int) -> bool:
        """Would a connection to `address`:`port` reach this server?"""
        target = _parse_ip(address)
        if target is None:
            return False
        for listener, listener_port in self._listeners:
            if listener_port != port:
                continue
            if listener == target:
                return True
            covers = listener.is_unspecified and (listener.version == 6 or target.version == 4)
            if covers and self._is_local(target):
                return True
        return False


def mail_targets(
    resolver: Resolver,
    hosts: Sequence[str],
    port: int,
    own: OwnListeners,
    *,
    limit: int = MAX_MX_ADDRESSES,
) -> Targets:
    """The addresses of `hosts` in order, at most `limit` of them, cut before the first host
    that is this server. Addresses are looked up only until the limit is reached."""
    found: list[Target] = []
    for host in hosts:
        if len(found) >= limit:
            break
        addresses = [host] if is_ip(host) else resolver.addresses(host)
        if any(own.includes(address, port) for address in addresses):
            return Targets(tuple(found), loops_back=True)
        for address in addresses:
            if len(found) >= limit:
                return Targets(tuple(found))
            found.append(Target(host, address, port))
    return Targets(tuple(found))
