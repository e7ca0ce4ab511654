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
from typing import Any

from bench.ports import free_port

RECIPIENT = "user@bench.test"
REPOSITORY = Path(__file__).resolve().parents[1]
# The end-to-end cells spread their messages over MAILBOXES recipients box0@… box99@…
# (bench.load --mailboxes): local ones in LOCAL_DOMAIN, relayed ones in RELAY_DOMAIN.
MAILBOXES = 100
LOCAL_DOMAIN = "bench.test"
RELAY_DOMAIN = "sink.test"
E2E_LOCAL = f"box@{LOCAL_DOMAIN}"
E2E_RELAY = f"box@{RELAY_DOMAIN}"
# The relay cells' MX: another loopback address than the peers listen on.
SINK_HOST = "127.0.0.2"
# bench.load --record: one line per message answered 250, its number in RECORD_WIDTH
# digits (here, not in bench.load, which monkey-patches whoever imports it).
RECORD_WIDTH = 8
RECORD_BYTES = RECORD_WIDTH + 1  # the number and "\n"


def wait_listening(
    port: int, process: subprocess.Popen[bytes], timeout: float = 20, host: str = "127.0.0.1"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=1) as probe:
                if probe.recv(64).startswith(b"220"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing answered on port {port} within {timeout}s")


def load_argv(
    port: int, *, connections: int, messages: int, size: int, to: str, options: list[str]
) -> list[str]:
    """The command line of bench.load against 127.0.0.1:`port`, printing its JSON result.
    `options`: --duration, --total, --mailboxes, --record, …"""
    return [
        sys.executable,
        "-m",
        "bench.load",
        "--json",
        "--quiet",
        "--target",
        f"127.0.0.1:{port}",
        "-c",
        str(connections),
        "-m",
        str(messages),
        "-s",
        str(size),
        "--to",
        to,
        *options,
    ]


def load_result(stdout: str, stderr: str) -> dict[str, Any]:
    """bench.load's JSON result from its output (it fails loudly if there is none)."""
    if not stdout.strip():
        raise RuntimeError(f"bench.load failed: {stderr.strip()[-300:]}")
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result


def run_load(
    port: int,
    *,
    connections: int,
    messages: int,
    size: int,
    to: str,
    options: list[str],
    timeout: float,
) -> dict[str, Any]:
    """bench.load against 127.0.0.1:`port` in a process of its own (it monkey-patches
    gevent); its JSON result. `options`: --duration, --total, --mailboxes, …"""
    argv = load_argv(
        port, connections=connections, messages=messages, size=size, to=to, options=options
    )
    output = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    return load_result(output.stdout, output.stderr)


def maildir_state(boxes: list[Path]) -> tuple[int, float]:
    """Files in the new/ and cur/ of `boxes`, and the last time one was linked into a
    new/ (its directory's mtime, wall clock; 0 if none)."""
    files, last = 0, 0.0
    for box in boxes:
        for sub in ("new", "cur"):
            try:
                files += len(os.listdir(box / sub))
                if sub == "new":
                    last = max(last, (box / sub).stat().st_mtime)
            except FileNotFoundError:
                continue
    return files, last


class Peer:
    name = ""
    description = ""
    durable = False  # fsyncs what it accepted before answering 250

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

    def delivered(self) -> tuple[int, float]:
        """End-to-end local cells: files in the e2e mailboxes, and when the last one came."""
        return maildir_state(self.mailboxes())

    def mailboxes(self) -> list[Path]:
        return []

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


def gsmtp_has_setting(section: str, key: str) -> bool:
    """Whether this checkout's gsmtp knows `[section] key` (cells for settings that are
    not built yet are skipped, and work once they are)."""
    import dataclasses

    from gsmtp import config

    sections: dict[str, Any] = config._SECTIONS
    cls = sections.get(section)
    return cls is not None and key in {f.name for f in dataclasses.fields(cls)}


class Gsmtp(Peer):
    description = "gsmtp (this repository): SQLite spool, fsync before 250, then Maildir delivery"
    durable = True

    def __init__(
        self,
        name: str = "gsmtp",
        *,
        workers: int | None = None,
        e2e: str = "",
        smarthost: tuple[str, int] | None = None,
    ) -> None:
        """`workers` is written only if gsmtp has `server.workers`; `e2e` "local" adds
        the MAILBOXES users, "relay" sends what is not local to `smarthost`."""
        super().__init__()
        self.name = name
        self.workers = workers
        self.e2e = e2e
        self.smarthost = smarthost
        if workers is not None:
            self.description = f"gsmtp with server.workers = {workers}"
        if e2e == "local":
            self.description = (
                f"gsmtp, Maildir delivery to {MAILBOXES} local mailboxes"
                " (file and new/ fsynced, in batches)"
            )
        elif e2e == "relay" and smarthost:
            self.description = (
                f"gsmtp relaying every message to the sink at {smarthost[0]}:{smarthost[1]}"
                " (delivery.smarthost: this machine has no DNS for the sink's domain)"
            )

    def missing(self) -> str | None:
        if self.workers is not None and not gsmtp_has_setting("server", "workers"):
            return "this gsmtp has no server.workers setting yet"
        return None

    def start(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        config = workdir / "gsmtp.toml"
        server = (
            "[server]\n"
            'hostname = "gsmtp.bench"\n'
            f'listen = ["127.0.0.1:{self.port}"]\n'
            "max_connections = 20000\n"
            "max_connections_per_ip = 20000\n"
            'trusted_networks = ["127.0.0.0/8"]\n'
        )
        if self.workers is not None and gsmtp_has_setting("server", "workers"):
            server += f"workers = {self.workers}\n"
        # An operator expecting this load lets one destination (the one domain of the
        # mailboxes, the one sink) run as many deliveries as Postfix is allowed below.
        delivery = "[delivery]\nmax_per_domain = 100\n"
        if self.smarthost:
            delivery += f'smarthost = "{self.smarthost[0]}:{self.smarthost[1]}"\n'
        config.write_text(
            server + '[spool]\npath = "spool.sqlite"\n[maildir]\nroot = "mail"\n'
            '[metrics]\nlisten = ""\n' + delivery
        )
        users = [RECIPIENT]
        if self.e2e == "local":
            users += [f"box{n}@{LOCAL_DOMAIN}" for n in range(MAILBOXES)]
        script = (
            "import sys\n"
            "from gsmtp import db\n"
            "from gsmtp.accounts import Accounts\n"
            "accounts = Accounts(db.connect(sys.argv[1]))\n"
            "accounts.add_domain(sys.argv[2])\n"
            "for user in sys.argv[3:]:\n"
            "    accounts.add_user(user)\n"
        )
        environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
        subprocess.run(
            [sys.executable, "-c", script, str(workdir / "spool.sqlite"), LOCAL_DOMAIN, *users],
            check=True,
            capture_output=True,
            env=environment,
        )
        gsmtp = [sys.executable, "-m", "gsmtp.cli"]
        self._spawn([*gsmtp, "serve", "-c", str(config)], workdir / "gsmtp.log")

    def queued(self) -> int:
        """Messages in every spool shard (`spool.sqlite`, `spool-1.sqlite`, …)."""
        queued = 0
        for path in self.workdir.glob("spool*.sqlite"):
            spool = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                queued += spool.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
            except sqlite3.OperationalError as error:
                if "no such table" not in str(error):  # a shard being created: no table yet
                    raise  # never read as empty: a shard being recovered after a kill -9
            finally:
                spool.close()
        return queued

    def stored(self) -> int:
        files, _ = maildir_state([self.workdir / "mail" / LOCAL_DOMAIN / "user"])
        return self.queued() + files

    def mailboxes(self) -> list[Path]:
        return [self.workdir / "mail" / LOCAL_DOMAIN / f"box{n}" for n in range(MAILBOXES)]


class Aiosmtpd(Peer):
    def __init__(self, store: bool) -> None:
        super().__init__()
        self.store = store
        self.name = "aiosmtpd+sqlite" if store else "aiosmtpd-discard"
        self.durable = store
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

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__()
        self.host = host

    def start(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port(self.host)
        argv = [sys.executable, "-m", "bench.sink", "--listen", f"{self.host}:{self.port}"]
        environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
        with (workdir / "sink.log").open("wb") as out:
            self.process = subprocess.Popen(
                argv, stdout=out, stderr=out, cwd=workdir, env=environment
            )
        wait_listening(self.port, self.process, host=self.host)

    def received(self) -> tuple[int, float]:
        """Messages the sink received, and when the last one came (wall clock)."""
        with socket.create_connection((self.host, self.port), timeout=10) as sock:
            answer = b""
            sock.sendall(b"XSTA\r\nQUIT\r\n")
            while b"221" not in answer:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        line = next(x for x in answer.decode().split("\r\n") if x.startswith("250 "))
        count, last = line.split()[1:3]
        return int(count), float(last)


# Configured as its operators would for a load test: no input throttle (in_flow_delay),
# processes enough for every connection, no per-client rate limits.
_POSTFIX_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
in_flow_delay = 0s
default_process_limit = 300
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
smtpd_client_recipient_rate_limit = 0
smtpd_client_new_tls_session_rate_limit = 0
smtpd_client_auth_rate_limit = 0
smtpd_relay_restrictions = permit_mynetworks, reject
maillog_file = /dev/stdout
biff = no
{delivery}"""

_POSTFIX_DISCARD = """\
mydestination =
default_transport = discard:bench
local_transport = discard:bench
relay_transport = discard:bench
alias_maps =
alias_database =
"""

# local(8) delivers to an alias whose target ends in "/" as a Maildir, with the rights
# of default_privs (the alias table is root's): how an operator gives local(8)
# mailboxes without a Unix user each. One recipient per delivery (Postfix's default).
_POSTFIX_LOCAL = """\
mydestination = {domain}
local_transport = local
default_transport = discard:bench
relay_transport = discard:bench
alias_maps = texthash:{aliases}
alias_database =
local_recipient_maps = $alias_maps
default_privs = nobody
local_destination_concurrency_limit = 100
"""

_POSTFIX_RELAY = """\
mydestination =
local_transport = discard:bench
default_transport = smtp
relay_transport = smtp
relayhost = [{host}]:{port}
alias_maps =
alias_database =
smtp_destination_concurrency_limit = 100
"""


class Postfix(Peer):
    """A throw-away Postfix instance (its own config, queue and master) that discards
    what it accepted, delivers it with local(8) into Maildirs ("local"), or relays it
    to a sink ("relay")."""

    durable = True

    def __init__(self, mode: str = "discard", sink: tuple[str, int] | None = None) -> None:
        super().__init__()
        self.mode = mode
        self.sink = sink
        self.name = "postfix" if mode == "discard" else f"postfix-{mode}"
        self.description = {
            "discard": "Postfix (Debian), a throw-away instance: queue files fsynced before"
            " 250, delivery to discard",
            "local": f"Postfix (Debian), local(8) Maildir delivery to {MAILBOXES} mailboxes"
            " (aliases to Maildir paths; the file fsynced, new/ not),"
            " local_destination_concurrency_limit = 100",
            "relay": "Postfix (Debian) relaying every message to the sink (relayhost),"
            " smtp_destination_concurrency_limit = 100, connection cache on demand",
        }[mode]

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
            directory.mkdir()
            directory.chmod(0o755)  # whatever the umask: Postfix's daemons read them
        workdir.chmod(0o755)
        shutil.chown(data, user="postfix")
        if self.mode == "local":
            mail = workdir / "mail"
            mail.mkdir()
            mail.chmod(0o755)
            shutil.chown(mail, user="nobody")
            aliases = conf / "aliases"
            aliases.write_text("".join(f"box{n} {mail}/box{n}/\n" for n in range(MAILBOXES)))
            delivery = _POSTFIX_LOCAL.format(domain=LOCAL_DOMAIN, aliases=aliases)
        elif self.mode == "relay":
            assert self.sink is not None
            delivery = _POSTFIX_RELAY.format(host=self.sink[0], port=self.sink[1])
        else:
            delivery = _POSTFIX_DISCARD
        (conf / "main.cf").write_text(
            _POSTFIX_MAIN_CF.format(queue=queue, data=data, delivery=delivery)
        )
        master = Path("/etc/postfix/master.cf").read_text().splitlines()
        smtp = f"127.0.0.1:{self.port} inet n - n - - smtpd"
        master = [smtp if line.split()[:2] == ["smtp", "inet"] else line for line in master]
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

    def mailboxes(self) -> list[Path]:
        return [self.workdir / "mail" / f"box{n}" for n in range(MAILBOXES)]

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
