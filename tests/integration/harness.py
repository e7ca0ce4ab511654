"""A real `gsmtp serve` in a subprocess with its own config, spool and Maildirs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apsw

from bench.ports import free_port
from gsmtp import db
from gsmtp.accounts import Accounts
from gsmtp.config import load

REPOSITORY = Path(__file__).parents[2]
LOCAL_DOMAIN = "foo.com"
USERS = ("jones@foo.com", "brown@foo.com")


def _checkout_path() -> str:
    root = str(Path(__file__).resolve().parents[2])
    inherited = os.environ.get("PYTHONPATH")
    return f"{root}{os.pathsep}{inherited}" if inherited else root


def open_files(pid: int) -> list[str]:
    """What the descriptors of process `pid` name (a deleted file ends in " (deleted)")."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return links


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll with a deadline: no sleep-and-hope."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def environment() -> dict[str, str]:
    """The environment for a gsmtp subprocess: the code under test, whatever the working
    directory (an installed gsmtp elsewhere must not stand in for it)."""
    paths = [str(REPOSITORY), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table: [delivery] tls_policy = {"a.test" = "verify"}
        return "{" + ", ".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


# What systemd does between fork and exec for socket activation: the socket on fd 3,
# LISTEN_FDS=1 and LISTEN_PID set to the PID the server will have (exec keeps it).
_SOCKET_ACTIVATION = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execv(sys.argv[2], sys.argv[2:])
"""


_LISTEN_KEYS = (
    ("server", "listen"),
    ("submission", "listen"),
    ("submission", "tls_listen"),
    ("metrics", "listen"),
)


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)]


class GsmtpProcess:
    """Start, stop, kill -9 and restart one gsmtp; run its CLI against the same config."""

    def __init__(self, directory: Path, settings: dict[str, dict[str, Any]] | None = None) -> None:
        self.directory = directory
        self.port = free_port()
        self.metrics_port = free_port()
        self.moved: dict[int, int] = {}  # ports chosen -> ports moved to (`start`)
        sections: dict[str, dict[str, Any]] = {
            "server": {
                "hostname": "mx.foo.com",
                "listen": [f"127.0.0.1:{self.port}"],
                # One process unless a test asks for more: most tests read one spool.
                "workers": 1,
                "trusted_networks": ["127.0.0.2/32"],
                "timeout": "30s",
                "shutdown_grace": "5s",
            },
            "spool": {"path": "spool.sqlite"},
            "maildir": {"root": "mail"},
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
            "delivery": {"retry": ["1s"]},
        }
        for name, values in (settings or {}).items():
            sections.setdefault(name, {}).update(values)
        lines = []
        for name, values in sections.items():
            lines.append(f"[{name}]")
            lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
        # A proxy_protocol listener greets only after a PROXY header.
        self.proxy_protocol = bool(sections["server"].get("proxy_protocol", False))
        # Several workers: started once the supervisor says every one is ready.
        self.started_event = (
            b'"event":"server_started"'
            if sections["server"]["workers"] == 1
            else b'"event":"workers_started"'
        )
        self.config = directory / "gsmtp.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.spool_path = directory / sections["spool"]["path"]  # an absolute path wins
        self.maildir = directory / "mail"
        self.log_path = directory / "gsmtp.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        # Set before start(): more environment (NOTIFY_SOCKET…), and a listening
        # socket handed over as systemd's socket activation does (fd 3, LISTEN_FDS=1,
        # LISTEN_PID = the server's own PID).
        self.env: dict[str, str] = {}
        self.listen_socket: socket.socket | None = None
        # Set before start(): run this instead of `gsmtp serve` (a script building the
        # application with a part of a test's own), the config's path appended.
        self.command: list[str] | None = None

    # -- CLI --------------------------------------------------------------------------

    def cli(
        self, *args: str, stdin: str | None = None, check: bool = True, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "gsmtp.cli", *args, "-c", str(self.config.resolve())],
            input=stdin,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
            env=environment(),
        )
        if check and result.returncode != 0:
            raise AssertionError(f"gsmtp {' '.join(args)} failed: {result.stderr}")
        return result

    def add_default_accounts(self) -> None:
        """foo.com and its users, added in this process through the code `gsmtp domain
        add` and `gsmtp user add` run (tests/integration/test_cli.py runs those commands
        themselves): three CLI processes per server cost about a second, for every
        integration test."""
        connection = db.connect(load(self.config).spool.path)
        try:
            accounts = Accounts(connection)
            accounts.add_domain(LOCAL_DOMAIN)
            for user in USERS:
                accounts.add_user(user)
        finally:
            connection.close()

    # -- process ----------------------------------------------------------------------

    def start(self) -> None:
        """Start and wait for the greeting. free_port() only finds a port that was free
        a moment ago: when another process took it meanwhile ("Address already in
        use"), move to new ports and start again, rather than fail a test on a race of
        the machine's."""
        for attempt in range(3):
            try:
                self._start_once()
                return
            except AssertionError as error:
                if "Address already in use" not in str(error) or attempt == 2:
                    raise
                self._move_ports()

    def _move_ports(self) -> None:
        """Every loopback port the configuration listens on to a new one (the one taken
        may be any of them: SMTP, submission, implicit TLS, metrics); `port_of` maps a
        port a test chose to the one in use."""
        text = self.config.read_text()
        settings = tomllib.loads(text)
        listening = [
            address
            for section, key in _LISTEN_KEYS
            for address in _as_list(settings.get(section, {}).get(key, []))
            if address.startswith("127.0.0.1:")
        ]
        for address in listening:
            old, new = int(address.rpartition(":")[2]), free_port()
            text = text.replace(f'"127.0.0.1:{old}"', f'"127.0.0.1:{new}"')
            first = next((k for k, v in self.moved.items() if v == old), old)
            self.moved[first] = new
            for name in ("port", "metrics_port"):
                if getattr(self, name) == old:
                    setattr(self, name, new)
        self.config.write_text(text)

    def port_of(self, chosen: int) -> int:
        """The port listening in place of `chosen` (moved if `chosen` was taken)."""
        return self.moved.get(chosen, chosen)

    def _start_once(self) -> None:
        log = self.log_path.open("ab")
        self._log_offset = log.tell()
        command = [sys.executable, "-m", "gsmtp.cli", "serve", "-c", str(self.config)]
        if self.command is not None:
            command = [*self.command, str(self.config)]
        pass_fds: tuple[int, ...] = ()
        if self.listen_socket is not None:
            fd = self.listen_socket.fileno()
            command = [sys.executable, "-c", _SOCKET_ACTIVATION, str(fd), *command]
            pass_fds = (fd,)
        self.process = subprocess.Popen(
            command,
            stdout=log,
            stderr=log,
            cwd=self.directory,
            env={**environment(), **self.env},
            pass_fds=pass_fds,
        )
        log.close()
        wait_for(self._accepting, timeout=20, what=f"gsmtp to listen on {self.port}")

    def _accepting(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"gsmtp exited {self.process.returncode}: {self.log()}")
        # Our own process must say so: a 220 alone may come from another test run's
        # server that took the same free port first (ours then failed to listen).
        if self.started_event not in self.log_path.read_bytes()[self._log_offset :]:
            return False
        try:
            # Long enough for a held greeting (server.greet_wait).
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as probe:
                if self.proxy_protocol:
                    probe.sendall(b"PROXY UNKNOWN\r\n")
                return probe.recv(100).startswith(b"220")
        except OSError:
            return False

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def freeze(self) -> None:
        """SIGSTOP, and wait until every thread of the process has stopped: from then
        on the spool shows a fixed state."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        tasks = Path(f"/proc/{self.process.pid}/task")

        def stopped() -> bool:
            states = []
            for task in tasks.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    # The state follows the command name, which is in parentheses.
                    states.append((task / "stat").read_text().rpartition(")")[2].split()[0])
            return bool(states) and all(state in ("T", "t") for state in states)

        wait_for(stopped, timeout=10, what="the process to stop")

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)

    def wait(self, timeout: float = 30) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def kill9(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill9()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics(self) -> dict[str, float]:
        """/metrics as {sample name with its labels: value}."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as page:
            text = page.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def events(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        """The JSON log lines of event `name` whose fields include `fields`."""
        found = []
        for line in self.log().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == name and fields.items() <= record.items():
                found.append(record)
        return found

    # -- what is on disk --------------------------------------------------------------

    def maildir_files(self, address: str) -> list[Path]:
        local, _, domain = address.partition("@")
        box = self.maildir / domain / local
        files: list[Path] = []
        for sub in ("new", "cur"):
            if (box / sub).is_dir():
                files += sorted((box / sub).iterdir())
        return files

    def spool_rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        connection = apsw.Connection(str(self.spool_path), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            return list(connection.execute(sql, params).fetchall())
        finally:
            connection.close()


class SmtpWire:
    """A raw-socket `dialog.Wire`: sends exact bytes, reads whole replies."""

    def __init__(
        self, port: int, host: str = "127.0.0.1", source: str | None = None, timeout: float = 10
    ) -> None:
        # create_connection picks the family from the host ("::1" is IPv6).
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_reply(self) -> list[str]:
        lines: list[str] = []
        while True:
            while b"\r\n" not in self._buffer:
                try:
                    chunk = self.sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    assert not lines and not self._buffer, (
                        f"closed mid-reply: {lines!r} {self._buffer!r}"
                    )
                    return []
                self._buffer += chunk
            line, self._buffer = self._buffer.split(b"\r\n", 1)
            text = line.decode("utf-8", "replace")
            lines.append(text)
            if len(text) < 4 or text[3] == " ":
                return lines

    def command(self, line: str) -> str:
        self.send(line.encode() + b"\r\n")
        return self.read_reply()[-1]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SmtpWire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def environment_has(command: str) -> bool:
    return any(
        os.access(os.path.join(d, command), os.X_OK) for d in os.environ.get("PATH", "").split(":")
    )


def self_signed_certificate(directory: Path, common_name: str) -> tuple[Path, Path]:
    """A throw-away certificate and key (PEM) made with openssl, for TLS tests."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            f"/CN={common_name}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


class TestCertificateAuthority:
    """A throw-away certificate authority made with openssl, for tests of verified TLS
    (MTA-STS, per-destination `verify`, a smarthost): `ca` is the file a client trusts
    (`delivery.ca_file`); `issue(names)` makes a certificate valid for those DNS names
    (subjectAltName) signed by it, and returns (certificate, key) paths."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca, self._ca_key = directory / "ca.pem", directory / "ca-key.pem"
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=gsmtp test CA", "-keyout", self._ca_key, "-out", self.ca,
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        self._issued = 0

    def issue(self, *names: str) -> tuple[Path, Path]:
        """A leaf certificate for `names` (the first is also the CN) and its key."""
        self._issued += 1
        stem = self.directory / f"leaf-{self._issued}"
        cert, key, request = (
            stem.with_suffix(".pem"),
            stem.with_suffix(".key"),
            stem.with_suffix(".csr"),
        )
        extensions = stem.with_suffix(".ext")
        alt = ",".join(f"DNS:{name}" for name in names)
        extensions.write_text(f"subjectAltName={alt}\nextendedKeyUsage=serverAuth\n")
        _openssl(
            "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={names[0]}",
            "-keyout", key, "-out", request,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", request, "-CA", self.ca, "-CAkey", self._ca_key,
            "-CAcreateserial", "-days", "1", "-extfile", extensions, "-out", cert,
        )  # fmt: skip
        return cert, key

    def server_context(self, *names: str) -> ssl.SSLContext:
        """A server-side TLS context with a new certificate for `names`."""
        cert, key = self.issue(*names)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        return context


def _openssl(*arguments: str | Path) -> None:
    subprocess.run(["openssl", *map(str, arguments)], check=True, capture_output=True, timeout=60)


class CountingClock:
    """Each reading one second later than the last: time passes with every wait."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now
