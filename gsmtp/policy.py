"""Who may send what to whom: recipient checks, relay rights, senders after AUTH, VRFY.

Plain functions over an accounts snapshot; no I/O of their own. Relay is granted only by
the client's network (trusted_networks) or by authentication as an enabled user — never
by anything the client says (MAIL FROM, HELO): the seed's `mail_allowed OR rcpt_allowed`
rule made an open relay for forged local senders, and is gone. An authenticated client
may use only its own address, or one it was given (`--may-send-as`), as MAIL FROM
(R-17, Postfix's reject_sender_login_mismatch), on every listener.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from gsmtp.accounts import AccountsSnapshot
from gsmtp.protocol import replies
from gsmtp.protocol.address import Address, AddressError, normalise_mailbox, parse_path
from gsmtp.protocol.replies import Reply

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Client:
    ip: IPAddress
    # The user this session authenticated as (a normalised address), None before AUTH.
    user: str | None = None

    @property
    def authenticated(self) -> bool:
        return self.user is not None


def client_from_ip(text: str) -> Client:
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # match ::ffff:a.b.c.d against IPv4 networks
    return Client(ip)


def client_network(
    ip: IPv4Address | IPv6Address, v4_prefix: int = 32, v6_prefix: int = 64
) -> IPv4Network | IPv6Network:
    """The network a client is counted in for limits: its IPv4 /32 or IPv6 /64 by
    default. One IPv6 host usually owns a whole /64, so counting exact IPv6 addresses
    would let one machine take every slot. An IPv4-mapped IPv6 address is IPv4."""
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = v4_prefix if isinstance(ip, IPv4Address) else v6_prefix
    return ipaddress.ip_network((ip, prefix), strict=False)


class Policy:
    def __init__(
        self,
        *,
        hostname: str,
        trusted_networks: Sequence[IPNetwork],
        snapshot: Callable[..., AccountsSnapshot],
        vrfy: bool,
    ) -> None:
        self._hostname = hostname.lower()
        self._trusted = tuple(trusted_networks)
        self._snapshot = snapshot
        self._vrfy = vrfy
        self._local_domains: tuple[AccountsSnapshot | None, frozenset[str]] = (None, frozenset())

    def reconfigure(self, *, trusted_networks: Sequence[IPNetwork], vrfy: bool) -> None:
        """A reload: relay rights and VRFY from the next decision on (a removed
        network can no longer relay, even on a session already open)."""
        self._trusted = tuple(trusted_networks)
        self._vrfy = vrfy

    def snapshot(self) -> AccountsSnapshot:
        """The accounts as they are now (re-read at most every few milliseconds)."""
        return self._snapshot()

    def is_trusted(self, client: Client) -> bool:
        return any(client.ip in network for network in self._trusted)

    def local_domains(self) -> frozenset[str]:
        """Every domain `is_local` accepts, as they are now: the same set object while
        the accounts do not change (a claim reuses what it made of it)."""
        snapshot = self._snapshot()
        if self._local_domains[0] is not snapshot:
            self._local_domains = (snapshot, snapshot.domains | {self._hostname})
        return self._local_domains[1]

    def is_local(self, address: Address, snapshot: AccountsSnapshot) -> bool:
        """Delivered here: a local domain, or our own host name (for postmaster)."""
        return snapshot.is_local_domain(address.domain) or address.domain == self._hostname

    def mailbox_exists(self, address: Address, snapshot: AccountsSnapshot | None = None) -> bool:
        """An existing user, or postmaster, which every local domain has (RFC 5321 §4.5.1)."""
        snapshot = snapshot or self._snapshot()
        if normalise_mailbox(address).partition("@")[0] == "postmaster":
            return self.is_local(address, snapshot)
        return snapshot.is_local_domain(address.domain) and snapshot.has_mailbox(address)

    def check_recipient(self, address: Address, client: Client) -> Reply:
        reply = self._check_recipient(address, client, self._snapshot())
        if not reply.is_positive:
            # Never refuse on a stale view: a user or domain may have just been added.
            reply = self._check_recipient(address, client, self._snapshot(fresh=True))
        return reply

    def _check_recipient(
        self, address: Address, client: Client, snapshot: AccountsSnapshot
    ) -> Reply:
        if self.is_local(address, snapshot):
            if self.mailbox_exists(address, snapshot):
                return replies.RECIPIENT_OK
            return replies.NO_SUCH_USER
        if address.domain.startswith("["):
            # R-10 / S-18: never relay to an address literal.
            return replies.RELAY_DENIED
        if self.is_trusted(client) or self._may_log_in(client, snapshot):
            return replies.RECIPIENT_OK
        return replies.RELAY_DENIED

    @staticmethod
    def _may_log_in(client: Client, snapshot: AccountsSnapshot) -> bool:
        """Authenticated as a user that still exists and is not disabled: `gsmtp user
        disable` takes relay rights from sessions already open, too."""
        if client.user is None:
            return False
        login = snapshot.login(client.user)
        return login is not None and not login.disabled

    def check_sender(self, sender: Address, client: Client) -> Reply:
        """MAIL FROM. Unauthenticated clients may name any sender (port 25: relaying
        is decided per recipient). An authenticated one may use its own address, one it
        may send as, or the null sender (MDNs and bounces a client composes)."""
        if client.user is None or sender.is_null:
            return replies.SENDER_OK
        if self._snapshot().may_use_sender(client.user, sender):
            return replies.SENDER_OK
        if self._snapshot(fresh=True).may_use_sender(client.user, sender):
            return replies.SENDER_OK
        return replies.SENDER_NOT_OWNED

    def verify(self, argument: str) -> Reply:
        """VRFY: 252 for everyone unless `vrfy = true` (RFC 5321 §3.5.3, §7.3)."""
        if not self._vrfy:
            return replies.CANNOT_VRFY
        address = parse_path(argument, allow_null=False, allow_utf8=True)
        if isinstance(address, AddressError):
            return replies.BAD_RECIPIENT
        if self.mailbox_exists(address):
            return Reply(250, "2.1.5", f"<{normalise_mailbox(address)}>")
        return replies.NO_SUCH_USER
