"""Read configuration.toml into frozen dataclasses; the one place configuration is read.

Every error names the file and the key (`ConfigError`). Unknown keys are errors, so a
typo never silently falls back to a default. Relative paths are taken relative to the
configuration file's directory. Durations: "30s", "5m", "1h", "5d"; sizes: "10KB",
"35MB" (KB = 1024 bytes).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_NAME = "configuration.toml"
SYSTEM_CONFIG = Path("/etc/gsmtp/configuration.toml")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\Z")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"(\d+)\s*(B|KB|MB|GB)?\Z", re.IGNORECASE)
_SIZE_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}
_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("json", "console")


class ConfigError(Exception):
    """Configuration problems, phrased for the operator: file, key, what is wrong. `errors`
    holds every problem found (one line each); the message joins them."""

    def __init__(self, *errors: str) -> None:
        super().__init__("\n".join(errors))
        self.errors: tuple[str, ...] = errors


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    hostname: str = "mail.example.test"
    listen: tuple[HostPort, ...] = (HostPort("127.0.0.1", 2525),)
    workers: int | None = None  # processes, one spool shard each; None = "auto" (every CPU)
    cpu_affinity: str = "auto"  # "auto": each of several workers kept on CPUs of its own
    timeout: float = 300.0
    command_deadline: float = 300.0
    min_data_rate: int = 1024
    min_data_rate_grace: float = 30.0
    max_connections: int = 10000
    max_connections_per_ip: int = 50  # per client network of the prefixes below
    ipv4_prefix: int = 32
    ipv6_prefix: int = 64
    max_connection_rate: int = 0  # new connections per network per minute; 0 = no limit
    max_message_size: int = 35 * 1024 * 1024
    max_data_memory: int = 256 * 1024 * 1024  # bodies in memory, all connections together
    max_recipients: int = 100
    soft_error_limit: int = 10
    error_sleep: float = 1.0
    junk_command_limit: int = 100
    vrfy: bool = False
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    proxy_protocol: bool = False
    proxy_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    shutdown_grace: float = 30.0
    greet_wait: float = 0.0
    auth_failure_limit: int = 10


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert: str = ""
    key: str = ""
    min_version: str = "TLSv1.2"

    @property
    def enabled(self) -> bool:
        return bool(self.cert and self.key)


@dataclass(frozen=True, slots=True)
class SubmissionConfig:
    listen: tuple[HostPort, ...] = ()
    tls_listen: tuple[HostPort, ...] = ()
    allow_plaintext_auth: bool = False


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    path: str = "var/spool.sqlite"
    min_free: int | None = None  # bytes kept free; None = 2 × max_message_size; 0 = off


@dataclass(frozen=True, slots=True)
class MaildirConfig:
    root: str = "var/mail"
    group: str = ""  # group of what gsmtp creates in the root; "" = gsmtp's own
    mode: int = 0o600  # of message files; directories get the matching execute bits


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    concurrency: int = 100
    retry: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0)
    max_age: float = 5 * 86400.0
    port: int = 25
    smarthost: str = ""
    nameservers: tuple[HostPort, ...] = ()
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    attempt_timeout: float = 1800.0
    connection_reuse: int = 100  # messages per outbound session; 1 = a connection each
    connection_idle: float = 2.0  # an idle reusable session is closed (QUIT) after this
    max_per_domain: int = 20
    active_limit: int = 10000  # recipients the queue manager holds in memory
    delay_warning: float | None = 4 * 3600.0  # None: no delay warnings
    tls: str = "may"  # none|may|encrypt|verify: MX delivery's TLS level
    tls_policy: tuple[tuple[str, str], ...] = ()  # (domain, level): overrides `tls`
    ca_file: str = ""  # CAs trusted for `verify`, besides the system store
    smarthost_auth_file: str = ""  # "user:password", mode 0600
    smarthost_tls: str = ""  # may|encrypt|verify|implicit; "" = verify with auth, else tls
    mta_sts: bool = True  # RFC 8461 policies for MX delivery
    mta_sts_port: int = 443  # where policies are fetched (tests: a high port)


@dataclass(frozen=True, slots=True)
class DkimKeyConfig:
    """One signing key: mail of `domain` is signed with selector `selector` and the PEM
    private key at `key` (RSA or Ed25519; the type is read from the key)."""

    domain: str
    selector: str
    key: str


@dataclass(frozen=True, slots=True)
class DkimConfig:
    keys: tuple[DkimKeyConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9325"


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "json"


@dataclass(frozen=True, slots=True)
class Config:
    path: str = ""
    server: ServerConfig = field(default_factory=ServerConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    submission: SubmissionConfig = field(default_factory=SubmissionConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    maildir: MaildirConfig = field(default_factory=MaildirConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    dkim: DkimConfig = field(default_factory=DkimConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "tls": TlsConfig,
    "submission": SubmissionConfig,
    "spool": SpoolConfig,
    "maildir": MaildirConfig,
    "delivery": DeliveryConfig,
    "dkim": DkimConfig,
    "metrics": MetricsConfig,
    "log": LogConfig,
}


def resolve_path(
    explicit: str | None,
    *,
    environ: Mapping[str, str] | None = None,
    system: Path = SYSTEM_CONFIG,
) -> Path:
    """`-c FILE`, else $GSMTP_CONFIG (when set and not empty), else ./configuration.toml
    when it exists, else `system` (/etc/gsmtp/configuration.toml) when it exists. When
    none exists: ./configuration.toml, which `load` then reports as not found."""
    chosen = explicit or (os.environ if environ is None else environ).get("GSMTP_CONFIG")
    if chosen:
        return Path(chosen)
    local = Path(DEFAULT_CONFIG_NAME)
    if not local.exists() and system.exists():
        return system
    return local


def load(path: Path) -> Config:
    """The configuration in `path`; ConfigError naming every problem at once."""
    config, errors = load_collecting(path)
    if errors:
        raise ConfigError(*errors)
    return config


def load_collecting(path: Path) -> tuple[Config, list[str]]:
    """The configuration with every key that could not be used left at its default, and
    the problems found (`check-config` reports them all, then checks files)."""
    try:
        data = path.read_bytes()
        # TOML is UTF-8: decoded here so that a byte saved in another encoding (a
        # Latin-1 comment) is a problem naming where it is, not a UnicodeDecodeError.
        raw = tomllib.loads(data.decode("utf-8"))
    except FileNotFoundError:
        return Config(path=str(path)), [f"{path}: file not found"]
    except OSError as error:
        return Config(path=str(path)), [f"{path}: cannot read: {error.strerror}"]
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        return Config(path=str(path)), [
            f"{path}: not UTF-8: byte 0x{data[error.start]:02x} at offset {error.start}"
            f" (line {line}); save the file as UTF-8"
        ]
    except tomllib.TOMLDecodeError as error:
        return Config(path=str(path)), [f"{path}: not valid TOML: {error}"]
    return parse_collecting(raw, path)


def parse(raw: dict[str, Any], path: Path) -> Config:
    config, errors = parse_collecting(raw, path)
    if errors:
        raise ConfigError(*errors)
    return config


def parse_collecting(raw: dict[str, Any], path: Path) -> tuple[Config, list[str]]:
    reader = _Reader(path)
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in _SECTIONS:
            reader.errors.append(
                f"{path}: unknown section [{name}]{_did_you_mean(name, _SECTIONS)}"
            )
        elif not isinstance(value, dict):
            reader.errors.append(f"{path}: [{name}] must be a table")
        else:
            sections[name] = reader.section(name, value)
    for name in _SECTIONS:
        sections.setdefault(name, reader.section(name, {}))
    config = Config(path=str(path), **sections)
    return config, reader.errors + _consistency_errors(config, path)


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _consistency_errors(config: Config, path: Path) -> list[str]:
    errors = []
    if bool(config.tls.cert) != bool(config.tls.key):
        errors.append(f"{path}: [tls] cert and key must be set together")
    submission = config.submission
    if submission.tls_listen and not config.tls.enabled:
        errors.append(f"{path}: [submission] tls_listen: implicit TLS needs [tls] cert and key")
    if submission.listen and not config.tls.enabled and not submission.allow_plaintext_auth:
        errors.append(
            f"{path}: [submission] listen: without [tls] cert and key, passwords would "
            "cross the network in clear; set [tls] cert and key, or set [submission] "
            "allow_plaintext_auth = true if a TLS-terminating proxy is in front"
        )
    delivery = config.delivery
    if (delivery.smarthost_auth_file or delivery.smarthost_tls) and not delivery.smarthost:
        raise ConfigError(
            f"{path}: [delivery] smarthost_auth_file and smarthost_tls need a smarthost"
        )
    if delivery.smarthost_auth_file and delivery.smarthost_tls in ("may", "encrypt"):
        # The password would go to whoever answers with any certificate (a man in the
        # middle), or in plaintext under `may` if STARTTLS were stripped.
        errors.append(
            f"{path}: [delivery] smarthost_tls = {delivery.smarthost_tls!r} with "
            "smarthost_auth_file: the password would go to a smarthost whose certificate "
            'is not verified; use smarthost_tls = "verify" or "implicit" (or leave it '
            "unset)"
        )
    if config.server.proxy_protocol and not config.server.proxy_networks:
        errors.append(
            f"{path}: [server] proxy_networks: proxy_protocol = true needs at least one "
            "network allowed to send the PROXY header"
        )
    return errors


class _Reader:
    """Converts one section's raw values into its dataclass, naming the key on error."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._base = path.parent
        self.errors: list[str] = []  # every problem found; its key keeps the default

    def section(self, name: str, values: dict[str, Any]) -> Any:
        cls = _SECTIONS[name]
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                hint = _did_you_mean(key, known)
                self.errors.append(f"{self._path}: unknown key [{name}] {key}{hint}")
                continue
            converter = _SPECIFIC.get((name, key)) or _GENERIC[key]
            try:
                converted = converter(value)
            except (ValueError, TypeError) as error:
                self.errors.append(f"{self._path}: [{name}] {key}: {error}")
                continue
            kwargs[key] = converted
        section = cls(**kwargs)
        for field_name in (key for (owner, key) in _PATH_KEYS if owner == name):
            value = getattr(section, field_name)
            if value and not os.path.isabs(value):
                section = dataclasses.replace(section, **{field_name: str(self._base / value)})
        if isinstance(section, DkimConfig):
            keys = tuple(
                dataclasses.replace(k, key=str(self._base / k.key))
                if not os.path.isabs(k.key)
                else k
                for k in section.keys
            )
            section = dataclasses.replace(section, keys=keys)
        return section


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__} {value!r}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}")
    return value


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected a whole number, got {value!r}")
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected a whole number, got {value!r}")
    if value < 0:
        raise ValueError(f"must be 0 or more, got {value}")
    return value


