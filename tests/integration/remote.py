"""Real remote parts for delivery tests: dnsmasq as the DNS server, aiosmtpd sinks as MX
hosts on 127.0.0.x, each able to answer 4xx/5xx for its first N attempts, to offer
STARTTLS with a self-signed certificate, to offer DSN (RFC 3461), or to drop idle
connections; every sink records the MAIL and RCPT commands it was sent, parameters and
all, and the verbs of each connection with their times. Scripted raw peers for the
misbehaviour aiosmtpd cannot show; a DNS server that answers SERVFAIL or nothing; an
HTTPS server for well-known files (MTA-STS policies)."""

from __future__ import annotations

import contextlib
import email
import http.server
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult

from tests.integration.harness import (
    GsmtpProcess,
    SmtpWire,
    free_port,
    self_signed_certificate,
    wait_for,
)


def txt_record(name: str, text: str) -> str:
    """The dnsmasq option serving `text` as a TXT record at `name`, split into strings of
    255 bytes as a zone file would (a resolver joins them). No commas (dnsmasq splits
    strings there) nor quotes (on the command line it takes them literally)."""
    assert "," not in text and '"' not in text, text
    strings = ",".join(text[i : i + 255] for i in range(0, len(text), 255))
    return f"--txt-record={name},{strings}"


class Dnsmasq:
    """dnsmasq on 127.0.0.1:<port>, authoritative for the test zones only. Records are
    dnsmasq options: `--mx-host=…`, `--host-record=name,address` (A/AAAA),
    `txt_record(name, text)`; `txt_records` (name → text) adds TXT records too. `port`:
    reuse a stopped server's port, to change records under a running gsmtp."""

    def __init__(
        self,
        records: Sequence[str],
        port: int | None = None,
        txt_records: Mapping[str, str] | None = None,
    ) -> None:
        records = [*records, *(txt_record(n, t) for n, t in (txt_records or {}).items())]
        self.port = port or free_port()
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
    tls: bool  # STARTTLS or implicit TLS
    login: str | None = None  # the user name of a successful AUTH


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
                session.ssl is not None
                or server.transport.get_extra_info("ssl_object") is not None,
                session.auth_data.login.decode() if session.authenticated else None,
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
        # One instance per connection: its verbs, timed, and "<closed>" at the end.
        self._transcript: list[tuple[float, str]] = []
        sink.transcripts.append(self._transcript)
        self._smtp_methods = {
            verb: self._timed(verb, method) for verb, method in self._smtp_methods.items()
        }

    def _timed(self, verb: str, method: Any) -> Any:
        async def run(arg: str | None) -> None:
            self._transcript.append((time.monotonic(), verb))
            await method(arg)

        return run

    def connection_lost(self, error: Exception | None) -> None:
        if not self._transcript or self._transcript[-1][1] != CLOSED:
            self._transcript.append((time.monotonic(), CLOSED))
        super().connection_lost(error)

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


CLOSED = "<closed>"


class Sink:
    """An aiosmtpd MX host on host:port that records what it accepted, every MAIL and
    RCPT line in `commands` ("MAIL FROM:<a@b> SIZE=10 RET=HDRS"), and in `transcripts`
    one list per connection of (monotonic time, verb), ending in CLOSED once closed.
    `idle_timeout`: close a connection that sent no command for so many seconds.
    `options` go to aiosmtpd's Controller: `ssl_context` (implicit TLS), `auth_required`,
    `auth_require_tls`, `authenticator` (see `password_authenticator`)."""

    def __init__(
        self,
        host: str,
        port: int,
        behaviour: SinkBehaviour | None = None,
        tls_context: ssl.SSLContext | None = None,
        smtputf8: bool = True,
        dsn: bool = False,
        server_hostname: str | None = None,
        idle_timeout: float = 300.0,
        **options: Any,
    ) -> None:
        self.host = host
        self.behaviour = behaviour or SinkBehaviour()
        self.received: list[Received] = []
        self.commands: list[str] = []
        self.transcripts: list[list[tuple[float, str]]] = []
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
            timeout=idle_timeout,
            **options,
        )
        self.controller.start()
        # Controller.start() proves the server up with a connection of its own.
        wait_for(
            lambda: all(t and t[-1][1] == CLOSED for t in list(self.transcripts)),
            what="the start-up probe to close",
        )
        self.transcripts.clear()

    def verbs(self) -> list[list[str]]:
        """The verbs of each connection so far, in order."""
        return [[verb for _, verb in list(transcript)] for transcript in list(self.transcripts)]

    def stop(self) -> None:
        if self.behaviour.hold_data is not None:
            self.behaviour.hold_data.set()
        self.controller.stop()


