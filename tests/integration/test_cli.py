"""The gsmtp command: config checks, accounts, queue inspection beside a running server."""

from __future__ import annotations

import json
import smtplib
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.integration.harness import GsmtpProcess, SmtpWire, environment, wait_for
from tests.integration.remote import bounce_for, delivery_status

ROOT = Path(__file__).parents[2]


def run(
    *args: str, cwd: Path | None = None, gsmtp_config: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess; $GSMTP_CONFIG is set to `gsmtp_config`, or absent."""
    env = environment()
    env.pop("GSMTP_CONFIG", None)
    if gsmtp_config is not None:
        env["GSMTP_CONFIG"] = gsmtp_config
    return subprocess.run(
        [sys.executable, "-m", "gsmtp.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
    )


def test_check_config_prints_the_effective_configuration() -> None:
    result = run("check-config", "-c", str(ROOT / "configuration.toml"))
    assert result.returncode == 0, result.stderr
    assert 'hostname = "mail.example.test"' in result.stdout
    assert 'max_message_size = "35MB"' in result.stdout
    assert 'retry = ["1m", "5m", "15m", "30m", "1h"]' in result.stdout
    assert 'greet_wait = "0s"' in result.stdout


def test_check_config_shows_every_key_of_the_shipped_file() -> None:
    """Every key the shipped file sets (it sets every one, at its default) is in
    check-config's output, section by section, and no other: a key added to the
    configuration and left out of check-config fails here."""
    result = run("check-config", "-c", str(ROOT / "configuration.toml"))
    assert result.returncode == 0, result.stderr
    shown = tomllib.loads(result.stdout)
    shipped = tomllib.loads((ROOT / "configuration.toml").read_text())
    assert {name: set(keys) for name, keys in shown.items()} == {
        name: set(keys) for name, keys in shipped.items()
    }


def test_check_config_names_the_bad_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\ntimeout = "forever"\n')
    result = run("-c", str(bad), "check-config")
    assert result.returncode != 0
    assert f"{bad}: [server] timeout: expected a duration" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_defaults_to_gsmtp_config_then_cwd(tmp_path: Path) -> None:
    """-c wins over $GSMTP_CONFIG, which wins over ./configuration.toml, the fallback
    when the variable is not in the environment at all."""
    (tmp_path / "configuration.toml").write_text('[server]\nhostname = "cwd.example"\n')
    from_env = tmp_path / "env.toml"
    from_env.write_text('[server]\nhostname = "env.example"\n')
    explicit = tmp_path / "explicit.toml"
    explicit.write_text('[server]\nhostname = "explicit.example"\n')

    def hostname(*args: str, gsmtp_config: str | None = None) -> str:
        result = run("check-config", *args, cwd=tmp_path, gsmtp_config=gsmtp_config)
        assert result.returncode == 0, result.stderr
        (line,) = [line for line in result.stdout.splitlines() if line.startswith("hostname")]
        return line

    assert hostname("-c", str(explicit), gsmtp_config=str(from_env)) == (
        'hostname = "explicit.example"'
    )
    assert hostname(gsmtp_config=str(from_env)) == 'hostname = "env.example"'
    assert hostname() == 'hostname = "cwd.example"'
    assert hostname(gsmtp_config="") == 'hostname = "cwd.example"'  # empty: unset


def test_accounts_errors_are_one_clear_line(gsmtp: GsmtpProcess) -> None:
    result = gsmtp.cli("user", "add", "x@nowhere.example", check=False)
    assert result.returncode == 1
    assert "domain nowhere.example is not local" in result.stderr
    assert gsmtp.cli("user", "add", "../etc@foo.com", check=False).returncode == 1
    assert (
        gsmtp.cli("user", "add", "jones@foo.com", check=False)
        .stderr.strip()
        .endswith("already exists")
    )
    assert gsmtp.cli("user", "list").stdout.split() == ["brown@foo.com", "jones@foo.com"]
    assert gsmtp.cli("domain", "list").stdout.split() == ["foo.com"]
    added = gsmtp.cli("user", "add", "pw@foo.com", "--password-stdin", stdin="s3cret\n")
    assert added.returncode == 0
    stored = gsmtp.spool_rows("SELECT password_hash FROM users WHERE address = 'pw@foo.com'")
    assert stored[0][0].startswith("$scrypt$") and "s3cret" not in stored[0][0]


def test_queue_commands_while_the_server_runs(gsmtp_factory) -> None:  # type: ignore[no-untyped-def]
    # Relay to a port nobody listens on: the message stays queued with a last error.
    gsmtp = gsmtp_factory({"delivery": {"smarthost": "127.0.0.1:1", "retry": ["1h"]}})
    with SmtpWire(gsmtp.port, source="127.0.0.2") as wire:
        wire.read_reply()
        wire.command("EHLO c.example")
        wire.command("MAIL FROM:<a@remote.example>")
        wire.command("RCPT TO:<x@remote.example>")
        wire.command("DATA")
        wire.send(b"Subject: stuck\r\n\r\nbody\r\n.\r\n")
        message_id = wire.read_reply()[0].rsplit(" ", 1)[1]
    wait_for(
        lambda: gsmtp.spool_rows("SELECT last_error FROM recipients")[0][0],
        what="a deferred attempt",
    )
    listing = gsmtp.cli("queue", "list").stdout
    assert (
        message_id in listing
        and "<a@remote.example>" in listing
        and "<x@remote.example>" in listing
    )
    assert "queued" in listing
    stats = gsmtp.cli("queue", "stats").stdout.splitlines()
    assert stats[:3] == ["messages: 1", "recipients: 1", "queued: 1"]
    as_json = json.loads(gsmtp.cli("queue", "stats", "--json").stdout)
    assert as_json["messages"] == 1
    listed = json.loads(gsmtp.cli("queue", "list", "--json").stdout)
    assert listed[0]["id"] == message_id and listed[0]["recipients"][0]["last_error"]
    shown = gsmtp.cli("queue", "show", message_id).stdout
    assert "Subject: stuck" in shown and "Received: from c.example" in shown
    assert gsmtp.cli("queue", "show", "NOPE", check=False).returncode != 0
    assert gsmtp.cli("queue", "delete", message_id).returncode == 0
    assert json.loads(gsmtp.cli("queue", "stats", "--json").stdout)["messages"] == 0


def test_queue_flush_and_bounce_end_to_end(gsmtp_factory) -> None:  # type: ignore[no-untyped-def]
    """`queue flush` makes deferred mail due now: a second attempt comes without waiting
    out the 1 h retry. `queue bounce` returns the message to its sender: the runner
    fails the recipient ("Bounced by the administrator", 5.0.0), the sender's Maildir
    gets the RFC 3464 report and the spool empties."""
    gsmtp = gsmtp_factory({"delivery": {"smarthost": "127.0.0.1:1", "retry": ["1h"]}})
    with SmtpWire(gsmtp.port, source="127.0.0.2") as wire:  # a trusted network: relay
        wire.read_reply()
        wire.command("EHLO c.example")
        wire.command("MAIL FROM:<jones@foo.com>")
        wire.command("RCPT TO:<x@remote.example>")
        wire.command("DATA")
        wire.send(b"Subject: stuck\r\n\r\nbody\r\n.\r\n")
        message_id = wire.read_reply()[0].rsplit(" ", 1)[1]

    def attempts() -> int:
        rows = gsmtp.spool_rows("SELECT attempts FROM recipients WHERE message_id = ?", message_id)
        return int(rows[0][0]) if rows else -1

    wait_for(lambda: attempts() == 1, what="the first attempt, deferred for 1 h")
    flushed = json.loads(gsmtp.cli("queue", "flush", "--json").stdout)
    assert flushed == {"action": "flushed", "id": None, "count": 1}
    wait_for(lambda: attempts() == 2, timeout=20, what="a second attempt after the flush")
    assert gsmtp.cli("queue", "bounce", message_id).stdout == f"bouncing: {message_id}\n"
    bounce = bounce_for(gsmtp)
    assert bounce["To"] == "<jones@foo.com>"
    (block,) = delivery_status(bounce)
    assert block["Final-Recipient"] == "rfc822; x@remote.example"
    assert (block["Action"], block["Status"]) == ("failed", "5.0.0")
    assert block["Diagnostic-Code"] == "smtp; 550 5.0.0 Bounced by the administrator"
    wait_for(
        lambda: gsmtp.spool_rows("SELECT COUNT(*) FROM messages") == [(0,)], what="empty spool"
    )
    assert gsmtp.cli("queue", "bounce", message_id, check=False).returncode == 1


def test_metrics_endpoint(gsmtp: GsmtpProcess) -> None:
    """The names of DESIGN.md, each counting what happened: two connections (the
    harness's readiness probe and ours), one message queued and delivered locally."""
    before = gsmtp.metrics()
    with smtplib.SMTP("127.0.0.1", gsmtp.port, timeout=10) as client:
        client.sendmail("a@remote.example", ["jones@foo.com"], "Subject: m\r\n\r\nx\r\n")
    wait_for(lambda: gsmtp.maildir_files("jones@foo.com"), what="delivery")
    delivered = 'gsmtp_deliveries_total{outcome="delivered",transport="local"}'

    def settled() -> dict[str, float] | None:
        samples = gsmtp.metrics()
        done = samples.get(delivered) and samples["gsmtp_connections_active"] == 0
        return samples if done else None

    samples = wait_for(settled, what="the delivery counted and the connection closed")
    assert samples["gsmtp_connections_total"] - before["gsmtp_connections_total"] == 1
    assert samples["gsmtp_connections_active"] == 0
    assert samples['gsmtp_messages_received_total{outcome="queued"}'] == 1
    assert samples["gsmtp_accept_seconds_count"] == 1
    assert samples[delivered] == 1
    assert samples['gsmtp_delivery_seconds_count{transport="local"}'] == 1
    assert samples['gsmtp_queue_size{status="queued"}'] == 0
    assert samples["gsmtp_oldest_queued_seconds"] == 0


def test_a_corrupt_spool_is_refused_not_replaced(gsmtp_factory) -> None:  # type: ignore[no-untyped-def]
    """D-21: refuse to start with a clear message; never an empty spool over it."""
    gsmtp = gsmtp_factory(start=False)
    garbage = b"this is not an SQLite database" * 100
    gsmtp.spool_path.write_bytes(garbage)
    for suffix in ("-wal", "-shm"):
        Path(str(gsmtp.spool_path) + suffix).unlink(missing_ok=True)
    result = run("serve", "-c", str(gsmtp.config))
    assert result.returncode == 1
    assert "cannot open the spool" in result.stderr and str(gsmtp.spool_path) in result.stderr
    assert "Traceback" not in result.stderr
    assert gsmtp.spool_path.read_bytes() == garbage


def test_a_listener_that_cannot_be_bound_stops_what_started_and_exits_1(
    gsmtp_factory,  # type: ignore[no-untyped-def]
) -> None:
    """The second listener's port is taken: the first listener, the queue runner and
    the spool threads are stopped (server_stopped) and the exit is a clean 1 with one
    line naming the cause. Before, the writer threads were left running and the
    interpreter's exit crashed now and then (SIGSEGV)."""
    gsmtp = gsmtp_factory(start=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ipv4 = f'listen = ["127.0.0.1:{gsmtp.port}"]'
        both = f'listen = ["127.0.0.1:{gsmtp.port}", "127.0.0.1:{busy}"]'
        gsmtp.config.write_text(gsmtp.config.read_text().replace(ipv4, both))
        for _ in range(3):
            result = run("serve", "-c", str(gsmtp.config))
            assert result.returncode == 1, result.stderr
            assert '"event":"server_stopped"' in result.stderr
            last_line = result.stderr.strip().splitlines()[-1]
            assert last_line == f"gsmtp: cannot listen on 127.0.0.1:{busy}: Address already in use"


def test_output_into_a_closed_pipe_is_not_a_traceback(gsmtp: GsmtpProcess) -> None:
    """`gsmtp user list | head -1` with a reader that is already gone."""
    child = subprocess.Popen(
        [sys.executable, "-m", "gsmtp.cli", "user", "list", "-c", str(gsmtp.config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment(),
    )
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()
    stderr = child.stderr.read().decode()
    child.wait(timeout=60)
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
