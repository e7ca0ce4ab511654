"""Remote delivery over SMTP: the domain's MX hosts (or a smarthost), one transaction per
(message, domain) carrying all its recipients, a result per recipient.

The I/O shell around `protocol.client`: connect to the addresses of the MX hosts in turn
(at most `mx.MAX_MX_ADDRESSES` over all hosts, `mx.mail_targets`); a refused connection,
a time-out or a 4xx/5xx greeting moves on to the next one. EHLO, falling back to HELO;
STARTTLS as the destination's TLS requirement says (below; any plaintext the peer
pushed before the handshake is dropped, D-29); AUTH at a smarthost with credentials;
MAIL/RCPT/DATA pipelined when the peer offers PIPELINING. 2xx → delivered, 4xx or a
broken connection → deferred, 5xx → failed.

TLS (`tls_policy.TlsPolicy.requirement(domain)`, or the smarthost's own level), as
Postfix's levels: `none` never starts TLS; `may` starts it when offered, checks no
certificate, goes on in plaintext when STARTTLS is refused, and after a failed
handshake delivers in plaintext on a new connection to the same address (the
connection after a failed handshake is unusable); `encrypt` demands TLS with any
certificate and `verify` TLS with a certificate valid for the MX host name: a missing
STARTTLS, a refusal or a failed handshake or verification makes that address unusable
("451 4.7.x ..." naming the reason), the next one is tried, and nothing is ever sent
in plaintext. A requirement carrying MX patterns (MTA-STS in enforce mode) restricts
the hosts tried to those matching one (`tls_policy.mx_allowed`); none matching defers.
A `report_only` requirement (MTA-STS in testing mode) first opens each session as
`verify` would and logs `mta_sts_testing_failure` when that fails, then goes on at its
own level on a new connection: reported, never refused.
A smarthost with credentials gets AUTH PLAIN (or LOGIN) only over TLS; a 5xx to AUTH
(535: wrong password) defers with a reason naming the smarthost, and the results are
marked `unreachable` so that the queue manager backs off as from a dead destination
instead of logging in again with the same password for every message.

Time limits (each reply, each piece of the body, the whole attempt, the reply to the
final dot) and the after-the-dot rule ("message may be delivered twice", never the next
MX) are kept by `smtp_session`, where the connection and the transaction live.

Sessions are reused (Postfix's connection cache): after a transaction that ended
cleanly (the peer answered the final dot, or refused the message with a reply, and
nothing is out of step) the session waits in a `SessionCache` for the next message to
the same destination, at most `connection_reuse` messages per session, and is closed
with QUIT after `connection_idle` seconds unused (one sweeper greenlet). A later delivery
takes an idle session whose address is still among the destination's targets and that
was opened under the TLS level the destination demands now, or a stricter one
(`SessionKey.carries`: a `may` session never carries `verify` mail), checks it with
RSET (250, within `rset` and the new attempt's deadline; to a peer that offers
PIPELINING in one group with the envelope, so reuse costs no round trip of its own:
the body is sent only after the RSET's 250), runs its transaction and
checks size, 8BITMIME, SMTPUTF8 and DSN against that session's EHLO reply. A cached
session that fails before the final dot (closed while idle, RSET refused, lost
mid-envelope) costs nothing: it is closed and the delivery connects as usual. After the
dot the rule above holds: the recipients are deferred and nothing more is tried. A 421
anywhere, a broken connection or a reply out of step ends the session.

Loops: an MX that is one of our own listeners (cut out by `mx.mail_targets`), or a peer
that greets us with our own host name, is "mail loops back to myself": 554 5.4.6, as
Postfix. When no address answered SMTP at all (every one refused, timed out, or failed
before or at the greeting), the results are marked `unreachable` so that the queue
manager can treat the destination as dead.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import gevent

from gsmtp.delivery.connection_cache import SessionCache, SessionKey
from gsmtp.delivery.mx import (
    DnsPermanentError,
    DnsTemporaryError,
    OwnListeners,
    Resolver,
    Target,
    Targets,
    mail_targets,
)
from gsmtp.delivery.session_opening import AuthRefused, LoopsBack, Progress, SessionOpener
from gsmtp.delivery.smarthost import Credentials, Smarthost
from gsmtp.delivery.smtp_session import (
    MAY_BE_DELIVERED_TWICE,
    AttemptExpired,
    Connection,
    Deadline,
    PeerUnusable,
    Session,
    SessionEnd,
    Timeouts,
    TlsFailed,
    Transaction,
    TransactionBroken,
)
from gsmtp.delivery.tls_client import ClientTls
from gsmtp.delivery.tls_levels import TlsLevel, TlsRequirement
from gsmtp.delivery.tls_policy import (
    CERTIFICATE_UNVERIFIED,
    FAILURE_REASONS,
    HANDSHAKE_FAILED,
    MX_NOT_ALLOWED,
    STARTTLS_NOT_OFFERED,
    STARTTLS_REFUSED,
    TlsPolicy,
    mx_allowed,
)
from gsmtp.log import get_logger
from gsmtp.message import Outcome, QueuedMessage, RecipientResult, results_for_all
from gsmtp.metrics import OUTBOUND_SESSIONS, OUTBOUND_TLS, TLS_POLICY_FAILURES

__all__ = ["MAY_BE_DELIVERED_TWICE", "SmtpDeliverer", "Timeouts"]

SWEEP_MIN_SECONDS = 0.05  # the sweeper never wakes more often than this
DEFAULT_TIMEOUTS = Timeouts()


# RFC 3463 / RFC 5248: 4.7.4 security features not supported, 4.7.5 cryptographic failure.
_TLS_STATUS = {
    STARTTLS_NOT_OFFERED: "4.7.4",
    STARTTLS_REFUSED: "4.7.4",
    HANDSHAKE_FAILED: "4.7.5",
    CERTIFICATE_UNVERIFIED: "4.7.5",
}


class _NoAllowedMx(Exception):
    """The destination's MX patterns (MTA-STS) match none of its MX hosts."""


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
    closes every idle session.

    TLS: `tls_policy` gives each domain's requirement (default: `may` everywhere);
    `client_tls` holds the contexts (the verifying one with `delivery.ca_file`). With a
    `smarthost`, every message goes there under the smarthost's own level; after it
    refused our credentials, no message for any domain logs in again for
    `auth_backoff` seconds (the queue manager keys dead destinations by recipient
    domain, while every domain meets the same smarthost and password)."""

    def __init__(
        self,
        *,
        resolver: Resolver,
        helo_name: str,
        port: int = 25,
        smarthost: Smarthost | None = None,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        tls_policy: TlsPolicy | None = None,
        client_tls: ClientTls | None = None,
        listeners: Sequence[tuple[str, int]] = (),
        clock: Callable[[], float] = time.monotonic,
        connection_reuse: int = 1,
        connection_idle: float = 2.0,
        cache_per_destination: int = 20,
        cache_limit: int = 100,
        spawn: Callable[..., gevent.Greenlet] | None = None,
        auth_backoff: float = 60.0,
    ) -> None:
        self._resolver = resolver
        self._port = port
        self._smarthost = smarthost
        self._timeouts = timeouts
        self._policy = tls_policy or TlsPolicy()
        for reason in FAILURE_REASONS:  # every label shown from the start, at 0
            TLS_POLICY_FAILURES.labels(reason)
        for level in ("none", "tls", "verified"):
            OUTBOUND_TLS.labels(level)
        self._opener = SessionOpener(helo_name, client_tls or ClientTls())
        self._own = OwnListeners(listeners)
        self._clock = clock
        self._log = get_logger(component="smtp")
        self._reuse = connection_reuse
        self._cache: SessionCache[Session] = SessionCache(
            idle=connection_idle, per_destination=cache_per_destination, limit=cache_limit
        )
        self._spawn = spawn or (lambda name, function, *args: gevent.spawn(function, *args))
        self._sweeper: gevent.Greenlet | None = None
        self._auth_backoff = auth_backoff
        self._auth_refusal: tuple[float, str, str] | None = None  # (until, where, text)
        # Until the smarthost credentials have worked (since start, or since the last
        # refusal), one session at a time is opened with them and the others wait for
        # its outcome: deliveries in flight do not all log in with a wrong password at
        # once (threading's lock is gevent's under `serve`'s monkey-patching).
        self._auth_lock = threading.Lock()
        self._auth_proven: Credentials | None = None

    def reconfigure(
        self,
        *,
        resolver: Resolver,
        port: int,
        smarthost: Smarthost | None,
        timeouts: Timeouts,
    ) -> None:
        """A reload: name servers, port, smarthost and timeouts for the next delivery
        (running ones finish as they began; cached sessions stay usable)."""
        self._resolver = resolver
        self._port = port
        if _credentials(smarthost) != _credentials(self._smarthost):
            self._auth_refusal = None  # new credentials: worth a try at once
        self._smarthost = smarthost
        self._timeouts = timeouts

    def deliver(self, message: QueuedMessage, recipients: Sequence[str]) -> list[RecipientResult]:
        refusal = self._current_refusal()
        if refusal is not None:
            where, text = refusal
            return self._auth_refused(message, recipients, where, text, again=False)
        domain = recipients[0].rpartition("@")[2]
        requirement = self._requirement(domain)
        try:
            targets = self._targets(domain, requirement)
        except DnsPermanentError as error:
            return results_for_all(recipients, Outcome.FAILED, error.status, str(error))
        except DnsTemporaryError as error:
            return results_for_all(recipients, Outcome.DEFERRED, "4.4.3", f"451 4.4.3 {error}")
        except _NoAllowedMx as error:
            TLS_POLICY_FAILURES.labels(MX_NOT_ALLOWED).inc()
            return results_for_all(recipients, Outcome.DEFERRED, "4.7.5", f"451 4.7.5 {error}")
        if targets.loops_back and not targets.addresses:
            return self._loops_back(message, recipients, domain, "an MX host is this server")
        deadline = Deadline(self._clock, self._timeouts.attempt)
        destination = self._destination(domain)
        cached = self._take_cached(destination, targets, requirement.level)
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
        progress = Progress()
        status, last_error = "4.4.1", f"451 4.4.1 No mail host for {domain} could be reached"
        for target in targets.addresses:
            where = f"{target.host}[{target.address}]"
            try:
                return self._deliver_via(
                    target, destination, requirement, message, recipients, deadline, progress
                )
            except TlsFailed as error:
                status = _TLS_STATUS[error.reason]
                last_error = f"451 {status} {where}: {error}"
                self._tls_failed(message, where, requirement, error)
            except AuthRefused as error:
                again = not error.held_back
                return self._auth_refused(message, recipients, where, str(error), again=again)
            except PeerUnusable as error:
                status, last_error = "4.4.1", f"451 4.4.1 {where}: {error}"
            except AttemptExpired:
                status, last_error = "4.4.2", _expired_text(where, deadline)
                break
            except LoopsBack:
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
            return self._smarthost.name
        return domain.lower()

    def _requirement(self, domain: str) -> TlsRequirement:
        """The hop's TLS requirement: the smarthost's own, else the domain's policy."""
        if self._smarthost is not None:
            return self._smarthost.requirement
        return self._policy.requirement(domain)

    def _take_cached(self, destination: str, targets: Targets, level: TlsLevel) -> Session | None:
        """An idle session to one of this attempt's targets, opened under `level` or a
        stricter one: an address that DNS no longer gives, or that is now cut as
        ourselves, is never used again, and a `may` session never carries `verify` mail."""
        if self._reuse <= 1:
            return None
        endpoints = {(t.host, t.address, t.port) for t in targets.addresses}
        return self._cache.take(
            destination,
            lambda key: key.endpoint in endpoints and key.carries(level),
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

    def _targets(self, domain: str, requirement: TlsRequirement) -> Targets:
        if self._smarthost is not None:
            smarthost = self._smarthost
            return mail_targets(self._resolver, [smarthost.host], smarthost.port, self._own)
        hosts = self._resolver.mail_hosts(domain)
        self._policy.observe(domain, hosts)
        patterns = requirement.mx_patterns
        if patterns is not None:
            allowed = [host for host in hosts if mx_allowed(host, patterns)]
            if not allowed:
                raise _NoAllowedMx(
                    f"no MX host of {domain} ({', '.join(hosts)}) matches its "
                    f"{requirement.source} policy ({', '.join(patterns)})"
                )
            hosts = allowed
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
        requirement: TlsRequirement,
        message: QueuedMessage,
        recipients: Sequence[str],
        deadline: Deadline,
        progress: Progress,
    ) -> list[RecipientResult]:
        """One address. Under `may`, a failed handshake is followed by a plaintext
        session on a new connection (as Postfix does): the old one is unusable. Under an
        MTA-STS policy in testing mode, the session `verify` demands is tried first."""
        session = None
        if requirement.report_only and TlsLevel.NONE < requirement.level < TlsLevel.VERIFY:
            session = self._open_as_enforced(target, destination, requirement, deadline, progress)
        if session is None:
            try:
                session = self._open(target, destination, requirement, deadline, progress)
            except TlsFailed as error:
                if requirement.level is not TlsLevel.MAY:
                    raise
                where = f"{target.host}[{target.address}]"
                self._tls_failed(message, where, requirement, error)
                session = self._open(
                    target, destination, requirement, deadline, progress, plaintext=True
                )
        OUTBOUND_SESSIONS.labels("opened").inc()
        return self._deliver_on(session, message, recipients)

    def _open_as_enforced(
        self,
        target: Target,
        destination: str,
        requirement: TlsRequirement,
        deadline: Deadline,
        progress: Progress,
    ) -> Session | None:
        """MTA-STS testing mode (RFC 8461 §5: report, deliver): a session opened as
        `enforce` would open it (STARTTLS, certificate verified for the MX name). When
        that fails, `mta_sts_testing_failure` says why and None has the caller open one
        at the normal level on a new connection, as after a failed `may` handshake; a
        testing policy never refuses or defers mail. Other failures are the peer's and
        propagate as they would at the normal level."""
        enforced = replace(requirement, level=TlsLevel.VERIFY, source="mta-sts testing")
        try:
            return self._open(target, destination, enforced, deadline, progress)
        except TlsFailed as error:
            self._log.warning(
                "mta_sts_testing_failure",
                domain=destination,
                mx=f"{target.host}[{target.address}]",
                failure=str(error),
            )
            return None

    def _open(
        self,
        target: Target,
        destination: str,
        requirement: TlsRequirement,
        deadline: Deadline,
        progress: Progress,
        *,
        plaintext: bool = False,
    ) -> Session:
        """`_open_session`, one at a time while the smarthost credentials are unproven:
        a waiter finding a refusal made meanwhile raises AuthRefused (held back) without
        connecting; after a success, sessions open side by side again."""
        credentials = _credentials(self._smarthost)
        if credentials is None or credentials == self._auth_proven:
            return self._open_session(
                target, destination, requirement, deadline, progress, plaintext=plaintext
            )
        with self._auth_lock:
            refusal = self._current_refusal()
            if refusal is not None:
                raise AuthRefused(refusal[1], held_back=True)
            try:
                session = self._open_session(
                    target, destination, requirement, deadline, progress, plaintext=plaintext
                )
            except AuthRefused as error:
                # Recorded before the lock is released, for the sessions waiting on it.
                where = f"{target.host}[{target.address}]"
                self._auth_refusal = (self._clock() + self._auth_backoff, where, str(error))
                raise
            self._auth_proven = credentials
            return session

    def _current_refusal(self) -> tuple[str, str] | None:
        """(where, text) of the smarthost's refusal of our credentials, while it holds."""
        refusal = self._auth_refusal
        if refusal is None or self._clock() >= refusal[0]:
            return None
        return refusal[1], refusal[2]

    def _open_session(
        self,
        target: Target,
        destination: str,
        requirement: TlsRequirement,
        deadline: Deadline,
        progress: Progress,
        *,
        plaintext: bool = False,
    ) -> Session:
        """Connect, greeting, EHLO, TLS as required (`plaintext`: never), AUTH at a
        smarthost with credentials. Failures: PeerUnusable (TlsFailed for TLS)."""
        connection = self._connect(target, deadline)
        try:
            extensions = self._opener.open(
                connection,
                target.host,
                requirement,
                progress,
                plaintext=plaintext,
                smarthost=self._smarthost,
            )
        except TransactionBroken as error:
            connection.close()
            raise PeerUnusable(str(error)) from None
        except AuthRefused:
            connection.quit()
            raise
        except BaseException:
            connection.close()
            raise
        key = SessionKey(
            destination,
            target.host,
            target.address,
            target.port,
            connection.tls,
            requirement.level,
            target.host if connection.tls_verified else "",
        )
        return Session(connection, extensions, target, key)

    def _deliver_cached(
        self,
        session: Session,
        message: QueuedMessage,
        recipients: Sequence[str],
        deadline: Deadline,
    ) -> list[RecipientResult]:
        """RSET first (RFC 5321 §4.1.1.5): it proves the session alive and in step, and
        it is the reset between two transactions. Any failure: PeerUnusable. To a peer
        with PIPELINING it goes in one group with the envelope (a round trip fewer per
        message); else alone, before it."""
        connection = session.connection
        connection.deadline = deadline
        if session.extensions.pipelining:
            results = self._deliver_on(session, message, recipients, reset=True)
            OUTBOUND_SESSIONS.labels("reused").inc()
            return results
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
        self,
        session: Session,
        message: QueuedMessage,
        recipients: Sequence[str],
        *,
        reset: bool = False,
    ) -> list[RecipientResult]:
        """One transaction (after a pipelined RSET if `reset`); then the session goes
        back to the cache or is ended. A connection broken (or an RSET refused) before
        the final dot raises PeerUnusable (try elsewhere)."""
        session.transactions += 1
        transaction = Transaction(
            session, message, recipients, self._timeouts, self._log, reset=reset
        )
        try:
            results = transaction.run()
        except TransactionBroken as error:
            session.connection.close()
            raise PeerUnusable(str(error)) from None
        except BaseException:
            session.connection.close()
            raise
        self._release(session, transaction.end)
        return self._with_tls(session.connection, results)

    def _with_tls(
        self, connection: Connection, results: list[RecipientResult]
    ) -> list[RecipientResult]:
        """Say how the message travelled (the log of `message_delivered`), and count it."""
        version, verified = connection.tls_version, connection.tls_verified
        if any(r.outcome is Outcome.DELIVERED for r in results):
            OUTBOUND_TLS.labels("verified" if verified else "tls" if version else "none").inc()
        return [replace(r, tls_version=version, tls_verified=verified) for r in results]

    def _tls_failed(
        self, message: QueuedMessage, where: str, requirement: TlsRequirement, error: TlsFailed
    ) -> None:
        TLS_POLICY_FAILURES.labels(error.reason).inc()
        fallback = requirement.level is TlsLevel.MAY
        self._log.warning(
            "tls_failed",
            msg_id=message.id,
            mx=where,
            reason=error.reason,
            error=str(error),
            level=requirement.level.name.lower(),
            source=requirement.source,
            next="plaintext" if fallback else "next host",
        )

    def _auth_refused(
        self,
        message: QueuedMessage,
        recipients: Sequence[str],
        where: str,
        text: str,
        *,
        again: bool = True,
    ) -> list[RecipientResult]:
        """Deferred, and `unreachable` so the queue manager backs off from the
        destination: every message would meet the same wrong password. `again`: the
        smarthost just refused (else: a message held back by an earlier refusal)."""
        if again:
            self._log.warning("smarthost_auth_failed", msg_id=message.id, mx=where, reply=text)
            self._auth_refusal = (self._clock() + self._auth_backoff, where, text)
            self._auth_proven = None
        results = results_for_all(recipients, Outcome.DEFERRED, "4.7.8", f"451 4.7.8 {text}", where)
        return [replace(r, unreachable=True) for r in results]


def _credentials(smarthost: Smarthost | None) -> Credentials | None:
    return smarthost.credentials if smarthost is not None else None


def _expired_text(where: str, deadline: Deadline) -> str:
    return (
        f"451 4.4.2 {where}: delivery attempt time limit "
        f"({deadline.seconds:g}s) reached; no further host tried"
    )