def _prefix(bits: int) -> Any:
    def convert(value: Any) -> int:
        prefix = _positive_int(value)
        if prefix > bits:
            raise ValueError(f"a prefix length must be 1-{bits}, got {prefix}")
        return prefix

    return convert


def _port(value: Any) -> int:
    port = _positive_int(value)
    if port > 65535:
        raise ValueError(f"port must be 1-65535, got {port}")
    return port


# No setting is meant to be longer: a longer value is a typo, and one large enough
# ("99999999999999999999d") overflows the timers and dates it is added to.
MAX_DURATION_SECONDS = 10 * 365 * 86400.0


def _seconds(value: Any) -> float:
    match = _DURATION.match(_string(value).strip())
    if not match:
        raise ValueError(f'expected a duration like "30s", "5m", "1h" or "5d", got {value!r}')
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds > MAX_DURATION_SECONDS:
        raise ValueError(f"{value!r} is longer than 10 years (3650d), the longest duration")
    return seconds


def parse_duration(value: Any) -> float:
    """ "30s", "5m", "1h", "5d", "250ms" → seconds."""
    seconds = _seconds(value)
    if seconds <= 0:
        raise ValueError(f"must be longer than zero, got {value!r}")
    return seconds


def _duration_or_zero(value: Any) -> float:
    """A duration, or "0s" for off."""
    return _seconds(value)


