"""Opening an outbound SMTP session: the greeting, EHLO (or HELO), STARTTLS as the
destination's TLS requirement says, and AUTH at a smarthost with credentials.

The I/O is `smtp_session.Connection`'s; this module decides what to send and what each
reply means. Which addresses to try, and what a failure means for the attempt, is
`smtp.SmtpDeliverer`'s job.

TLS (RFC 3207), Postfix's levels: `none` never sends STARTTLS; `may` sends it when it is
offered and goes on in plaintext when it is refused; `encrypt` and `verify` demand it:
not offered or refused raises TlsFailed with its reason, before anything but EHLO was
sent. Implicit TLS (a smarthost on port 465, RFC 8314) starts the handshake before the
greeting, with the certificate verified.

AUTH (RFC 4954): PLAIN (RFC 4616) when offered, else LOGIN; only on a TLS session, so
credentials never cross the network in plaintext whatever the level. 235: logged in; a
5xx (535: wrong password) is AuthRefused, which the deliverer turns into a back-off;
anything else makes this address unusable for now.
"""

from __future__ import annotations

from dataclasses import dataclass

from gsmtp.delivery.smarthost import Smarthost
from gsmtp.delivery.smtp_session import Connection, PeerUnusable, TlsFailed
from gsmtp.delivery.tls_client import ClientTls
from gsmtp.delivery.tls_levels import TlsLevel, TlsRequirement
from gsmtp.delivery.tls_policy import STARTTLS_NOT_OFFERED, STARTTLS_REFUSED
from gsmtp.protocol import client
from gsmtp.protocol.client import Extensions, ServerReply


class LoopsBack(Exception):
    """The peer named itself with our own host name: it is this server."""


class AuthRefused(Exception):
    """The smarthost refused our credentials (a 5xx to AUTH): retrying at once with the
    same password cannot help. `held_back`: not tried, another session was just refused
    (`SmtpDeliverer` raises those)."""

    def __init__(self, text: str, *, held_back: bool = False) -> None:
        super().__init__(text)
        self.held_back = held_back


@dataclass(slots=True)
class Progress:
    """What one attempt learnt about the destination so far."""

    answered: bool = False  # some address sent a complete greeting: SMTP is there


class SessionOpener:
    """Greets and sets up sessions as `helo_name`, with the TLS contexts of `client_tls`."""

    def __init__(self, helo_name: str, client_tls: ClientTls) -> None:
        self._helo_name = helo_name
        self._client_tls = client_tls

    def open(
        self,
        connection: Connection,
        host: str,
        requirement: TlsRequirement,
        progress: Progress,
        *,
        plaintext: bool = False,
        smarthost: Smarthost | None = None,
    ) -> Extensions:
        """Up to the first MAIL: (implicit TLS,) greeting, EHLO, STARTTLS as
        `requirement` says (`plaintext`: never), AUTH with the smarthost's credentials.
        Failures: PeerUnusable (TlsFailed for TLS), LoopsBack, AuthRefused."""
        if smarthost is not None and smarthost.implicit:
            connection.start_tls(self._client_tls.context(TlsLevel.VERIFY), host)
        extensions = self._greeted(connection, progress)
        if not (connection.tls or plaintext):
            extensions = self._starttls(connection, host, requirement, extensions)
        if smarthost is not None and smarthost.credentials is not None:
            self._authenticate(connection, extensions, smarthost)
        return extensions

    def _greeted(self, connection: Connection, progress: Progress) -> Extensions:
        greeting = connection.read()
        progress.answered = True
        self._refuse_myself(greeting)
        if not greeting.is_positive:
            raise PeerUnusable(f"greeting: {greeting.text}")
        return self._hello(connection)

    def _starttls(
        self,
        connection: Connection,
        host: str,
        requirement: TlsRequirement,
        extensions: Extensions,
    ) -> Extensions:
        level = requirement.level
        if level is TlsLevel.NONE:
            return extensions
        required = level >= TlsLevel.ENCRYPT
        why = f"TLS is required ({level.name.lower()}, {requirement.source})"
        if not extensions.starttls:
            if required:
                raise TlsFailed(STARTTLS_NOT_OFFERED, f"STARTTLS not offered; {why}")
            return extensions
        reply = connection.command(b"STARTTLS\r\n")
        if reply.code != 220:
            if required:
                raise TlsFailed(STARTTLS_REFUSED, f"STARTTLS refused ({reply.text}); {why}")
            return extensions  # `may`: go on in plaintext (RFC 3207 §4)
        connection.start_tls(self._client_tls.context(level), host)
        return self._hello(connection)  # RFC 3207 §4.2: everything learnt before is void

    def _authenticate(
        self, connection: Connection, extensions: Extensions, smarthost: Smarthost
    ) -> None:
        credentials = smarthost.credentials
        assert credentials is not None
        if not connection.tls:
            raise PeerUnusable(
                f"smarthost {smarthost.name}: no TLS, so no AUTH "
                "(credentials never go in plaintext)"
            )
        if "PLAIN" in extensions.auth:
            reply = connection.command(
                client.auth_plain(credentials.username, credentials.password)
            )
        elif "LOGIN" in extensions.auth:
            reply = connection.command(b"AUTH LOGIN\r\n")
            for secret in (credentials.username, credentials.password):
                if reply.code != 334:
                    break
                reply = connection.command(client.auth_login_response(secret))
        else:
            raise PeerUnusable(f"smarthost {smarthost.name} offers no AUTH PLAIN or LOGIN")
        if reply.code == 235:
            return
        if reply.code >= 500:
            raise AuthRefused(f"smarthost {smarthost.name} refused our credentials: {reply.text}")
        raise PeerUnusable(f"smarthost {smarthost.name}: AUTH: {reply.text}")

    def _hello(self, connection: Connection) -> Extensions:
        reply = connection.command(f"EHLO {self._helo_name}\r\n".encode())
        if reply.is_positive:
            self._refuse_myself(reply)
            return client.parse_ehlo(reply)
        reply = connection.command(f"HELO {self._helo_name}\r\n".encode())
        if not reply.is_positive:
            raise PeerUnusable(f"HELO: {reply.text}")
        self._refuse_myself(reply)
        return Extensions()

    def _refuse_myself(self, reply: ServerReply) -> None:
        """A peer whose greeting or EHLO reply begins with our own host name is this
        server (reached through a NAT, a proxy or a name we do not know as ours)."""
        words = reply.lines[0].split() if reply.lines else []
        if words and words[0].rstrip(".").lower() == self._helo_name.rstrip(".").lower():
            raise LoopsBack
