"""Real remote parts for delivery tests: dnsmasq as the DNS server, aiosmtpd sinks as MX
hosts on 127.0.0.x, each able to answer 4xx/5xx for its first N attempts, to offer
STARTTLS with a self-signed certificate, or to offer DSN (RFC 3461). Every sink records
the MAIL and RCPT commands it was sent, parameters and all."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from tests.integration.harness import free_port, self_signed_certificate, wait_for


class Dnsmasq:
    """dnsmasq on 127.0.0.1:<port>, authoritative for the test zones only."""

    def __init__(self, records: Sequence[str]) -> None:
        self.port = free_port()
        binary = shutil.which("dnsmasq")
        assert binary, "dnsmasq is not installed (apt-get install dnsmasq-base)"
        self.process = subprocess.Popen(
            [
                binary,
                "--keep-in-foreground",
                f"--port={self.port}",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--pid-file=",
                "--user=root",
                "--group=root",
                "--local=/test/",
                "--log-facility=-",
                *records,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._answers, timeout=10, what="dnsmasq to answer")

    def _answers(self) -> bool:
        import dns.nameserver
        import dns.resolver

        if self.process.poll() is not None:
            raise AssertionError("dnsmasq exited")
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", self.port)]
        resolver.lifetime = 0.5
        try:
            resolver.resolve("probe.test", "A")
        except dns.resolver.NXDOMAIN:
            return True
        except Exception:
            return False
        return True

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    tls: bool


@dataclass
class SinkBehaviour:
    """Answer `reply` to DATA for the first `fail_first` transactions. `drop_after_data`:
    keep the message, then close the connection without answering the final dot."""

    fail_first: int = 0
    reply: str = "451 4.3.0 Try again later"
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    hold_data: threading.Event | None = None
    drop_after_data: bool = False


class _Handler:
    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        reply = self._sink.behaviour.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        sink = self._sink
        sink.attempts += 1
        if sink.behaviour.hold_data is not None:
            import asyncio

            while not sink.behaviour.hold_data.is_set():
                await asyncio.sleep(0.05)
        if sink.attempts <= sink.behaviour.fail_first:
            return sink.behaviour.reply
        sink.received.append(
            Received(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.original_content,
                session.ssl is not None,
            )
        )
        if sink.behaviour.drop_after_data:
            server.transport.close()  # the reply below goes nowhere
        return "250 2.0.0 Stored"


class _DsnHandler(_Handler):
    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-DSN", responses[-1]]


_DSN_PARAMETERS = {"MAIL": ("RET=", "ENVID="), "RCPT": ("NOTIFY=", "ORCPT=")}


class _RecordingSMTP(SMTP):
    """aiosmtpd's server, recording each MAIL and RCPT line as sent. With `dsn` it also
    takes the RFC 3461 parameters, which aiosmtpd 1.4 itself refuses with 555: they are
    recorded, then taken off before its own parsing."""

    def __init__(self, handler: Any, *, sink: Sink, dsn: bool, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._sink = sink
        self._dsn = dsn

    def _record(self, verb: str, arg: str | None) -> str | None:
        self._sink.commands.append(f"{verb} {arg}")
        if not self._dsn or arg is None:
            return arg
        prefixes = _DSN_PARAMETERS[verb]
        return " ".join(w for w in arg.split(" ") if not w.upper().startswith(prefixes))

    async def smtp_MAIL(self, arg: str | None) -> None:
        await super().smtp_MAIL(self._record("MAIL", arg))

    async def smtp_RCPT(self, arg: str | None) -> None:
        await super().smtp_RCPT(self._record("RCPT", arg))


class _Controller(Controller):
    def __init__(self, handler: Any, *, sink: Sink, dsn: bool, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._sink = sink
        self._dsn = dsn

    def factory(self) -> SMTP:
        return _RecordingSMTP(self.handler, sink=self._sink, dsn=self._dsn, **self.SMTP_kwargs)


class Sink:
    """An aiosmtpd MX host on host:port that records what it accepted, and every MAIL
    and RCPT line in `commands` ("MAIL FROM:<a@b> SIZE=10 RET=HDRS")."""

    def __init__(
        self,
        host: str,
        port: int,
        behaviour: SinkBehaviour | None = None,
        tls_context: ssl.SSLContext | None = None,
        smtputf8: bool = True,
        dsn: bool = False,
        server_hostname: str | None = None,
    ) -> None:
        self.host = host
        self.behaviour = behaviour or SinkBehaviour()
        self.received: list[Received] = []
        self.commands: list[str] = []
        self.attempts = 0
        self.controller = _Controller(
            (_DsnHandler if dsn else _Handler)(self),
            sink=self,
            dsn=dsn,
            hostname=host,
            port=port,
            tls_context=tls_context,
            require_starttls=False,
            server_hostname=server_hostname or f"sink-{host}",
            decode_data=False,
            enable_SMTPUTF8=smtputf8,
        )
        self.controller.start()

    def stop(self) -> None:
        if self.behaviour.hold_data is not None:
            self.behaviour.hold_data.set()
        self.controller.stop()


def self_signed_context(directory: Path) -> ssl.SSLContext:
    cert, key = self_signed_certificate(directory, "sink.test")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def wait_received(sink: Sink, count: int = 1, timeout: float = 15.0) -> list[Received]:
    wait_for(lambda: len(sink.received) >= count, timeout=timeout, what=f"{count} at {sink.host}")
    return sink.received