def _optional_duration(value: Any) -> float | None:
    """A duration, or "" for none."""
    return parse_duration(value) if _string(value).strip() else None


def _size_or_zero(value: Any) -> int:
    """A size where "0" (or 0) turns the feature off."""
    if (isinstance(value, int) and not isinstance(value, bool) and value == 0) or (
        isinstance(value, str) and value.strip() in ("0", "0B", "0KB")
    ):
        return 0
    return parse_size(value)


def parse_size(value: Any) -> int:
    """ "10KB", "35MB" → bytes (KB = 1024)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SIZE.match(_string(value).strip())
    if not match:
        raise ValueError(f'expected a size like "10KB" or "35MB", got {value!r}')
    size = int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "B").upper()]
    if size <= 0:
        raise ValueError(f"must be larger than zero, got {value!r}")
    return size


def parse_host_port(value: Any) -> HostPort:
    """ "127.0.0.1:2525", "[::1]:25", "0.0.0.0:25" → HostPort."""
    text = _string(value).strip()
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if not match:
        raise ValueError(f'expected "host:port" or "[ipv6]:port", got {value!r}')
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1-65535 in {value!r}")
    return HostPort(host, port)


def _nameserver(value: Any) -> HostPort:
    """ "ip:port" of a resolver: an IP address, since a name would need a resolver."""
    address = parse_host_port(value)
    try:
        ipaddress.ip_address(address.host)
    except ValueError:
        raise ValueError(
            f'a resolver must be an IP address ("192.0.2.53:53", "[2001:db8::53]:53"), '
            f"got {value!r}"
        ) from None
    return address


def _list_of(item: Any) -> Any:
    def convert(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise TypeError(f"expected a list, got {value!r}")
        return tuple(item(element) for element in value)

    return convert


def _network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A network in CIDR form. Host bits set after the prefix are an error, not silently
    cleared: "203.0.113.7/0" would otherwise be 0.0.0.0/0, an open relay by typo."""
    text = _string(value)
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"not a network in CIDR form: {value!r}") from None
    address = ipaddress.ip_interface(text).ip
    if network.network_address != address:
        raise ValueError(
            f"{value!r} has host bits set after the /{network.prefixlen} prefix: that is "
            f"{network}; write {network} if that is meant, or {address}/{address.max_prefixlen} "
            "for the one address"
        )
    return network