def password_authenticator(username: str, password: str) -> Any:
    """An aiosmtpd authenticator accepting one user name and password (PLAIN, LOGIN)."""

    def check(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        good = (data.login, data.password) == (username.encode(), password.encode())
        return AuthResult(success=good, handled=False, auth_data=data)

    return check


def self_signed_context(directory: Path) -> ssl.SSLContext:
    cert, key = self_signed_certificate(directory, "sink.test")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def start_peer(peers: list[ScriptedPeer], host: str, port: int, script: Any) -> ScriptedPeer:
    peer = ScriptedPeer(host, port, script)
    peers.append(peer)
    return peer


def recipient_row(gsmtp: GsmtpProcess, address: str) -> tuple[Any, ...] | None:
    rows = gsmtp.spool_rows(
        "SELECT status, attempts, last_error FROM recipients WHERE address = ?", address
    )
    return rows[0] if rows else None


def first_attempt(gsmtp: GsmtpProcess, address: str, timeout: float = 20) -> tuple[Any, ...]:
    """The recipient's row once an attempt has been recorded."""
    return wait_for(  # type: ignore[no-any-return]
        lambda: (row := recipient_row(gsmtp, address)) and row[1] >= 1 and row,
        timeout=timeout,
        what=f"an attempt for {address}",
    )


def wait_received(sink: Sink, count: int = 1, timeout: float = 15.0) -> list[Received]:
    wait_for(lambda: len(sink.received) >= count, timeout=timeout, what=f"{count} at {sink.host}")
    return sink.received


def start_sink(sinks: dict[str, Sink], host: str, port: int, **kwargs: Any) -> Sink:
    sink = Sink(host, port, **kwargs)
    sinks[host] = sink
    return sink


def send(gsmtp: GsmtpProcess, sender: str, recipients: list[str], subject: str = "hello") -> str:
    """One message through gsmtp; returns its queue id."""
    with SmtpWire(gsmtp.port) as wire:
        wire.read_reply()
        wire.command("EHLO client.example")
        assert wire.command(f"MAIL FROM:<{sender}>").startswith("250")
        for recipient in recipients:
            reply = wire.command(f"RCPT TO:<{recipient}>")
            assert reply.startswith("250"), reply
        assert wire.command("DATA").startswith("354")
        headers = f"Subject: {subject}\r\nMessage-ID: <{subject}@client.example>\r\n"
        wire.send(headers.encode() + b"\r\nbody\r\n.\r\n")
        reply = wire.read_reply()[0]
        assert reply.startswith("250 2.0.0"), reply
        return reply.rsplit(" ", 1)[1]


def bounce_for(gsmtp: GsmtpProcess, user: str = "jones@foo.com") -> Message:
    (file,) = wait_for(lambda: gsmtp.maildir_files(user), timeout=20, what="a bounce")
    return email.message_from_bytes(file.read_bytes())


def delivery_status(bounce: Message) -> list[Message]:
    """The per-recipient blocks of the message/delivery-status part."""
    report = [
        part for part in bounce.walk() if part.get_content_type() == "message/delivery-status"
    ]
    assert len(report) == 1
    payload = report[0].get_payload()
    assert isinstance(payload, list)
    return payload[1:]


class Conversation:
    """One connection to a ScriptedPeer: the script reads lines and writes replies."""

    def __init__(self, sock: socket.socket, stopping: threading.Event) -> None:
        self.sock = sock
        self.commands: list[str] = []  # every line read as a command
        self.data = b""  # message data read after a 354
        self.after_starttls = b""  # bytes the client sent once STARTTLS was answered
        self.finished = threading.Event()  # the script is done and the socket closed
        self._buffer = b""
        self._stopping = stopping

    def reply(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self._buffer += chunk
        return bool(chunk)

    def read_line(self) -> str:
        """The next command line without CRLF; "" once the client has closed."""
        while b"\r\n" not in self._buffer:
            if not self._fill():
                return ""
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        text = line.decode("utf-8", "replace")
        self.commands.append(text)
        return text

    def read_until(self, marker: bytes) -> bytes:
        while marker not in self._buffer:
            if not self._fill():
                raise AssertionError(f"closed before {marker!r}: {self._buffer!r}")
        head, self._buffer = self._buffer.split(marker, 1)
        return head + marker

    def hold(self) -> None:
        """Answer nothing more; keep the connection until the peer is stopped."""
        self._stopping.wait()

    def drain(self) -> bytes:
        """Everything the client sends until it closes (or the peer is stopped)."""
        self.sock.settimeout(0.2)
        received = self._buffer
        while not self._stopping.is_set():
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            received += chunk
        return received


Script = Callable[[Conversation], None]


class ScriptedPeer:
    """A raw SMTP peer on host:port whose every connection is played by `script` in a
    thread: for what aiosmtpd cannot be made to do (refuse EHLO, leave out 8BITMIME,
    withhold a reply, push plaintext behind its STARTTLS reply, insist on pipelining).
    A failing script is recorded in `errors`."""

    def __init__(self, host: str, port: int, script: Script) -> None:
        self.conversations: list[Conversation] = []
        self.errors: list[BaseException] = []
        self._script = script
        self._stopping = threading.Event()
        self._listener = socket.create_server((host, port))
        self._listener.settimeout(0.1)
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(30)
            conversation = Conversation(sock, self._stopping)
            self.conversations.append(conversation)
            thread = threading.Thread(target=self._play, args=(conversation,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _play(self, conversation: Conversation) -> None:
        try:
            self._script(conversation)
        except Exception as error:
            self.errors.append(error)
        finally:
            conversation.sock.close()
            conversation.finished.set()

    def stop(self) -> None:
        self._stopping.set()
        for conversation in self.conversations:
            with contextlib.suppress(OSError):
                conversation.sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()


def ehlo_reply(*extensions: str) -> str:
    lines = ["peer.test greets you", *extensions]
    return "".join(
        f"250{'-' if i < len(lines) - 1 else ' '}{line}\r\n" for i, line in enumerate(lines)
    )


def accept_transaction(
    conversation: Conversation, rcpt_replies: dict[str, str] | None = None
) -> None:
    """MAIL, RCPT..., DATA, the data and QUIT, one command at a time."""
    replies = rcpt_replies or {}
    while line := conversation.read_line():
        verb = line[:4].upper()
        if verb == "MAIL":
            conversation.reply("250 2.1.0 Ok\r\n")
        elif verb == "RCPT":
            address = line.partition("<")[2].partition(">")[0]
            conversation.reply(replies.get(address, "250 2.1.5 Ok") + "\r\n")
        elif verb == "DATA":
            conversation.reply("354 Go ahead\r\n")
            conversation.data = conversation.read_until(b"\r\n.\r\n")
            conversation.reply("250 2.0.0 Stored\r\n")
        elif verb == "QUIT":
            conversation.reply("221 2.0.0 Bye\r\n")
            return
        else:
            conversation.reply("502 5.5.1 Not here\r\n")


class BrokenDns:
    """A DNS server on 127.0.0.1 (UDP) that answers SERVFAIL for names ending in
    `servfail` and never answers any other: the two temporary DNS failures."""

    def __init__(self, servfail: str) -> None:
        self.queries: list[str] = []
        self._servfail = servfail
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self._stopping = threading.Event()
        self.port = int(self._sock.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import dns.message
        import dns.rcode

        while not self._stopping.is_set():
            try:
                data, client = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            name = query.question[0].name.to_text(omit_final_dot=True)
            self.queries.append(name)
            if name.endswith(self._servfail):
                response = dns.message.make_response(query)
                response.set_rcode(dns.rcode.SERVFAIL)
                self._sock.sendto(response.to_wire(), client)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._sock.close()


class WellKnownServer:
    """An HTTPS server on host:port (stdlib http.server + ssl, threads) with a
    certificate from the test CA: GET answers `files[(host name from Host:, path)]`
    with `content_type`; a missing file is 404. `redirect`: answer every request with a
    301 to it. Each request's (host, path) is recorded in `requests`."""

    def __init__(self, host: str, port: int, cert: Path, key: Path) -> None:
        self.files: dict[tuple[str, str], bytes] = {}
        self.content_type = "text/plain; charset=utf-8"
        self.redirect = ""
        self.requests: list[tuple[str, str]] = []
        context = tls_context_for(cert, key)
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.headers.get("Host", "").split(":")[0]
                owner.requests.append((name, self.path))
                if owner.redirect:
                    self.send_response(301)
                    self.send_header("Location", owner.redirect)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = owner.files.get((name, self.path))
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", owner.content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def tls_context_for(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context with this certificate (e.g. from TestCertificateAuthority.issue)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context
