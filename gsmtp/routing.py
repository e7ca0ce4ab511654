"""Where a queued recipient goes: a local Maildir or a remote domain's MX hosts.

No I/O. The queue runner batches recipients by `Route` (one SMTP transaction per
destination domain), the Maildir backend asks which mailbox a local recipient names.
Both answers come from the policy's view of the accounts, so a user added or removed
on a running server is routed accordingly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from gsmtp.policy import Policy
from gsmtp.protocol.address import Address, normalise_mailbox, parse_path

LOCAL = "local"
SMTP = "smtp"


@dataclass(frozen=True, slots=True)
class Route:
    transport: str  # a key of the deliverers mapping: LOCAL or SMTP
    destination: str  # the domain, for batching and per-destination limits


@lru_cache(maxsize=4096)
def address_of(text: str) -> Address:
    """A spool recipient (stored in its wire form) back as an Address. Remembered for
    the addresses used most: every delivery asks twice (its route, then its mailbox),
    and the full RFC 5321 parse was a twentieth of the Python a local delivery ran."""
    parsed = parse_path(text, allow_null=False, allow_utf8=True)
    if isinstance(parsed, Address):
        return parsed
    local, _, domain = text.rpartition("@")
    return Address(local, domain)


class Router:
    def __init__(self, policy: Policy) -> None:
        self._policy = policy

    def route(self, recipient: str) -> Route:
        address = address_of(recipient)
        if self._policy.is_local(address, self._policy.snapshot()):
            return Route(LOCAL, address.domain)
        return Route(SMTP, address.domain)

    def local_domains(self) -> frozenset[str]:
        """The domains routed LOCAL, for a claim of the local lane's mail alone (the
        queue manager's lanes take turns)."""
        return self._policy.local_domains()

    def mailbox(self, recipient: str) -> str | None:
        """The Maildir name of a local recipient, or None when it has no mailbox (a
        user removed since the message was accepted: the backend bounces 5.1.1)."""
        address = address_of(recipient)
        if not self._policy.mailbox_exists(address):
            return None
        return normalise_mailbox(address)