def _hostname(value: Any) -> str:
    text = _string(value)
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", text):
        raise ValueError(f"not a valid host name: {value!r}")
    return text


def _one_of(*choices: str) -> Any:
    def convert(value: Any) -> str:
        text = _string(value)
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {value!r}")
        return text

    return convert


def _optional_host_port(value: Any) -> str:
    text = _string(value)
    if text:
        parse_host_port(text)
    return text


def _reserve(value: Any) -> int | None:
    """ "" → None (the default: 2 × max_message_size), "0" → 0 (off), else a size."""
    text = value.strip() if isinstance(value, str) else None
    if text == "":
        return None
    if text == "0" or (type(value) is int and value == 0):
        return 0
    return parse_size(value)


_TLS_LEVELS = ("none", "may", "encrypt", "verify")


def _tls_policy(value: Any) -> tuple[tuple[str, str], ...]:
    """`[delivery.tls_policy]`: domain = level, domains in lower case, sorted."""
    if not isinstance(value, dict):
        raise TypeError(f"expected a table of domain = level, got {value!r}")
    pairs = []
    for domain, level in value.items():
        name = domain.strip().rstrip(".").lower()
        if not re.fullmatch(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?", name):
            raise ValueError(f"not a domain: {domain!r}")
        if level not in _TLS_LEVELS:
            raise ValueError(f"{domain}: must be one of {', '.join(_TLS_LEVELS)}; got {level!r}")
        pairs.append((name, level))
    return tuple(sorted(pairs))


def _retry(value: Any) -> tuple[float, ...]:
    steps = _list_of(parse_duration)(value)
    if not steps:
        raise ValueError("needs at least one step")
    return steps  # type: ignore[no-any-return]


_GENERIC: dict[str, Any] = {
    "hostname": _hostname,
    "timeout": parse_duration,
    "command_deadline": parse_duration,
    "min_data_rate": _size_or_zero,
    "min_data_rate_grace": parse_duration,
    "soft_error_limit": _positive_int,
    "error_sleep": _duration_or_zero,
    "junk_command_limit": _positive_int,
    "min_version": _one_of("TLSv1.2", "TLSv1.3"),
    "max_connections": _positive_int,
    "max_connections_per_ip": _positive_int,
    "ipv4_prefix": _prefix(32),
    "ipv6_prefix": _prefix(128),
    "max_connection_rate": _non_negative_int,
    "max_message_size": parse_size,
    "max_data_memory": parse_size,
    "max_recipients": _positive_int,
    "vrfy": _bool,
    "trusted_networks": _list_of(_network),
    "proxy_protocol": _bool,
    "proxy_networks": _list_of(_network),
    "shutdown_grace": parse_duration,
    "greet_wait": _duration_or_zero,
    "auth_failure_limit": _positive_int,
    "tls_listen": _list_of(parse_host_port),
    "allow_plaintext_auth": _bool,
    "concurrency": _positive_int,
    "retry": _retry,
    "max_age": parse_duration,
    "port": _port,
    "smarthost": _optional_host_port,
    "nameservers": _list_of(_nameserver),
    "connect_timeout": parse_duration,
    "command_timeout": parse_duration,
    "data_timeout": parse_duration,
    "attempt_timeout": parse_duration,
    "connection_reuse": _positive_int,
    "connection_idle": parse_duration,
    "max_per_domain": _positive_int,
    "active_limit": _positive_int,
    "delay_warning": _optional_duration,
    "mta_sts": _bool,
    "mta_sts_port": _port,
    "level": _one_of(*_LOG_LEVELS),
    "format": _one_of(*_LOG_FORMATS),
}


# Each worker is a process with its own spool shard (a SQLite file and its WAL, opened by
# every CLI queue command) and an equal share of the node-wide limits (rounded up to at
# least 1, so that many workers stretch them): beyond 256, more than any host's cores, the
# value is a typo that would fork thousands of processes and create as many shards.
MAX_WORKERS = 256


def _workers(value: Any) -> int | None:
    """ "auto" (one per CPU) → None, else a whole number of processes."""
    if value == "auto":
        return None
    if isinstance(value, str):
        raise ValueError(f'expected "auto" or a whole number, got {value!r}')
    workers = _positive_int(value)
    if workers > MAX_WORKERS:
        raise ValueError(f"must be 1-{MAX_WORKERS}, got {workers}")
    return workers


def _non_empty_string(value: Any) -> str:
    text = _string(value)
    if not text:
        raise ValueError("must not be empty")
    return text


def _file_mode(value: Any) -> int:
    """An octal file mode as a string ("0640"): owner read-write, the group and others
    at most read (an IMAP server's user reads; only gsmtp writes)."""
    text = _string(value)
    try:
        mode = int(text, 8)
    except ValueError:
        raise ValueError(f'must be an octal mode like "0600" or "0640"; got {value!r}') from None
    if mode & 0o600 != 0o600 or mode & ~0o644:
        raise ValueError(
            f"must give the owner read and write and others at most read (0600, 0640, 0644);"
            f" got {value!r}"
        )
    return mode


def _server_listen(value: Any) -> tuple[HostPort, ...]:
    listen = _list_of(parse_host_port)(value)
    if not listen:
        raise ValueError("needs at least one address")
    return listen  # type: ignore[no-any-return]


_SELECTOR = re.compile(
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z"
)


def _dkim_key(value: Any) -> DkimKeyConfig:
    """{domain = "example.org", selector = "s1", key = "s1.pem"}: every field needed, no
    other (a typo is an error, as everywhere)."""
    if not isinstance(value, dict):
        raise TypeError(
            f'expected {{domain = "...", selector = "...", key = "..."}}, got {value!r}'
        )
    fields = {"domain", "selector", "key"}
    unknown = sorted(set(value) - fields)
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} in {value!r}")
    missing = sorted(fields - set(value))
    if missing:
        raise ValueError(f"{missing[0]!r} is missing in {value!r}")
    selector = _string(value["selector"])
    if not _SELECTOR.match(selector):
        raise ValueError(f"not a valid selector (RFC 6376 §3.1): {selector!r}")
    return DkimKeyConfig(
        domain=_hostname(value["domain"]).lower().rstrip("."),
        selector=selector,
        key=_non_empty_string(value["key"]),
    )


