"""configuration.toml: defaults, units, and errors that name the file and the key."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from gsmtp.config import (
    Config,
    ConfigError,
    load,
    parse,
    parse_duration,
    parse_size,
    spool_reserve,
)

SHIPPED = Path(__file__).parents[2] / "configuration.toml"


def test_shipped_configuration_states_the_defaults() -> None:
    """Every key of the shipped file equals the dataclass default, and every default key
    is in the file (paths are resolved against the file's directory in both)."""
    shipped = load(SHIPPED)
    defaults = parse({}, SHIPPED)
    assert dataclasses.replace(shipped, path="") == dataclasses.replace(defaults, path="")
    raw = tomllib.loads(SHIPPED.read_text())
    for section in dataclasses.fields(Config):
        if section.name == "path":
            continue
        names = {f.name for f in dataclasses.fields(getattr(defaults, section.name))}
        assert set(raw[section.name]) == names, section.name


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("5m", 300), ("1h", 3600), ("5d", 432000), ("250ms", 0.25)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "size"), [("10KB", 10240), ("35MB", 35 * 1024**2), ("100", 100)])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(("text", "seconds"), [("0s", 0.0), ("0ms", 0.0), ("250ms", 0.25)])
def test_greet_wait_may_be_zero(text: str, seconds: float) -> None:
    """server.greet_wait "0s" is off (today's behaviour); other durations must be > 0."""
    config = parse({"server": {"greet_wait": text}}, SHIPPED)
    assert config.server.greet_wait == seconds
    with pytest.raises(ConfigError, match="must be longer than zero"):
        parse({"server": {"timeout": "0s"}}, SHIPPED)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gsmtp.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[server]\nhostnme = "x"\n', "unknown key [server] hostnme"),
        ("[srever]\n", "unknown section [srever]"),
        ('[server]\ntimeout = "5 minutes"\n', "[server] timeout: expected a duration"),
        ('[server]\ngreet_wait = "-1s"\n', "[server] greet_wait: expected a duration"),
        ("[server]\ntimeout = 5\n", "[server] timeout: expected a string"),
        ('[server]\nmax_message_size = "lots"\n', "[server] max_message_size: expected a size"),
        ("[server]\nmax_recipients = 0\n", "[server] max_recipients: must be at least 1"),
        ('[server]\nlisten = ["localhost"]\n', '[server] listen: expected "host:port"'),
        ("[server]\nlisten = []\n", "[server] listen: needs at least one address"),
        (
            '[server]\ntrusted_networks = ["10.0.0.0/33"]\n',
            "[server] trusted_networks: not a network",
        ),
        ('[server]\nvrfy = "yes"\n', "[server] vrfy: expected true or false"),
        ('[server]\ncpu_affinity = "on"\n', "[server] cpu_affinity: must be one of auto, off"),
        ('[log]\nlevel = "loud"\n', "[log] level: must be one of"),
        ("[delivery]\nretry = []\n", "[delivery] retry: needs at least one step"),
        ("[delivery]\nport = 70000\n", "[delivery] port: port must be 1-65535"),
        ("[delivery]\nconnection_reuse = 0\n", "[delivery] connection_reuse: must be at least 1"),
        ('[delivery]\nconnection_idle = "0s"\n', "[delivery] connection_idle: must be longer"),
        ('[tls]\ncert = "a.pem"\n', "[tls] cert and key must be set together"),
        ("[server]\nipv4_prefix = 33\n", "[server] ipv4_prefix: a prefix length must be 1-32"),
        ("[server]\nipv6_prefix = 0\n", "[server] ipv6_prefix: must be at least 1"),
        ("[server]\nmax_connection_rate = -1\n", "[server] max_connection_rate: must be 0 or"),
        ('[server]\nproxy_networks = ["lb"]\n', "[server] proxy_networks: not a network"),
        (
            "[server]\nproxy_protocol = true\nproxy_networks = []\n",
            "[server] proxy_networks: proxy_protocol = true needs at least one network",
        ),
        ("[server\n", "not valid TOML"),
        ('[dkim]\nkeys = ["s1.pem"]\n', "[dkim] keys: expected {domain"),
        (
            '[dkim]\nkeys = [{domain = "a.test", selector = "s1"}]\n',
            "[dkim] keys: 'key' is missing",
        ),
        (
            '[dkim]\nkeys = [{domain = "a.test", selector = "s1", key = "k", algo = "rsa"}]\n',
            "[dkim] keys: unknown field 'algo'",
        ),
        (
            '[dkim]\nkeys = [{domain = "a.test", selector = "s 1", key = "k"}]\n',
            "[dkim] keys: not a valid selector",
        ),
        (
            '[dkim]\nkeys = [{domain = "a test", selector = "s1", key = "k"}]\n',
            "[dkim] keys: not a valid host name",
        ),
        (
            '[dkim]\nkeys = [{domain = "a.test", selector = "s1", key = "k"},'
            ' {domain = "A.test", selector = "s1", key = "j"}]\n',
            "[dkim] keys: selector 's1' of a.test is listed twice",
        ),
    ],
)
def test_errors_name_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load(path)
    assert str(error.value).startswith(str(path))
    assert message in str(error.value)


