"""Inbound TLS: the server's SSLContext, and loading a renewed certificate on SIGHUP.

The context follows Mozilla's "intermediate" profile (v5.7): TLS 1.2 with ECDHE key
exchange and AEAD ciphers only (AES-GCM, CHACHA20-POLY1305; no CBC, no static RSA, no
SHA-1), TLS 1.3 with OpenSSL's defaults (all AEAD); no compression, no renegotiation
(RFC 9325). `min_version` "TLSv1.3" refuses TLS 1.2 altogether.

`ServerTls.reload` builds a new context from the files and swaps it in for handshakes
that start afterwards; sessions already in TLS keep the one they began with. A pair that
does not load (a missing file, a key that does not match the certificate) leaves the old
context in place: the running server never loses TLS to a botched renewal. The failure
is logged (`tls_reload_failed`, at error level) and reported to the caller, who counts
the reload as failed. This module does not read the configuration: the composition root
passes the paths.
"""

from __future__ import annotations

import _ssl
import hashlib
import ssl
from typing import Any

from gsmtp import metrics
from gsmtp.log import get_logger

# Mozilla intermediate, TLS 1.2 part, in its order. The DHE-RSA suites are left out:
# they need DH parameters, and every client that has them has ECDHE too.
INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
MIN_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


class TlsError(Exception):
    """The certificate and key cannot be used; the message says why, for the operator."""


def server_context(cert: str, key: str, min_version: str = "TLSv1.2") -> ssl.SSLContext:
    """A server-side context with the intermediate profile and this certificate chain."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSIONS[min_version]
    context.set_ciphers(INTERMEDIATE_CIPHERS)  # TLS 1.2 and below; 1.3 suites are apart
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        raise TlsError(f"cannot load certificate {cert} and key {key}: {error}") from None
    return context


def certificate_fingerprint(cert: str) -> str:
    """SHA-256 of the first certificate in a PEM file, for the log ("" if unreadable)."""
    try:
        with open(cert, encoding="ascii", errors="replace") as handle:
            pem = handle.read()
        end = pem.index(ssl.PEM_FOOTER) + len(ssl.PEM_FOOTER)
        der = ssl.PEM_cert_to_DER_cert(pem[pem.index(ssl.PEM_HEADER) : end])
    except (OSError, ValueError):
        return ""
    return hashlib.sha256(der).hexdigest()


def certificate_not_after(cert: str) -> float | None:
    """The notAfter of the first certificate in a PEM file, as Unix time (None if it
    cannot be read). OpenSSL decodes it: the stdlib's own certificate decoder, the one
    CPython's tests use, since the ssl module offers no public one for a file."""
    decode = getattr(_ssl, "_test_decode_cert", None)
    if decode is None:
        return None
    try:
        not_after = decode(cert)["notAfter"]
        return float(ssl.cert_time_to_seconds(not_after))
    except (OSError, ssl.SSLError, KeyError, ValueError, TypeError):
        return None


class ServerTls:
    """The context new handshakes use; `reload` replaces it when the new pair loads.
    gsmtp_tls_cert_not_after_timestamp_seconds follows the certificate served."""

    def __init__(self, cert: str, key: str, min_version: str = "TLSv1.2") -> None:
        self.context = server_context(cert, key, min_version)
        self._log: Any = get_logger(component="tls")
        self._publish_expiry(cert)

    def _publish_expiry(self, cert: str) -> None:
        not_after = certificate_not_after(cert)
        metrics.TLS_CERT_NOT_AFTER.set(not_after or 0)

    def reload(self, cert: str, key: str, min_version: str = "TLSv1.2") -> bool:
        """Load the pair again (a renewed certificate at the same paths, or new paths);
        True if new handshakes now use it, False if the old context stays."""
        try:
            context = server_context(cert, key, min_version)
        except TlsError as error:
            self._log.error("tls_reload_failed", error=str(error))
            return False
        self.use(context, cert, min_version)
        return True

    def use(self, context: ssl.SSLContext, cert: str, min_version: str) -> None:
        """Swap in a context already built by `server_context` (a reload that loads
        everything first and applies only when all of it loaded)."""
        self.context = context
        self._publish_expiry(cert)
        self._log.info(
            "tls_reloaded", cert=cert, fingerprint=certificate_fingerprint(cert), min=min_version
        )