def replace_path(key: DkimKeyConfig, base: Path) -> DkimKeyConfig:
    """The key's path taken relative to the configuration file's directory."""
    if os.path.isabs(key.key):
        return key
    return dataclasses.replace(key, key=str(base / key.key))


def _dkim_keys(value: Any) -> tuple[DkimKeyConfig, ...]:
    """A list of keys; a domain may have several (an RSA and an Ed25519 one: RFC 8463
    §4 suggests both, since not every verifier knows Ed25519), each selector once."""
    keys: tuple[DkimKeyConfig, ...] = _list_of(_dkim_key)(value)
    seen = set()
    for key in keys:
        if (key.domain, key.selector) in seen:
            raise ValueError(f"selector {key.selector!r} of {key.domain} is listed twice")
        seen.add((key.domain, key.selector))
    return keys


# Keys whose meaning differs between sections.
_SPECIFIC: dict[tuple[str, str], Any] = {
    ("server", "listen"): _server_listen,
    ("server", "workers"): _workers,
    ("server", "cpu_affinity"): _one_of("auto", "off"),
    ("submission", "listen"): _list_of(parse_host_port),
    ("metrics", "listen"): _optional_host_port,
    ("spool", "path"): _non_empty_string,
    ("spool", "min_free"): _reserve,
    ("maildir", "root"): _non_empty_string,
    ("maildir", "group"): _string,
    ("maildir", "mode"): _file_mode,
    ("tls", "cert"): _string,
    ("tls", "key"): _string,
    ("delivery", "tls"): _one_of(*_TLS_LEVELS),
    ("delivery", "tls_policy"): _tls_policy,
    ("delivery", "ca_file"): _string,
    ("delivery", "smarthost_auth_file"): _string,
    ("delivery", "smarthost_tls"): _one_of("", "may", "encrypt", "verify", "implicit"),
    ("dkim", "keys"): _dkim_keys,
}
# Paths taken relative to the configuration file's directory.
_PATH_KEYS = frozenset(
    {
        ("spool", "path"),
        ("maildir", "root"),
        ("tls", "cert"),
        ("tls", "key"),
        ("delivery", "ca_file"),
        ("delivery", "smarthost_auth_file"),
    }
)


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def spool_reserve(config: Config) -> int:
    """The free-space reserve in bytes (0 = off), with the default worked out."""
    if config.spool.min_free is None:
        return 2 * config.server.max_message_size
    return config.spool.min_free


