"""The TLS contexts of outbound sessions: one that checks nothing (`may`, `encrypt`) and
one that verifies the peer's certificate for the host name (`verify`).

Made once at start-up and shared by every session: loading the CA store costs
milliseconds, and a CA file that cannot be read is a start-up error (`TlsClientError`),
not a deferral of every message. TLS 1.2 at least, either way (RFC 8996). The verifying
context trusts the system CA store and, when `delivery.ca_file` is set, the CAs in that
file too (a private CA, the tests' CA).
"""

from __future__ import annotations

import selectors
import socket
import ssl
from collections.abc import Callable

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


def handshake(
    sock: socket.socket,
    context: ssl.SSLContext,
    server_name: str,
    remaining: Callable[[], float],
) -> ssl.SSLSocket:
    """The client handshake on `sock`, finished before `remaining()` (seconds left) runs
    out, or TimeoutError. A socket timeout bounds each wait, not the whole: a peer
    trickling its handshake a byte at a time would hold it for as long as it liked. So
    the handshake runs non-blocking and every wait is given what is left (gevent's
    selector under `serve`'s monkey-patching, so the hub keeps serving). Handshake and
    certificate errors propagate as `ssl.SSLError` / `ssl.SSLCertVerificationError`.
    On any failure the TLS socket is closed (and with it `sock`'s descriptor)."""
    tls = context.wrap_socket(sock, server_hostname=server_name, do_handshake_on_connect=False)
    try:
        tls.settimeout(0.0)
        while True:
            try:
                tls.do_handshake()
                return tls
            except ssl.SSLWantReadError:
                _wait(tls, selectors.EVENT_READ, remaining())
            except ssl.SSLWantWriteError:
                _wait(tls, selectors.EVENT_WRITE, remaining())
    except BaseException:
        tls.close()
        raise


def _wait(sock: socket.socket, event: int, seconds: float) -> None:
    if seconds <= 0:
        raise TimeoutError
    with selectors.DefaultSelector() as selector:
        selector.register(sock, event)
        if not selector.select(seconds):
            raise TimeoutError


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
