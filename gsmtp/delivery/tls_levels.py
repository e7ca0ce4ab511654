"""TLS levels for outbound delivery, shared by the per-destination policy
(`delivery.tls`, `[delivery.tls_policy]`), MTA-STS and the smarthost.

The levels are ordered: when several sources apply to one destination (the default,
the domain's entry in the table, an MTA-STS policy in enforce mode), the strictest wins.
Postfix's `smtp_tls_security_level` uses the same names for the same meanings."""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace


class TlsLevel(enum.IntEnum):
    """How much TLS a delivery demands, weakest first."""

    NONE = 0  # never STARTTLS
    MAY = 1  # STARTTLS when offered, any certificate; a failed handshake retries in plaintext
    ENCRYPT = 2  # TLS required, any certificate; no plaintext fallback
    VERIFY = 3  # TLS required, certificate valid for the MX host name

    @classmethod
    def parse(cls, text: str) -> TlsLevel:
        """The level named `text` ("none", "may", "encrypt", "verify"); ValueError naming
        the choices otherwise."""
        try:
            return cls[text.strip().upper()]
        except KeyError:
            choices = ", ".join(level.name.lower() for level in cls)
            raise ValueError(f"unknown TLS level {text!r} (choose one of {choices})") from None


@dataclass(frozen=True, slots=True)
class TlsRequirement:
    """What one destination demands of the sessions that carry its mail.

    `mx_patterns`: when set (an MTA-STS policy in enforce mode), only MX hosts matching
    one of these patterns may be used. `source` says where the level came from, for log
    lines and deferral reasons ("default", "policy table", "mta-sts"). `report_only`: an
    MTA-STS policy in testing mode wants to know whether `verify` would have passed; the
    deliverer tries that first and logs what fails, then goes on at `level` (RFC 8461
    §5: report, deliver), so it never refuses or defers anything."""

    level: TlsLevel
    source: str = "default"
    mx_patterns: tuple[str, ...] | None = None
    report_only: bool = False

    def stricter(self, other: TlsRequirement) -> TlsRequirement:
        """The requirement that demands more of the two (ties keep `self`); MX patterns
        travel with the requirement that set them, `report_only` survives either way."""
        found = self
        if other.level > self.level:
            found = TlsRequirement(other.level, other.source, other.mx_patterns or self.mx_patterns)
        elif other.mx_patterns and not self.mx_patterns:
            found = TlsRequirement(self.level, self.source, other.mx_patterns)
        if (self.report_only or other.report_only) and not found.report_only:
            found = replace(found, report_only=True)
        return found