def format_size(size: int) -> str:
    for unit, factor in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def allowed_cpus() -> set[int] | None:
    """The CPUs this process may run on: its affinity mask (taskset, systemd's
    CPUAffinity=, a container's cpuset), not every CPU of the machine; None where the
    platform cannot tell (no sched_getaffinity: macOS)."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None


def available_cpus() -> int:
    """How many CPUs this process may run on (`allowed_cpus`; else every CPU)."""
    allowed = allowed_cpus()
    if allowed is not None:
        return len(allowed) or 1
    return os.cpu_count() or 1


def worker_count(config: Config) -> int:
    """How many worker processes `server.workers` asks for ("auto": one per CPU this
    process may use, at most MAX_WORKERS)."""
    return config.server.workers or min(available_cpus(), MAX_WORKERS)


def _share(limit: int, workers: int) -> int:
    return max(1, -(-limit // workers))  # rounded up, at least 1


def split_limits(config: Config, workers: int) -> Config:
    """One worker's configuration: every node-wide limit divided among `workers`
    (rounded up, at least 1; 0 = "no limit" stays 0). The limits of one session or one
    message (sizes, recipients, errors, timeouts) and the free-space reserve (one file
    system for every shard) are not divided. Nor are the per-client-network connection
    limits (max_connections_per_ip, max_connection_rate): the kernel spreads one
    client's connections unevenly, so a divided limit refused a client far below the
    configured one; each worker enforces the whole limit, and the node lets one network
    have between the limit and `workers` times it. README lists the divided keys."""
    if workers == 1:
        return config
    server, delivery = config.server, config.delivery
    return dataclasses.replace(
        config,
        server=dataclasses.replace(
            server,
            max_connections=_share(server.max_connections, workers),
            max_data_memory=_share(server.max_data_memory, workers),
            auth_failure_limit=_share(server.auth_failure_limit, workers),
        ),
        delivery=dataclasses.replace(
            delivery,
            concurrency=_share(delivery.concurrency, workers),
            max_per_domain=_share(delivery.max_per_domain, workers),
            active_limit=_share(delivery.active_limit, workers),
        ),
    )
