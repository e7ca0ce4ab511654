"""The servers `bench.compare` runs side by side: gsmtp and what a user would pick instead.

Each peer starts on a free loopback port in its own temporary directory, reports the
PID whose CPU is measured, and (where it keeps mail) how many messages it holds, so the
harness can check that every accepted message was really stored.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

RECIPIENT = "user@bench.test"
REPOSITORY = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
                if probe.recv(64).startswith(b"220"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing answered on port {port} within {timeout}s")


class Peer:
    name = ""
    description = ""

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.workdir = Path()

    def missing(self) -> str | None:
        """Why this peer cannot run here, or None."""
        return None

    def start(self, workdir: Path) -> None:
        raise NotImplementedError

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stored(self) -> int | None:
        """Messages this peer holds durably (None: it keeps nothing to count)."""
        return None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _spawn(self, argv: list[str], log: Path) -> None:
        environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                argv, stdout=out, stderr=out, cwd=self.workdir, env=environment
            )
        wait_listening(self.port, self.process)


class Gsmtp(Peer):
    name = "gsmtp"
    description = "gsmtp (this repository): SQLite spool, fsync before 250, then Maildir delivery"
    workers: int | str = 1  # server.workers ("auto": one per CPU); each has a spool shard

    def start(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        config = workdir / "gsmtp.toml"
        config.write_text(
            "[server]\n"
            'hostname = "gsmtp.bench"\n'
            f'listen = ["127.0.0.1:{self.port}"]\n'
            f"workers = {json.dumps(self.workers)}\n"
            "max_connections = 20000\n"
            "max_connections_per_ip = 20000\n"
            '[spool]\npath = "spool.sqlite"\n'
            '[maildir]\nroot = "mail"\n'
            '[metrics]\nlisten = ""\n'
        )
        gsmtp = [sys.executable, "-m", "gsmtp.cli"]
        for args in (["domain", "add", "bench.test"], ["user", "add", RECIPIENT]):
            subprocess.run([*gsmtp, *args, "-c", str(config)], check=True, capture_output=True)
        self._spawn([*gsmtp, "serve", "-c", str(config)], workdir / "gsmtp.log")

    def stored(self) -> int:
        queued = 0
        for shard in self.workdir.glob("spool*.sqlite"):  # spool.sqlite, spool-1.sqlite, ...
            spool = sqlite3.connect(f"file:{shard}?mode=ro", uri=True)
            queued += spool.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
            spool.close()
        delivered = 0
        box = self.workdir / "mail" / "bench.test" / "user"
        for sub in ("new", "cur"):
            if (box / sub).is_dir():
                delivered += len(os.listdir(box / sub))
        return int(queued) + delivered


class Aiosmtpd(Peer):
    def __init__(self, store: bool) -> None:
        super().__init__()
        self.store = store
        self.name = "aiosmtpd+sqlite" if store else "aiosmtpd-discard"
        self.description = (
            "aiosmtpd 1.4, handler commits to SQLite (WAL, synchronous=FULL, group commit)"
            " before 250"
            if store
            else "aiosmtpd 1.4, handler discards (no durability)"
        )

    def start(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        argv = [sys.executable, "-m", "bench.aiosmtpd_peer", "--listen", f"127.0.0.1:{self.port}"]
        if self.store:
            argv += ["--store", "sqlite", "--db", str(workdir / "mail.sqlite")]
        self._spawn(argv, workdir / "aiosmtpd.log")

    def stored(self) -> int | None:
        if not self.store:
            return None
        db = sqlite3.connect(f"file:{self.workdir / 'mail.sqlite'}?mode=ro", uri=True)
        count = db.execute("SELECT COUNT(*) FROM mail").fetchone()[0]
        db.close()
        return int(count)


class BareSink(Peer):
    name = "gevent-sink"
    description = "a bare gevent SMTP sink that stores nothing (the ceiling)"

    def start(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        argv = [sys.executable, "-m", "bench.sink", "--listen", f"127.0.0.1:{self.port}"]
        self._spawn(argv, workdir / "sink.log")


_POSTFIX_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
default_transport = discard:bench
local_transport = discard:bench
relay_transport = discard:bench
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
default_process_limit = 300
smtpd_relay_restrictions = permit_mynetworks, reject
maillog_file = /dev/stdout
alias_maps =
alias_database =
biff = no
"""


class Postfix(Peer):
    name = "postfix"
    description = (
        "Postfix (Debian), a throw-away instance: queue files fsynced before 250, "
        "delivery to discard"
    )

    def missing(self) -> str | None:
        if not shutil.which("postfix") or not Path("/etc/postfix/master.cf").exists():
            return "postfix is not installed (make bench-deps)"
        if os.geteuid() != 0:
            return "a Postfix instance needs root"
        return None

    def start(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        conf, queue, data = workdir / "conf", workdir / "queue", workdir / "data"
        for directory in (conf, queue, data):
            directory.mkdir(mode=0o755)
        workdir.chmod(0o755)
        shutil.chown(data, user="postfix")
        (conf / "main.cf").write_text(_POSTFIX_MAIN_CF.format(queue=queue, data=data))
        master = Path("/etc/postfix/master.cf").read_text().splitlines()
        smtp = f"127.0.0.1:{self.port} inet n - n - - smtpd"
        master = [smtp if line.startswith("smtp ") else line for line in master]
        (conf / "master.cf").write_text("\n".join(master) + "\n")
        self._conf = conf
        self._spawn(["postfix", "-c", str(conf), "start-fg"], workdir / "maillog")

    @property
    def pid(self) -> int:
        """The master; its children (smtpd, cleanup, qmgr) are summed by the harness."""
        return int((self.workdir / "queue" / "pid" / "master.pid").read_text().split()[0])

    def stored(self) -> int:
        log = (self.workdir / "maillog").read_text(errors="replace")
        return log.count("status=sent (bench)")

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self._conf), "stop"], capture_output=True)
        super().stop()


class SmtpSink(Peer):
    name = "smtp-sink"
    description = "Postfix's smtp-sink test server (stores nothing)"

    def missing(self) -> str | None:
        return None if shutil.which("smtp-sink") else "smtp-sink is not installed (make bench-deps)"

    def start(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        argv = ["smtp-sink", "-c", "-u", "postfix", f"127.0.0.1:{self.port}", "1024"]
        self._spawn(argv, workdir / "smtp-sink.log")


def all_peers() -> list[Peer]:
    return [Gsmtp(), Postfix(), Aiosmtpd(store=True), Aiosmtpd(store=False), BareSink(), SmtpSink()]
