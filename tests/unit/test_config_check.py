"""check-config (issue 11 item 8): every problem at once, "did you mean", resolvers as
addresses, files and directories the configuration names, `-n`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gsmtp.config import ConfigError, load, load_collecting, parse
from gsmtp.config_check import environment_problems
from tests.integration.harness import environment


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gsmtp.toml"
    path.write_text(text)
    return path


def test_every_problem_is_reported_at_once_with_did_you_mean(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[server]\nhostnme = "x.example"\ntimeout = "forever"\nmax_recipients = 5\n'
        '[delivery]\nnameservers = ["dns.example:53", "127.0.0.1:53"]\n'
        "[logg]\n",
    )
    with pytest.raises(ConfigError) as raised:
        load(path)
    assert raised.value.errors == (
        f"{path}: unknown key [server] hostnme (did you mean hostname?)",
        f'{path}: [server] timeout: expected a duration like "30s", "5m", "1h" or "5d",'
        " got 'forever'",
        f"{path}: [delivery] nameservers: a resolver must be an IP address"
        ' ("192.0.2.53:53", "[2001:db8::53]:53"), got \'dns.example:53\'',
        f"{path}: unknown section [logg] (did you mean log?)",
    )
    config, errors = load_collecting(path)
    assert len(errors) == 4 and config.server.max_recipients == 5  # the good keys apply


def test_resolvers_must_be_addresses(tmp_path: Path) -> None:
    config = parse({"delivery": {"nameservers": ["[::1]:53", "192.0.2.1:5353"]}}, tmp_path / "c")
    assert [str(n) for n in config.delivery.nameservers] == ["[::1]:53", "192.0.2.1:5353"]


def test_files_and_directories_the_configuration_names(tmp_path: Path) -> None:
    a_file = tmp_path / "plain"
    a_file.write_text("")
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    path = write(
        tmp_path,
        f'[tls]\ncert = "{cert}"\nkey = "missing.pem"\n'
        f'[spool]\npath = "{a_file}/sub/spool.sqlite"\n[maildir]\nroot = "new/mail"\n',
    )
    assert environment_problems(load(path)) == [
        f"{path}: [tls] key: cannot read {tmp_path / 'missing.pem'}: No such file or directory",
        f"{path}: [spool] path: {a_file} is not a directory",
    ]  # the Maildir root does not exist yet but can be created


def test_what_serve_refuses_check_config_refuses(tmp_path: Path) -> None:
    """A certificate/key pair that is readable but does not load (as serve loads it), a
    maildir.group that does not exist, a spool.path that is a directory."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a pem\n")
    (tmp_path / "spooldir").mkdir()
    path = write(
        tmp_path,
        f'[tls]\ncert = "{garbage}"\nkey = "{garbage}"\n[spool]\npath = "spooldir"\n'
        '[maildir]\ngroup = "no-such-group-zz"\n',
    )
    problems = environment_problems(load(path))
    assert len(problems) == 3, problems
    assert problems[0].startswith(
        f"{path}: [tls] cannot load certificate {garbage} and key {garbage}:"
    )
    assert problems[1:] == [
        f"{path}: [spool] path: {tmp_path / 'spooldir'} is a directory"
        " (spool.path names the database file)",
        f"{path}: [maildir] group: group 'no-such-group-zz' does not exist",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nworkers = 0\n", "[server] workers: must be at least 1"),
        ("[server]\nworkers = 257\n", "[server] workers: must be 1-256, got 257"),
        (
            '[server]\ntimeout = "99999999999999999999d"\n',
            "[server] timeout: '99999999999999999999d' is longer than 10 years (3650d)",
        ),
        ('[delivery]\nretry = ["5m", "3651d"]\n', "[delivery] retry: '3651d' is longer than"),
    ],
)
def test_absurd_worker_counts_and_durations_are_refused(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load(write(tmp_path, text))
    assert message in str(raised.value)


def test_the_largest_worker_count_and_duration_are_accepted(tmp_path: Path) -> None:
    config = load(write(tmp_path, '[server]\nworkers = 256\ntimeout = "3650d"\n'))
    assert config.server.workers == 256 and config.server.timeout == 3650 * 86400


def check_config(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gsmtp", "check-config", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment(),
    )


def test_check_config_prints_all_problems_and_n_prints_only_changes(tmp_path: Path) -> None:
    bad = write(tmp_path, '[server]\nhostnme = "x"\n[tls]\ncert = "c.pem"\nkey = "k.pem"\n')
    result = check_config("-c", str(bad))
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0].endswith("unknown key [server] hostnme (did you mean hostname?)")
    assert "[tls] cert: cannot read" in lines[1] and "[tls] key: cannot read" in lines[2]
    assert "Traceback" not in result.stderr
    good = write(
        tmp_path,
        '[server]\nhostname = "mail.example.test"\nmax_recipients = 50\n'
        '[delivery]\nmax_age = "2d"\nretry = ["1m", "5m", "15m", "30m", "1h"]\n',
    )
    result = check_config("-n", "-c", str(good))
    assert result.returncode == 0, result.stderr
    # A key set to its default value is not a change (as postconf -n shows main.cf, less).
    assert result.stdout == '[server]\nmax_recipients = 50\n\n[delivery]\nmax_age = "2d"\n'
