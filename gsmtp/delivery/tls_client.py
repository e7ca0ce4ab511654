"""The TLS contexts of outbound sessions: one that checks nothing (`may`, `encrypt`) and
one that verifies the peer's certificate for the host name (`verify`).

Made once at start-up and shared by every session: loading the CA store costs
milliseconds, and a CA file that cannot be read is a start-up error (`TlsClientError`),
not a deferral of every message. TLS 1.2 at least, either way (RFC 8996). The verifying
context trusts the system CA store and, when `delivery.ca_file` is set, the CAs in that
file too (a private CA, the tests' CA).
"""

from __future__ import annotations

import ssl

from gsmtp.delivery.tls_levels import TlsLevel


class TlsClientError(Exception):
    """The CA file cannot be used; the message names it."""


def verified_context(ca_file: str = "") -> ssl.SSLContext:
    """A client context that verifies the chain and the host name: the system CA store,
    plus `ca_file` when given. Raises TlsClientError naming an unusable file."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as error:
            raise TlsClientError(f"{ca_file}: cannot load CA certificates: {error}") from None
    return context


def unverified_context() -> ssl.SSLContext:
    """Encryption without authentication: any certificate (opportunistic, `encrypt`)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class ClientTls:
    """The context for each level (`none` never gets to ask)."""

    def __init__(self, ca_file: str = "") -> None:
        self._verified = verified_context(ca_file)
        self._unverified = unverified_context()

    @property
    def verified(self) -> ssl.SSLContext:
        """The verifying context (system store plus ca_file): also MTA-STS's HTTPS."""
        return self._verified

    def context(self, level: TlsLevel) -> ssl.SSLContext:
        return self._verified if level >= TlsLevel.VERIFY else self._unverified
