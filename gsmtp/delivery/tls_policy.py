"""Which TLS level a destination demands: `delivery.tls`, the `[delivery.tls_policy]`
table, and further sources (MTA-STS) combined, the strictest winning.

No I/O here (a source may do its own). `TlsPolicy.requirement(domain)` is asked once per
delivery attempt: the table's entry for the domain (exact match, as Postfix's
`smtp_tls_policy_maps` without parent-domain matching) replaces `delivery.tls`, so an
operator can lower the level for one broken peer as well as raise it; then every
`RequirementSource` may raise it further (`TlsRequirement.stricter`). An MTA-STS policy
in enforce mode is such a source: it gives `TlsRequirement(VERIFY, "mta-sts",
mx_patterns)`, and the deliverer then only uses MX hosts that match one of the
patterns (`mx_allowed`).

What the levels do on the wire is `smtp.SmtpDeliverer`'s: see `TlsLevel`. The reasons a
TLS requirement was not met form a small fixed set (`FAILURE_REASONS`), the labels of
`gsmtp_tls_policy_failures_total`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from gsmtp.delivery.tls_levels import TlsLevel, TlsRequirement

__all__ = [
    "FAILURE_REASONS",
    "RequirementSource",
    "TlsPolicy",
    "mx_allowed",
    "pattern_matches",
]

# Why a session did not get the TLS its destination demands (or, under `may`, fell back
# to plaintext): the label values of gsmtp_tls_policy_failures_total.
STARTTLS_NOT_OFFERED = "starttls_not_offered"  # EHLO did not list STARTTLS (or was refused)
STARTTLS_REFUSED = "starttls_refused"  # STARTTLS answered with something other than 220
HANDSHAKE_FAILED = "handshake_failed"  # the TLS handshake failed (not the certificate)
CERTIFICATE_UNVERIFIED = "certificate_unverified"  # untrusted chain or wrong host name
MX_NOT_ALLOWED = "mx_not_allowed"  # no MX host matches the domain's MTA-STS patterns
FAILURE_REASONS = (
    STARTTLS_NOT_OFFERED,
    STARTTLS_REFUSED,
    HANDSHAKE_FAILED,
    CERTIFICATE_UNVERIFIED,
    MX_NOT_ALLOWED,
)


class RequirementSource(Protocol):
    """Something that may raise a domain's TLS requirement (MTA-STS): None when it has
    nothing to say about the domain."""

    def requirement(self, domain: str) -> TlsRequirement | None: ...

    # Optional: `observe(domain, mx_hosts)`, shown the MX hosts a delivery to `domain`
    # is about to use (MTA-STS in testing mode logs those its policy would refuse).


class TlsPolicy:
    """`delivery.tls` (`default`), the per-domain `table`, then `sources`, strictest
    winning. Domains are compared in lower case, without a trailing dot."""

    def __init__(
        self,
        default: TlsLevel = TlsLevel.MAY,
        table: Mapping[str, TlsLevel] | Iterable[tuple[str, TlsLevel]] = (),
        sources: Sequence[RequirementSource] = (),
    ) -> None:
        self.default = default
        pairs = table.items() if isinstance(table, Mapping) else table
        self._table = {_normal(domain): level for domain, level in pairs}
        self._sources = list(sources)

    def add_source(self, source: RequirementSource) -> None:
        """One more source that may raise a domain's level (e.g. MTA-STS)."""
        self._sources.append(source)

    def requirement(self, domain: str) -> TlsRequirement:
        """What a delivery to `domain`'s MX hosts must get."""
        name = _normal(domain)
        level = self._table.get(name)
        found = (
            TlsRequirement(self.default, "default")
            if level is None
            else TlsRequirement(level, "policy table")
        )
        for source in self._sources:
            extra = source.requirement(name)
            if extra is not None:
                found = found.stricter(extra)
        return found

    def observe(self, domain: str, mx_hosts: Sequence[str]) -> None:
        """Show each source the MX hosts of a delivery (see `RequirementSource.observe`)."""
        for source in self._sources:
            observe = getattr(source, "observe", None)  # optional: most sources need not
            if observe is not None:
                observe(_normal(domain), mx_hosts)


def pattern_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: a pattern is a host name, or "*." and a domain that matches a host
    with exactly one more label on the left ("*.example.com" matches
    "mx.example.com", neither "example.com" nor "a.mx.example.com")."""
    pattern, host = _normal(pattern), _normal(host)
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return pattern == host


def mx_allowed(host: str, patterns: Sequence[str] | None) -> bool:
    """May `host` be used for a destination whose requirement carries `patterns`? Any
    host when there are none."""
    return patterns is None or any(pattern_matches(p, host) for p in patterns)


def _normal(name: str) -> str:
    return name.strip().rstrip(".").lower()
