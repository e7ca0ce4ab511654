"""The `gsmtp` command: serve, check-config, domain, user, queue, spool, dkim.

`-c FILE` works before or after the subcommand and defaults to $GSMTP_CONFIG, then
./configuration.toml, then /etc/gsmtp/configuration.toml. Errors are one line on stderr
naming what was wrong, with a non-zero exit; never a traceback. `serve` monkey-patches
gevent before anything else is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gsmtp import __version__, queue_cli

# What a terminal could take for a command: C0 controls (ESC starts escape sequences),
# DEL, C1 controls (U+009B is a one-character CSI), and the Unicode line separators and
# bidirectional overrides that rearrange what is shown (CVE-2021-42574, "Trojan Source").
_BIDI_AND_SEPARATORS = r"\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_UNSAFE_IN_LINE = re.compile(rf"[\x00-\x1f\x7f-\x9f{_BIDI_AND_SEPARATORS}]")
_UNSAFE_IN_TEXT = re.compile(rf"[\x00-\x08\x0b-\x1f\x7f-\x9f{_BIDI_AND_SEPARATORS}]")  # \t \n kept


def shown(text: object, *, multiline: bool = False) -> str:
    """Text from the spool (a client's HELO, a remote reply, headers) made safe to print:
    each control character becomes `\\xNN` (`\\uNNNN` above U+00FF). `multiline` keeps
    tabs and line feeds (header folding). --json output is escaped by JSON itself."""
    pattern = _UNSAFE_IN_TEXT if multiline else _UNSAFE_IN_LINE
    return pattern.sub(_escape, str(text))


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _add_config_option(parser: argparse.ArgumentParser, *, top: bool) -> None:
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default=None if top else argparse.SUPPRESS,
        help="configuration file (default: $GSMTP_CONFIG, then ./configuration.toml, "
        "then /etc/gsmtp/configuration.toml)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gsmtp", description="A durable SMTP mail server.")
    parser.add_argument("--version", action="version", version=f"gsmtp {__version__}")
    _add_config_option(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def leaf(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
        child: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        _add_config_option(child, top=False)
        return child

    leaf(commands, "serve", "run the listeners, the queue runner and /metrics")
    check = leaf(commands, "check-config", "validate and print the effective configuration")
    check.add_argument(
        "-n",
        dest="non_default",
        action="store_true",
        help="only settings that differ from the defaults",
    )

    domain = commands.add_parser("domain", help="local domains").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    for action in ("add", "remove"):
        leaf(domain, action, f"{action} a local domain").add_argument("name")
    leaf(domain, "list", "list local domains")

    user = commands.add_parser("user", help="local mailboxes").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    add = leaf(user, "add", "add a mailbox")
    add.add_argument("address")
    add.add_argument("--password-stdin", action="store_true", help="read a password for AUTH")
    _add_may_send_as(add)
    modify = leaf(user, "modify", "change what a user may send as")
    modify.add_argument("address")
    _add_may_send_as(modify)
    modify.add_argument(
        "--no-may-send-as", action="store_true", help="only the user's own address from now on"
    )
    leaf(user, "disable", "refuse the user's AUTH (mail to it is still delivered)").add_argument(
        "address"
    )
    leaf(user, "enable", "allow the user's AUTH again").add_argument("address")
    leaf(user, "remove", "remove a mailbox").add_argument("address")
    passwd = leaf(user, "passwd", "set a mailbox's password (read from stdin)")
    passwd.add_argument("address")
    passwd.add_argument("--password-stdin", action="store_true", help="(the default)")
    leaf(user, "list", "list mailboxes").add_argument("domain", nargs="?")

    queue = commands.add_parser("queue", help="inspect and manage the spool").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    for action, help_text, takes_id in (
        ("list", "one block per message, like mailq (* in delivery, ! held)", False),
        ("stats", "counts by status", False),
        ("show", "envelope and headers of one message", True),
        ("bounce", "return a message to its sender now", True),
    ):
        child = leaf(queue, action, help_text)
        if takes_id:
            child.add_argument("id")
        if action == "list":
            child.add_argument(
                "--corrupt", action="store_true", help="messages set aside as unreadable"
            )
            queue_cli.add_filter_options(child)
        child.add_argument("--json", action="store_true", help="machine-readable output")
    queue_cli.add_commands(lambda name, help_text: leaf(queue, name, help_text))

    spool = commands.add_parser("spool", help="the spool file itself").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    backup = leaf(spool, "backup", "a consistent copy into DEST while the server runs")
    backup.add_argument("destination", metavar="DEST", help="directory for the copy")
    backup.add_argument("--force", action="store_true", help="replace an existing copy")

    dkim = commands.add_parser("dkim", help="DKIM signing keys").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    keygen = dkim.add_parser(
        "keygen", help="write a new private key (0600) and print the DNS TXT record to publish"
    )
    keygen.add_argument("domain", metavar="DOMAIN")
    keygen.add_argument("selector", metavar="SELECTOR")
    keygen.add_argument("--type", choices=("rsa", "ed25519"), default="rsa", dest="key_type")
    keygen.add_argument(
        "--out", metavar="FILE", help="where to write the key (default: SELECTOR.DOMAIN.pem)"
    )
    return parser


def _add_may_send_as(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--may-send-as",
        action="append",
        default=[],
        metavar="ADDRESS|@DOMAIN",
        help="after AUTH, MAIL FROM may also be this address or any of this domain "
        "(repeatable; modify replaces the list)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    from gsmtp.journal import prefix_stderr_under_journald

    prefix_stderr_under_journald()  # before argparse, whose errors are stderr lines too
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        # A SIGHUP or SIGUSR1 from here on is remembered, not fatal (its default
        # action), until the server's handlers are installed: systemd or a certbot hook
        # may reload a server that is starting.
        from gsmtp import early_signals

        early_signals.defer()
    os.umask(0o077)
    if args.command == "dkim":
        try:
            return _dkim_keygen(args)  # needs no configuration
        except _CliError as error:
            print(f"gsmtp: {shown(error)}", file=sys.stderr)
            return 1
    from gsmtp.config import SYSTEM_CONFIG, ConfigError, load, resolve_path

    path = resolve_path(args.config)
    if not args.config and not os.environ.get("GSMTP_CONFIG") and not path.exists():
        print(
            f"gsmtp: no configuration: neither ./{path} nor {SYSTEM_CONFIG} exists "
            "(give -c FILE or set $GSMTP_CONFIG)",
            file=sys.stderr,
        )
        return 2
    if args.command == "check-config":
        return _check_config(args, path)
    try:
        config = load(path)
    except ConfigError as error:
        for problem in error.errors:
            print(f"gsmtp: {shown(problem)}", file=sys.stderr)
        return 2
    if args.command in _SPOOL_COMMANDS:
        from gsmtp.spool_owner import Refused, adopt_spool_owner

        _load_spool_modules()
        adopted = adopt_spool_owner(config.spool.path)
        if isinstance(adopted, Refused):
            print(f"gsmtp: {shown(adopted.reason)}", file=sys.stderr)
            return 1
    handler = _HANDLERS[args.command]
    import apsw

    try:
        status = handler(args, config)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except _CliError as error:
        print(f"gsmtp: {shown(error)}", file=sys.stderr)
        return 1
    except apsw.Error as error:
        print(f"gsmtp: spool {shown(config.spool.path)}: {shown(error)}", file=sys.stderr)
        return 1
    except (ImportError, LookupError) as error:
        # A module imported late, after a root CLI became the spool's owner, from an
        # interpreter that user cannot read (what was done before it stays done).
        print(
            f"gsmtp: {shown(error)} (cannot load part of Python as the spool's owner;"
            " install gsmtp where that user can read it)",
            file=sys.stderr,
        )
        return 1
    except BrokenPipeError:
        # The reader went away (`gsmtp queue list | head`): stop quietly, as cat does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _load_spool_modules() -> None:
    """Import what the spool commands run before a root CLI becomes the spool's owner:
    the interpreter may live where only root can read (a pyenv under /root)."""
    import codecs

    import gsmtp.accounts
    import gsmtp.backup
    import gsmtp.queue_cli
    import gsmtp.queue_control
    import gsmtp.spool_admin  # noqa: F401

    # Text files opened with an explicit encoding (lockfile reads /proc/locks as ASCII)
    # look their codec up, importing encodings.<name> the first time: cached now.
    for encoding in ("ascii", "latin-1", "utf-8"):
        codecs.lookup(encoding)


# Commands that open the spool: as root they run as its owner (gsmtp.spool_owner).
_SPOOL_COMMANDS = frozenset({"domain", "user", "queue", "spool"})


class _CliError(Exception):
    pass


def _serve(args: argparse.Namespace, config: Any) -> int:
    from gsmtp.config import worker_count

    count = worker_count(config)
    if count > 1:
        # The supervisor forks the workers before gevent is imported; each worker
        # monkey-patches itself.
        from gsmtp import workers

        return workers.serve(config, count)
    from gevent import monkey

    monkey.patch_all()  # first, before anything imports socket or ssl
    from gsmtp.app import serve

    return serve(config)


class _Toml(str):
    """A value check-config prints as it is (already TOML), not as JSON."""


def _inline_table(values: dict[str, str]) -> str:
    return "{" + ", ".join(f"{key} = {json.dumps(value)}" for key, value in values.items()) + "}"


def _check_config(args: argparse.Namespace, path: Any) -> int:
    """Every problem at once (exit 2 for the file's, 1 for the machine's), or the
    effective settings (`-n`: only those that differ from the defaults)."""
    from gsmtp.config import load_collecting, parse
    from gsmtp.config_check import environment_problems, non_default

    config, errors = load_collecting(path)
    for problem in errors:
        print(f"gsmtp: {shown(problem)}", file=sys.stderr)
    problems = environment_problems(config)
    for problem in problems:
        print(f"gsmtp: {shown(problem)}", file=sys.stderr)
    if errors or problems:
        return 2 if errors else 1
    sections = _effective(config)
    if args.non_default:
        sections = non_default(sections, _effective(parse({}, path)))
    else:
        print(f"# effective configuration from {shown(config.path)}")
    if config.submission.listen and not config.tls.enabled:
        print(
            "# warning: [submission] listen without [tls]: AUTH without encryption, "
            "safe only behind a TLS-terminating proxy (allow_plaintext_auth = true)"
        )
    for number, (name, values) in enumerate(sections.items()):
        print(f"{'' if number == 0 and args.non_default else chr(10)}[{name}]")
        for key, value in values.items():
            bare = key.replace("_", "").isalnum()  # a domain of tls_policy is quoted
            shown_value = value if isinstance(value, _Toml) else json.dumps(value)
            print(f"{key if bare else json.dumps(key)} = {shown_value}")
    return 0


def _effective(config: Any) -> dict[str, dict[str, Any]]:
    """The settings as check-config prints them, by section."""
    from gsmtp.config import format_duration, format_size

    server = config.server
    sections: dict[str, dict[str, Any]] = {
        "server": {
            "hostname": server.hostname,
            "listen": [str(a) for a in server.listen],
            "workers": "auto" if server.workers is None else server.workers,
            "cpu_affinity": server.cpu_affinity,
            "timeout": format_duration(server.timeout),
            "command_deadline": format_duration(server.command_deadline),
            "min_data_rate": format_size(server.min_data_rate) if server.min_data_rate else "0",
            "min_data_rate_grace": format_duration(server.min_data_rate_grace),
            "max_connections": server.max_connections,
            "max_connections_per_ip": server.max_connections_per_ip,
            "ipv4_prefix": server.ipv4_prefix,
            "ipv6_prefix": server.ipv6_prefix,
            "max_connection_rate": server.max_connection_rate,
            "max_message_size": format_size(server.max_message_size),
            "max_data_memory": format_size(server.max_data_memory),
            "max_recipients": server.max_recipients,
            "soft_error_limit": server.soft_error_limit,
            "error_sleep": format_duration(server.error_sleep),
            "junk_command_limit": server.junk_command_limit,
            "vrfy": server.vrfy,
            "trusted_networks": [str(n) for n in server.trusted_networks],
            "proxy_protocol": server.proxy_protocol,
            "proxy_networks": [str(n) for n in server.proxy_networks],
            "shutdown_grace": format_duration(server.shutdown_grace),
            "greet_wait": format_duration(server.greet_wait),
            "auth_failure_limit": server.auth_failure_limit,
        },
        "tls": {
            "cert": config.tls.cert,
            "key": config.tls.key,
            "min_version": config.tls.min_version,
        },
        "submission": {
            "listen": [str(a) for a in config.submission.listen],
            "tls_listen": [str(a) for a in config.submission.tls_listen],
            "allow_plaintext_auth": config.submission.allow_plaintext_auth,
        },
        "spool": {
            "path": config.spool.path,
            "min_free": ""
            if config.spool.min_free is None
            else str(config.spool.min_free and format_size(config.spool.min_free)),
        },
        "maildir": {
            "root": config.maildir.root,
            "group": config.maildir.group,
            "mode": f"{config.maildir.mode:04o}",
        },
        "delivery": {
            "concurrency": config.delivery.concurrency,
            "retry": [format_duration(s) for s in config.delivery.retry],
            "max_age": format_duration(config.delivery.max_age),
            "port": config.delivery.port,
            "smarthost": config.delivery.smarthost,
            "nameservers": [str(n) for n in config.delivery.nameservers],
            "connect_timeout": format_duration(config.delivery.connect_timeout),
            "command_timeout": format_duration(config.delivery.command_timeout),
            "data_timeout": format_duration(config.delivery.data_timeout),
            "attempt_timeout": format_duration(config.delivery.attempt_timeout),
            "connection_reuse": config.delivery.connection_reuse,
            "connection_idle": format_duration(config.delivery.connection_idle),
            "max_per_domain": config.delivery.max_per_domain,
            "active_limit": config.delivery.active_limit,
            "delay_warning": (
                format_duration(config.delivery.delay_warning)
                if config.delivery.delay_warning is not None
                else ""
            ),
            "tls": config.delivery.tls,
            "ca_file": config.delivery.ca_file,
            "smarthost_auth_file": config.delivery.smarthost_auth_file,
            "smarthost_tls": config.delivery.smarthost_tls,
            "mta_sts": config.delivery.mta_sts,
            "mta_sts_port": config.delivery.mta_sts_port,
        },
        "delivery.tls_policy": dict(config.delivery.tls_policy),
        "dkim": {
            "keys": _Toml(
                "["
                + ", ".join(
                    _inline_table({"domain": k.domain, "selector": k.selector, "key": k.key})
                    for k in config.dkim.keys
                )
                + "]"
            )
        },
        "metrics": {"listen": config.metrics.listen},
        "log": {"level": config.log.level, "format": config.log.format},
    }
    return sections


def _open_db(config: Any) -> Any:
    from gsmtp import db

    try:
        return db.connect(config.spool.path)
    except db.DatabaseError as error:
        raise _CliError(f"cannot open the spool: {error}") from None


def _domain(args: argparse.Namespace, config: Any) -> int:
    from gsmtp.accounts import AccountError, Accounts

    accounts = Accounts(_open_db(config))
    try:
        if args.action == "add":
            print(f"domain {shown(accounts.add_domain(args.name))} added")
        elif args.action == "remove":
            print(f"domain {shown(accounts.remove_domain(args.name))} removed (with its users)")
        else:
            for name in accounts.list_domains():
                print(shown(name))
    except AccountError as error:
        raise _CliError(str(error)) from None
    return 0


def _read_password() -> str:
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise _CliError("no password on standard input")
    return password


def _user(args: argparse.Namespace, config: Any) -> int:
    from gsmtp.accounts import AccountError, Accounts

    accounts = Accounts(_open_db(config))
    try:
        if args.action == "add":
            password = _read_password() if args.password_stdin else None
            print(
                f"user {shown(accounts.add_user(args.address, password, args.may_send_as))} added"
            )
        elif args.action == "modify":
            if not args.may_send_as and not args.no_may_send_as:
                raise _CliError("nothing to change: give --may-send-as or --no-may-send-as")
            if args.may_send_as and args.no_may_send_as:
                raise _CliError("--may-send-as and --no-may-send-as contradict each other")
            key = accounts.set_may_send_as(args.address, args.may_send_as)
            _, grants = accounts.user_details(key)
            print(f"user {shown(key)} may send as: {shown(' '.join([key, *grants]))}")
        elif args.action in ("disable", "enable"):
            key = accounts.set_disabled(args.address, args.action == "disable")
            print(f"user {shown(key)} {args.action}d")
        elif args.action == "remove":
            print(f"user {shown(accounts.remove_user(args.address))} removed")
        elif args.action == "passwd":
            address = accounts.set_password(args.address, _read_password())
            print(f"password of {shown(address)} set")
        else:
            for address, disabled, grants in accounts.list_user_details(args.domain):
                notes = (["disabled"] if disabled else []) + [f"may-send-as={g}" for g in grants]
                print(shown("  ".join([address, *notes])))
    except AccountError as error:
        raise _CliError(str(error)) from None
    return 0


def _when(timestamp: float) -> str:
    return time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(timestamp))


def _queue(args: argparse.Namespace, config: Any) -> int:
    """Every queue command acts on every spool shard (one per worker)."""
    from gsmtp.spool_admin import EveryShard, SpoolAdmin

    if args.action not in _QUEUE_ACTIONS:
        try:
            return queue_cli.run(_open_shards(config), config.spool.path, args)
        except queue_cli.QueueCliError as error:
            raise _CliError(str(error)) from None
    action: Callable[[Any, argparse.Namespace], int] = _QUEUE_ACTIONS[args.action]
    try:
        status = action(EveryShard([SpoolAdmin(c) for c in _open_shards(config)]), args)
    except queue_cli.QueueCliError as error:
        raise _CliError(str(error)) from None
    if args.action == "bounce":
        queue_cli.wake(config.spool.path)
    return status


def _open_shards(config: Any) -> list[Any]:
    """A connection to every spool shard that exists: shard 0 (spool.path) first."""
    from gsmtp import db, shards

    connections = [_open_db(config)]
    for index, path in shards.existing(config.spool.path):
        if index:
            try:
                connections.append(db.connect(path))
            except db.NotASpool as error:  # a stray file with a shard's name holds no mail
                print(f"gsmtp: warning: left out {error}", file=sys.stderr)
            except db.DatabaseError as error:
                raise _CliError(f"cannot open the spool shard: {error}") from None
    return connections


def _queue_list(admin: Any, args: argparse.Namespace) -> int:
    messages = admin.messages(corrupt=args.corrupt)
    selection = queue_cli.filter_from(args)
    if not selection.empty:
        chosen = set(admin.matching(selection, time.time()))
        messages = [m for m in messages if m.id in chosen]
    if args.json:
        print(json.dumps([_listed(m) for m in messages], indent=2))
        return 0
    if not messages:
        print("No corrupt messages" if args.corrupt else "Mail queue is empty")
        return 0
    for message in messages:
        sender = shown(message.sender)
        # mailq's marks: `*` being delivered now, `!` held, nothing: waiting.
        mark = "!" if message.held else "*" if message.in_delivery else ""
        print(
            f"{shown(message.id) + mark:<20} {message.size:>8} {_when(message.received_at)}"
            f"  <{sender}>"
        )
        if message.corrupt:
            print(f"{'':<20} corrupt: {shown(message.corrupt)}")
        elif message.held:
            print(f"{'':<20} held: released by `gsmtp queue release {shown(message.id)}`")
        elif message.next_attempt_at is not None:
            print(f"{'':<20} next attempt: {_when(message.next_attempt_at)}")
        for rcpt in message.recipients:
            error = f"  ({shown(rcpt.last_error)})" if rcpt.last_error else ""
            address = shown(rcpt.address)
            print(f"{'':<20} {rcpt.status:<9} attempts={rcpt.attempts}  <{address}>{error}")
        print()
    total = sum(m.size for m in messages)
    print(f"-- {total // 1024} Kbytes in {len(messages)} Requests.")
    return 0


def _listed(message: Any) -> dict[str, Any]:
    """A message of `queue list --json`, with its state and next attempt."""
    return {
        **asdict(message),
        "in_delivery": message.in_delivery,
        "next_attempt_at": message.next_attempt_at,
    }


def _queue_stats(admin: Any, args: argparse.Namespace) -> int:
    stats = admin.stats()
    if args.json:
        print(json.dumps(stats))
    else:
        for key, value in stats.items():
            print(f"{shown(key)}: {shown(value)}")
    return 0


def _queue_show(admin: Any, args: argparse.Namespace) -> int:
    message = admin.message(args.id)
    if message is None:
        raise _CliError(f"no such message: {args.id}")
    headers = admin.headers(args.id).decode("utf-8", "replace")
    if args.json:
        print(json.dumps({**asdict(message), "headers": headers}, indent=2))
        return 0
    print(f"id: {shown(message.id)}\nsender: <{shown(message.sender)}>\nsize: {message.size}")
    print(f"arrived: {_when(message.received_at)}\nclient: {shown(message.client)}")
    print(f"helo: {shown(message.helo)}")
    for rcpt in message.recipients:
        error = f" ({shown(rcpt.last_error)})" if rcpt.last_error else ""
        print(f"recipient: <{shown(rcpt.address)}> {rcpt.status} attempts={rcpt.attempts}{error}")
    print()
    print(shown(headers.replace("\r\n", "\n"), multiline=True), end="")
    return 0


def _queue_change(verb: str, method: str) -> Callable[[Any, argparse.Namespace], int]:
    def run(admin: Any, args: argparse.Namespace) -> int:
        target = getattr(args, "id", None)
        result = getattr(admin, method)(target) if target else getattr(admin, method)()
        if target and not result:
            raise _CliError(f"no such message (or nothing queued): {target}")
        if args.json:
            print(json.dumps({"action": verb, "id": target, "count": int(result)}))
        else:
            print(f"{verb}: {shown(target) if target else int(result)}")
        return 0

    return run


_QUEUE_ACTIONS: dict[str, Callable[[Any, argparse.Namespace], int]] = {
    "list": _queue_list,
    "stats": _queue_stats,
    "show": _queue_show,
    "bounce": _queue_change("bouncing", "bounce"),
}


def _spool(args: argparse.Namespace, config: Any) -> int:
    from gsmtp.backup import BackupError, backup_spool

    try:
        made = backup_spool(config.spool.path, args.destination, overwrite=args.force)
    except BackupError as error:
        raise _CliError(f"backup failed: {error}") from None
    for reason in made.left_out:
        print(f"gsmtp: warning: left out {reason}", file=sys.stderr)
    for copy in made.copies:
        print(f"spool copied to {copy.path} ({copy.size} bytes)")
    return 0


def _dkim_keygen(args: argparse.Namespace) -> int:
    """Write a new key, never over an existing file, readable by its owner only; print
    the TXT record for the domain's zone and the [dkim] entry that uses the key."""
    from gsmtp.config import ConfigError, parse

    try:  # the same checks as a [dkim] keys entry
        (entry,) = parse(
            {"dkim": {"keys": [{"domain": args.domain, "selector": args.selector, "key": "-"}]}},
            Path("keygen"),
        ).dkim.keys
    except ConfigError as error:
        raise _CliError(str(error).partition("keys: ")[2] or str(error)) from None
    from gsmtp.dkim import generate_key, load_key, zone_line

    out = Path(args.out or f"{entry.selector}.{entry.domain}.pem")
    pem = generate_key(args.key_type)
    try:
        descriptor = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise _CliError(f"{out} exists; a key in use is never overwritten") from None
    except OSError as error:
        raise _CliError(f"cannot write {out}: {error.strerror}") from None
    with os.fdopen(descriptor, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)  # whatever the umask
        handle.write(pem)
    key = load_key(entry.domain, entry.selector, str(out))
    print(f"# {args.key_type} key written to {shown(out)}; publish this TXT record:")
    print(zone_line(key))
    table = _inline_table(
        {"domain": entry.domain, "selector": entry.selector, "key": str(out.resolve())}
    )
    print(f"# and add to [dkim] keys: {shown(table)}")
    return 0


_HANDLERS: dict[str, Callable[[argparse.Namespace, Any], int]] = {
    "serve": _serve,
    "domain": _domain,
    "user": _user,
    "queue": _queue,
    "spool": _spool,
}


if __name__ == "__main__":
    sys.exit(main())
