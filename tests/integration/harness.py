"""A real `gsmtp serve` in a subprocess with its own config, spool and Maildirs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apsw

LOCAL_DOMAIN = "foo.com"
USERS = ("jones@foo.com", "brown@foo.com")


def _checkout_path() -> str:
    root = str(Path(__file__).resolve().parents[2])
    inherited = os.environ.get("PYTHONPATH")
    return f"{root}{os.pathsep}{inherited}" if inherited else root


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


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


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class GsmtpProcess:
    """Start, stop, kill -9 and restart one gsmtp; run its CLI against the same config."""

    def __init__(self, directory: Path, settings: dict[str, dict[str, Any]] | None = None) -> None:
        self.directory = directory
        self.port = free_port()
        self.metrics_port = free_port()
        sections: dict[str, dict[str, Any]] = {
            "server": {
                "hostname": "mx.foo.com",
                "listen": [f"127.0.0.1:{self.port}"],
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
        self.config = directory / "gsmtp.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.spool_path = directory / "spool.sqlite"
        self.maildir = directory / "mail"
        self.log_path = directory / "gsmtp.log"
        self.process: subprocess.Popen[bytes] | None = None

    # -- CLI --------------------------------------------------------------------------

    def cli(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "gsmtp.cli", *args, "-c", str(self.config)],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": _checkout_path()},
        )
        if check and result.returncode != 0:
            raise AssertionError(f"gsmtp {' '.join(args)} failed: {result.stderr}")
        return result

    def add_default_accounts(self) -> None:
        self.cli("domain", "add", LOCAL_DOMAIN)
        for user in USERS:
            self.cli("user", "add", user)

    # -- process ----------------------------------------------------------------------

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gsmtp.cli", "serve", "-c", str(self.config)],
            stdout=log,
            stderr=log,
            cwd=self.directory,
            # The gsmtp under test, not whichever one the virtualenv has installed: run
            # from its own directory, `-m` would not find this checkout.
            env={**os.environ, "PYTHONPATH": _checkout_path()},
        )
        log.close()
        wait_for(self._accepting, timeout=20, what=f"gsmtp to listen on {self.port}")

    def _accepting(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"gsmtp exited {self.process.returncode}: {self.log()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as probe:
                return probe.recv(100).startswith(b"220")
        except OSError:
            return False

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

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
