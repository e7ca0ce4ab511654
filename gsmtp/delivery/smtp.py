"""Remote delivery over SMTP: the domain's MX hosts (or a smarthost), one transaction per
(message, domain) carrying all its recipients, a result per recipient.

The I/O shell around `protocol.client`: connect to the addresses of the MX hosts in turn
(at most `mx.MAX_MX_ADDRESSES` over all hosts, `mx.mail_targets`); a refused connection,
a time-out or a 4xx/5xx greeting moves on to the next one. EHLO, falling back to HELO;
STARTTLS whenever offered (opportunistic: no certificate check, and any plaintext the
peer pushed before the handshake is dropped, D-29); MAIL/RCPT/DATA pipelined when the
peer offers PIPELINING. 2xx → delivered, 4xx or a broken connection → deferred, 5xx →
failed.

Time limits (each reply, each piece of the body, the whole attempt, the reply to the
final dot) and the after-the-dot rule ("message may be delivered twice", never the next
MX) are kept by `smtp_session`, where the connection and the transaction live.

Sessions are reused (Postfix's connection cache): after a transaction that ended
cleanly (the peer answered the final dot, or refused the message with a reply, and
nothing is out of step) the session waits in a `SessionCache` for the next message to
the same destination, at most `connection_reuse` messages per session, and is closed
with QUIT after `connection_idle` seconds unused (one sweeper greenlet). A later delivery
takes an idle session whose address is still among the destination's targets, checks it
with RSET (250, within `rset` and the new attempt's deadline), runs its transaction and
checks size, 8BITMIME, SMTPUTF8 and DSN against that session's EHLO reply. A cached
session that fails before the final dot (closed while idle, RSET refused, lost
mid-envelope) costs nothing: it is closed and the delivery connects as usual. After the
dot the rule above holds: the recipients are deferred and nothing more is tried. A 421
anywhere, a broken connection or a reply out of step ends the session.

MTA-STS (RFC 8461, `mta_sts.MtaSts`), MX delivery only: a domain's policy in enforce
mode becomes a `TlsRequirement` (VERIFY with MX patterns, `_tls_requirement`): only MX
hosts matching a pattern are tried (none → deferred, nothing sent), STARTTLS is then
mandatory and the certificate must verify for the MX host name (`verified_tls`), and
only sessions opened that way are reused for the domain.

Loops: an MX that is one of our own listeners (cut out by `mx.mail_targets`), or a peer
that greets us with our own host name, is "mail loops back to myself": 554 5.4.6, as
Postfix. When no address answered SMTP at all (every one refused, timed out, or failed
before or at the greeting), the results are marked `unreachable` so that the queue
manager can treat the destination as dead.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import gevent

from gsmtp.delivery.connection_cache import SessionCache, SessionKey
from gsmtp.delivery.mta_sts import MtaSts, matches_any, verified_context
from gsmtp.delivery.mx import (
    DnsPermanentError,
    DnsTemporaryError,
    OwnListeners,
    Resolver,
    Target,
    Targets,
    mail_targets,
)
from gsmtp.delivery.smtp_session import (
    MAY_BE_DELIVERED_TWICE,
    AttemptExpired,
    Connection,
    Deadline,
    PeerUnusable,
    Session,
    SessionEnd,
    Timeouts,
    Transaction,
    TransactionBroken,
)
from gsmtp.delivery.tls_levels import TlsLevel, TlsRequirement
from gsmtp.log import get_logger
from gsmtp.message import Outcome, QueuedMessage, RecipientResult, results_for_all
from gsmtp.metrics import OUTBOUND_SESSIONS
from gsmtp.protocol import client
from gsmtp.protocol.client import Extensions, ServerReply

__all__ = ["MAY_BE_DELIVERED_TWICE", "SmtpDeliverer", "Timeouts"]

SWEEP_MIN_SECONDS = 0.05  # the sweeper never wakes more often than this
DEFAULT_TIMEOUTS = Timeouts()


class _LoopsBack(Exception):
    """The peer named itself with our own host name: it is this server."""


@dataclass(slots=True)
class _Progress:
    """What one attempt learnt about the destination so far."""

    answered: bool = False  # some address sent a complete greeting: SMTP is there


def _opportunistic_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # opportunistic: encryption without authentication
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class SmtpDeliverer:
    """The `smtp` transport: all recipients of one call share one destination domain.
    `listeners` are this server's own (address, port) pairs, to recognise an MX that is
    ourselves; `clock` (monotonic seconds) measures the attempt's deadlines and the
    sessions' idle time.

    Session reuse (see the module docstring): `connection_reuse` messages per session (1:
    a new connection for every message, no cache); `connection_idle` seconds unused,
    then QUIT; at most `cache_per_destination` idle sessions per destination and
    `cache_limit` in all. `start()` runs the sweeper that closes idle sessions through
    `spawn(name, function)` (the owner's, e.g. a supervisor's); `close()` stops it and
    closes every idle session."""

    def __init__(
        self,
        *,
        resolver: Resolver,
        helo_name: str,
        port: int = 25,
        smarthost: tuple[str, int] | None = None,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        tls_context: ssl.SSLContext | None = None,
        listeners: Sequence[tuple[str, int]] = (),
        clock: Callable[[], float] = time.monotonic,
        connection_reuse: int = 1,
        connection_idle: float = 2.0,
        cache_per_destination: int = 20,
        cache_limit: int = 100,
        spawn: Callable[..., gevent.Greenlet] | None = None,
        mta_sts: MtaSts | None = None,
        verified_tls: ssl.SSLContext | None = None,
    ) -> None:
        self._resolver = resolver
        self._helo_name = helo_name
        self._port = port
        self._smarthost = smarthost
        self._timeouts = timeouts
        self._tls = tls_context or _opportunistic_tls()
        self._verified_tls = verified_tls  # made when first needed: loading CAs costs
        self._mta_sts = mta_sts
        self._own = OwnListeners(listeners)
        self._clock = clock
        self._log = get_logger(component="smtp")
        self._reuse = connection_reuse
        self._cache: SessionCache[Session] = SessionCache(
            idle=connection_idle, per_destination=cache_per_destination, limit=cache_limit
        )
        self._spawn = spawn or (lambda name, function, *args: gevent.spawn(function, *args))
        self._sweeper: gevent.Greenlet | None = None

    def deliver(self, message: QueuedMessage, recipients: Sequence[str]) -> list[RecipientResult]:
        domain = recipients[0].rpartition("@")[2]
        try:
            targets = self._targets(domain)
        except DnsPermanentError as error:
            return results_for_all(recipients, Outcome.FAILED, error.status, str(error))
        except DnsTemporaryError as error:
            return results_for_all(recipients, Outcome.DEFERRED, "4.4.3", f"451 4.4.3 {error}")
        if targets.loops_back and not targets.addresses:
            return self._loops_back(message, recipients, domain, "an MX host is this server")
        requirement = self._tls_requirement(domain, targets)
        if requirement.mx_patterns is not None:
            targets = _allowed_targets(targets, requirement.mx_patterns)
            if not targets.addresses:
                text = f"451 4.7.5 MTA-STS policy of {domain} matches none of its MX hosts"
                return results_for_all(recipients, Outcome.DEFERRED, "4.7.5", text)
        deadline = Deadline(self._clock, self._timeouts.attempt)
        destination = self._destination(domain)
        cached = self._take_cached(destination, targets, requirement)
        if cached is not None:
            try:
                return self._deliver_cached(cached, message, recipients, deadline)
            except PeerUnusable as error:
                # Stale: closed while idle, RSET refused, lost before the dot. The peer
                # cannot have the message; connect as if there had been no cache.
                OUTBOUND_SESSIONS.labels("stale").inc()
                self._log.info(
                    "smtp_session_stale", msg_id=message.id, mx=cached.where, reason=str(error)
                )
            except AttemptExpired:
                text = _expired_text(cached.where, deadline)
                return results_for_all(recipients, Outcome.DEFERRED, "4.4.2", text)
        progress = _Progress()
        status, last_error = "4.4.1", f"451 4.4.1 No mail host for {domain} could be reached"
        for target in targets.addresses:
            where = f"{target.host}[{target.address}]"
            try:
                return self._deliver_via(
                    target, destination, message, recipients, deadline, progress, requirement
                )
            except PeerUnusable as error:
                status, last_error = "4.4.1", f"451 4.4.1 {where}: {error}"
            except AttemptExpired:
                status, last_error = "4.4.2", _expired_text(where, deadline)
                break
            except _LoopsBack:
                return self._loops_back(message, recipients, domain, f"{where} greeted us as us")
        results = results_for_all(recipients, Outcome.DEFERRED, status, last_error)
        if targets.addresses and not progress.answered:
            results = [replace(r, unreachable=True) for r in results]
        return results

    # -- the session cache ----------------------------------------------------------------

    def start(self) -> None:
        """Start the sweeper that QUITs idle sessions (nothing to sweep without reuse)."""
        if self._reuse > 1 and self._sweeper is None:
            self._sweeper = self._spawn("smtp_session_sweeper", self._sweep_forever)

    def close(self) -> None:
        """Stop the sweeper and QUIT every idle session; from now on a session is closed
        after its transaction. Deliveries still running finish normally."""
        if self._sweeper is not None:
            self._sweeper.kill()
            self._sweeper = None
        for session in self._cache.close():
            session.connection.quit()

    def sweep(self) -> int:
        """QUIT every session idle for `connection_idle`; returns how many."""
        expired = self._cache.expired(self._clock())
        for session in expired:
            session.connection.quit()
        return len(expired)

    def _sweep_forever(self) -> None:
        while True:
            self.sweep()
            due = self._cache.next_expiry()
            wait = self._cache.idle if due is None else due - self._clock()
            gevent.sleep(max(wait, SWEEP_MIN_SECONDS))

    def _destination(self, domain: str) -> str:
        """What sessions are shared by: every domain relayed to the smarthost shares."""
        if self._smarthost is not None:
            host, port = self._smarthost
            return f"[{host}]:{port}"
        return domain.lower()

    def _take_cached(
        self, destination: str, targets: Targets, requirement: TlsRequirement
    ) -> Session | None:
        """An idle session to one of this attempt's targets: an address that DNS no
        longer gives, or that is now cut as ourselves, is never used again; a delivery
        that needs a verified certificate takes only a session verified for its host."""
        if self._reuse <= 1:
            return None
        endpoints = {(t.host, t.address, t.port) for t in targets.addresses}
        verify = requirement.level >= TlsLevel.VERIFY
        return self._cache.take(
            destination,
            lambda key: key.endpoint in endpoints and (key.verified or not verify),
            self._clock(),
        )

    def _release(self, session: Session, end: SessionEnd) -> None:
        """After a transaction: keep the session for the next message, or end it."""
        if end is SessionEnd.REUSABLE and session.transactions < self._reuse:
            for pushed_out in self._cache.put(session.key, session, self._clock()):
                pushed_out.connection.quit()
        elif end is SessionEnd.BROKEN:
            session.connection.close()
        else:
            session.connection.quit()

    # -- one address ------------------------------------------------------------------------

    def _tls_requirement(self, domain: str, targets: Targets) -> TlsRequirement:
        """What this delivery demands of TLS: opportunistic (MAY), raised to VERIFY with
        MX patterns by an MTA-STS policy in enforce mode. The one place MTA-STS enters
        delivery; a per-destination TLS policy joins here with `stricter()`. MX
        delivery only: the smarthost is not the domain's MX."""
        requirement = TlsRequirement(TlsLevel.MAY)
        if self._mta_sts is None or self._smarthost is not None:
            return requirement
        hosts = list(dict.fromkeys(target.host for target in targets.addresses))
        sts = self._mta_sts.requirement(domain, hosts)
        return requirement if sts is None else requirement.stricter(sts)

    def _verified_context(self) -> ssl.SSLContext:
        if self._verified_tls is None:
            self._verified_tls = verified_context()
        return self._verified_tls

    def _targets(self, domain: str) -> Targets:
        if self._smarthost is not None:
            host, port = self._smarthost
            return mail_targets(self._resolver, [host], port, self._own)
        hosts = self._resolver.mail_hosts(domain)
        targets = mail_targets(self._resolver, hosts, self._port, self._own)
        if not targets.addresses and not targets.loops_back:
            raise DnsTemporaryError(f"no address for the mail hosts of {domain}")
        return targets

    def _loops_back(
        self, message: QueuedMessage, recipients: Sequence[str], domain: str, why: str
    ) -> list[RecipientResult]:
        self._log.warning("mail_loop_detected", msg_id=message.id, domain=domain, why=why)
        text = f"554 5.4.6 mail for {domain} loops back to myself"
        return results_for_all(recipients, Outcome.FAILED, "5.4.6", text)

    def _connect(self, target: Target, deadline: Deadline) -> Connection:
        wait, by_deadline = deadline.limit(self._timeouts.connect)
        try:
            sock = socket.create_connection((target.address, target.port), timeout=wait)
        except TimeoutError:
            if by_deadline:
                raise AttemptExpired from None
            raise PeerUnusable(f"connect timed out after {wait:g}s") from None
        except OSError as error:
            raise PeerUnusable(f"connect failed: {error.strerror or error}") from None
        return Connection(sock, self._timeouts, deadline, self._clock)

    def _deliver_via(
        self,
        target: Target,
        destination: str,
        message: QueuedMessage,
        recipients: Sequence[str],
        deadline: Deadline,
        progress: _Progress,
        requirement: TlsRequirement,
    ) -> list[RecipientResult]:
        connection = self._connect(target, deadline)
        try:
            extensions = self._open_session(connection, target.host, progress, requirement)
        except TransactionBroken as error:
            connection.close()
            raise PeerUnusable(str(error)) from None
        except BaseException:
            connection.close()
            raise
        key = SessionKey(
            destination,
            target.host,
            target.address,
            target.port,
            connection.tls,
            connection.verified,
        )
        OUTBOUND_SESSIONS.labels("opened").inc()
        return self._deliver_on(Session(connection, extensions, target, key), message, recipients)

    def _deliver_cached(
        self,
        session: Session,
        message: QueuedMessage,
        recipients: Sequence[str],
        deadline: Deadline,
    ) -> list[RecipientResult]:
        """RSET first (RFC 5321 §4.1.1.5): it proves the session alive and in step, and
        it is the reset between two transactions. Any failure: PeerUnusable."""
        connection = session.connection
        connection.deadline = deadline
        try:
            reply = connection.command(b"RSET\r\n", timeout=self._timeouts.rset)
        except TransactionBroken as error:
            connection.close()
            raise PeerUnusable(f"RSET: {error}") from None
        except BaseException:
            connection.close()
            raise
        if reply.code != 250 or not connection.in_sync():
            connection.quit()
            raise PeerUnusable(f"RSET: {reply.text}")
        OUTBOUND_SESSIONS.labels("reused").inc()
        return self._deliver_on(session, message, recipients)

    def _deliver_on(
        self, session: Session, message: QueuedMessage, recipients: Sequence[str]
    ) -> list[RecipientResult]:
        """One transaction; then the session goes back to the cache or is ended. A
        connection broken before the final dot raises PeerUnusable (try elsewhere)."""
        session.transactions += 1
        transaction = Transaction(session, message, recipients, self._timeouts, self._log)
        try:
            results = transaction.run()
        except TransactionBroken as error:
            session.connection.close()
            raise PeerUnusable(str(error)) from None
        except BaseException:
            session.connection.close()
            raise
        self._release(session, transaction.end)
        return results

    def _open_session(
        self, connection: Connection, host: str, progress: _Progress, requirement: TlsRequirement
    ) -> Extensions:
        """Greeting, EHLO (or HELO), STARTTLS when offered: opportunistic, or, when the
        requirement is VERIFY, mandatory with the certificate verified for `host`.
        Failures: next host."""
        greeting = connection.read()
        progress.answered = True
        self._refuse_myself(greeting)
        if not greeting.is_positive:
            raise PeerUnusable(f"greeting: {greeting.text}")
        extensions = self._hello(connection)
        verify = requirement.level >= TlsLevel.VERIFY
        if extensions.starttls:
            reply = connection.command(b"STARTTLS\r\n")
            if reply.code == 220:
                connection.start_tls(self._verified_context() if verify else self._tls, host)
                extensions = self._hello(connection)
            elif verify:
                raise PeerUnusable(
                    f"STARTTLS refused ({reply.text}); {requirement.source} requires verified TLS"
                )
        elif verify:
            raise PeerUnusable(f"no STARTTLS offered; {requirement.source} requires verified TLS")
        return extensions

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
            raise _LoopsBack


def _allowed_targets(targets: Targets, patterns: Sequence[str]) -> Targets:
    """The targets whose MX host name matches one of `patterns` (MTA-STS, RFC 8461 §4.1)."""
    allowed = tuple(t for t in targets.addresses if matches_any(patterns, t.host))
    return replace(targets, addresses=allowed)


def _expired_text(where: str, deadline: Deadline) -> str:
    return (
        f"451 4.4.2 {where}: delivery attempt time limit "
        f"({deadline.seconds:g}s) reached; no further host tried"
    )