def test_a_file_not_in_utf8_is_a_config_error_naming_the_byte(tmp_path: Path) -> None:
    """A comment saved in Latin-1: a ConfigError (check-config, the CLI, serve and a
    SIGHUP all report it as such), not a UnicodeDecodeError."""
    path = tmp_path / "configuration.toml"
    path.write_bytes('[server]\nhostname = "mx.test"\n# G\u00e9rard\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as error:
        load(path)
    assert str(error.value).startswith(f"{path}: not UTF-8: byte 0xe9 at offset 33 (line 3)")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load(tmp_path / "nope.toml")


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    config = load(write(tmp_path, '[spool]\npath = "q/spool.sqlite"\n'))
    assert config.spool.path == str(tmp_path / "q/spool.sqlite")
    assert config.maildir.root == str(tmp_path / "var/mail")


def test_dkim_key_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            "[dkim]\nkeys = ["
            '{domain = "Example.ORG", selector = "s1.2024", key = "keys/s1.pem"},'
            ' {domain = "example.org", selector = "e1", key = "/etc/e1.pem"}]\n',
        )
    )
    assert [(k.domain, k.selector, k.key) for k in config.dkim.keys] == [
        ("example.org", "s1.2024", str(tmp_path / "keys/s1.pem")),
        ("example.org", "e1", "/etc/e1.pem"),
    ]


def test_proxy_protocol_and_client_network_keys(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            '[server]\nproxy_protocol = true\nproxy_networks = ["10.0.0.0/24"]\n'
            "ipv4_prefix = 24\nipv6_prefix = 56\nmax_connection_rate = 60\n",
        )
    )
    server = config.server
    assert server.proxy_protocol is True
    assert [str(n) for n in server.proxy_networks] == ["10.0.0.0/24"]
    assert (server.ipv4_prefix, server.ipv6_prefix, server.max_connection_rate) == (24, 56, 60)


@pytest.mark.parametrize(
    ("text", "reserve"),
    [
        ("", 2 * 20 * 1024**2),  # the default: twice the largest message
        ('min_free = ""', 2 * 20 * 1024**2),
        ('min_free = "0"', 0),
        ("min_free = 0", 0),
        ('min_free = "1GB"', 1024**3),
    ],
)
def test_spool_min_free(tmp_path: Path, text: str, reserve: int) -> None:
    path = write(tmp_path, f'[server]\nmax_message_size = "20MB"\n[spool]\n{text}\n')
    assert spool_reserve(load(path)) == reserve


def test_spool_min_free_must_be_a_size(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[spool\] min_free: expected a size"):
        load(write(tmp_path, '[spool]\nmin_free = "plenty"\n'))


def test_delay_warning_is_a_duration_or_empty_for_none(tmp_path: Path) -> None:
    assert parse({}, tmp_path / "x.toml").delivery.delay_warning == 4 * 3600
    off = write(tmp_path, '[delivery]\ndelay_warning = ""\nactive_limit = 500\n')
    assert load(off).delivery.delay_warning is None
    assert load(off).delivery.active_limit == 500
    with pytest.raises(ConfigError, match=r"\[delivery\] delay_warning: expected a duration"):
        load(write(tmp_path, '[delivery]\ndelay_warning = "soon"\n'))


@pytest.mark.parametrize("mode", ["0600", "0640", "0644"])
def test_maildir_mode_accepts_owner_rw_and_read_for_others(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[maildir]\nmode = "{mode}"\ngroup = "mail"\n')
    config = load(path)
    assert config.maildir.mode == int(mode, 8)
    assert config.maildir.group == "mail"


@pytest.mark.parametrize("mode", ["0660", "0700", "0400", "rw", "0606"])
def test_maildir_mode_refuses_write_or_execute_for_others(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[maildir]\nmode = "{mode}"\n')
    with pytest.raises(ConfigError, match=r"\[maildir\] mode"):
        load(path)


def test_mta_sts_keys_and_a_ca_file_relative_to_the_file(tmp_path: Path) -> None:
    text = '[delivery]\nmta_sts = false\nmta_sts_port = 8443\nca_file = "certs/ca.pem"\n'
    delivery = load(write(tmp_path, text)).delivery
    assert (delivery.mta_sts, delivery.mta_sts_port) == (False, 8443)
    assert delivery.ca_file == str(tmp_path / "certs/ca.pem")
    for wrong, message in [("mta_sts = 1", "expected true or false"), ("mta_sts_port = 0", "port")]:
        with pytest.raises(ConfigError, match=message):
            load(write(tmp_path, f"[delivery]\n{wrong}\n"))
