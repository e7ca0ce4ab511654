"""`gsmtp queue hold|release|flush|delete|summary` and the filters: arguments in, text out.

The work is gsmtp.queue_control's (one spool connection in, a value out); this module
only parses the command line, prints what came back and wakes the running server after
a change (SIGUSR1, so it acts and logs at once). Errors are `QueueCliError`, shown by
the CLI as one line. Nothing beyond the standard library and gsmtp.config is imported
before a command runs: `gsmtp serve` must monkey-patch gevent first.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from gsmtp.config import parse_duration

if TYPE_CHECKING:
    import apsw

    from gsmtp.queue_control import Filter, Summary


class QueueCliError(Exception):
    """What the operator asked for cannot be done; the text says why."""


def add_filter_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sender", metavar="TEXT", help="the sender address contains TEXT")
    parser.add_argument("--recipient", metavar="TEXT", help="a recipient address contains TEXT")
    parser.add_argument("--domain", metavar="DOMAIN", help="a recipient still queued for DOMAIN")
    parser.add_argument(
        "--older-than", metavar="AGE", help='arrived more than AGE ago ("30m", "2h", "5d")'
    )


def add_commands(leaf: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """The queue actions this module runs, added through the CLI's `leaf(name, help)`."""
    for action, help_text in (
        ("hold", "keep messages from delivery until released (postsuper -h)"),
        ("release", "let held messages go: due now (postsuper -H)"),
        ("delete", "delete messages without notice (postsuper -d)"),
    ):
        child = leaf(action, help_text)
        child.add_argument("ids", nargs="*", metavar="ID")
        child.add_argument("--all", action="store_true", help="every message the filters select")
        add_filter_options(child)
        child.add_argument("--json", action="store_true", help="machine-readable output")
    flush = leaf("flush", "make queued mail due now and forget dead destinations (postqueue -f)")
    flush.add_argument("ids", nargs="*", metavar="ID", help="only these messages")
    flush.add_argument("--domain", metavar="DOMAIN", help="only recipients for DOMAIN")
    flush.add_argument("--json", action="store_true", help="machine-readable output")
    summary = leaf("summary", "queued messages by destination domain and age (qshape)")
    summary.add_argument("--json", action="store_true", help="machine-readable output")


def filter_from(args: argparse.Namespace) -> Filter:
    from gsmtp.queue_control import Filter

    older = getattr(args, "older_than", None)
    try:
        older_than = parse_duration(older) if older is not None else None
    except ValueError as error:
        raise QueueCliError(f"--older-than: {error}") from None
    return Filter(
        sender=_given(args, "sender"),
        recipient=_given(args, "recipient"),
        domain=_given(args, "domain"),
        older_than=older_than,
    )


def _given(args: argparse.Namespace, name: str) -> str | None:
    """The value of a text filter; an empty one (`--sender "$UNSET"`) is refused: it
    would match every message, and `queue delete` would then delete the whole queue."""
    value = getattr(args, name, None)
    if value is None:
        return None
    if not value.strip().rstrip("."):
        raise QueueCliError(f"--{name}: an empty value would select every message")
    return str(value)


def run(connections: Sequence[apsw.Connection], spool_path: str, args: argparse.Namespace) -> int:
    """One of this module's actions against every spool shard in `connections` (their
    results summed); the exit status. `spool_path` names the spool whose server is woken."""
    from gsmtp import queue_control

    now = time.time()
    if args.action == "summary":
        summaries = [queue_control.summary(c, now) for c in connections]
        print_summary(functools.reduce(lambda a, b: a.merged(b), summaries), as_json=args.json)
        return 0
    if args.action == "flush":
        ids = args.ids or None
        domain = _given(args, "domain")
        count = sum(queue_control.flush(c, now, ids=ids, domain=domain) for c in connections)
        wake(spool_path)
        if args.json:
            print(json.dumps({"action": "flushed", "id": args.ids or None, "count": count}))
        else:
            print(f"flushed: {count}")
        return 0
    selection = filter_from(args)
    if not args.ids and not args.all and selection.empty:
        raise QueueCliError(f"queue {args.action}: give message ids, filters, or --all")
    change: Callable[..., list[str]] = getattr(queue_control, args.action)
    changed = [
        message_id
        for connection in connections
        for message_id in change(connection, selection, now, args.ids or None)
    ]
    wake(spool_path)
    verb = {"hold": "held", "release": "released", "delete": "deleted"}[args.action]
    if args.json:
        print(json.dumps({"action": verb, "ids": changed, "count": len(changed)}))
    else:
        for message_id in changed:
            print(f"{verb}: {message_id}")
        print(f"{len(changed)} message{'s' if len(changed) != 1 else ''} {verb}")
    missing = set(args.ids) - set(changed)
    if args.ids and missing:
        raise QueueCliError(f"not {verb} (unknown, or already so): {' '.join(sorted(missing))}")
    return 0


def print_summary(summary: Summary, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"buckets_minutes": list(summary.buckets), "domains": summary.rows}))
        return
    width = max([len("TOTAL"), *(len(d) for d in summary.rows)])
    heads = ["T", *(str(b) for b in summary.buckets), f"{summary.buckets[-1]}+"]
    print(" " * width + " " + " ".join(f"{h:>5}" for h in heads))
    for name, counts in [("TOTAL", summary.total()), *summary.rows.items()]:
        cells = [sum(counts), *counts]
        print(f"{name:>{width}} " + " ".join(f"{c:>5}" for c in cells))


def wake(spool_path: str) -> None:
    """Tell the running server (if any) to act now; a note on stderr if it cannot be."""
    from gsmtp import queue_control

    woken = queue_control.wake_server(spool_path)
    if isinstance(woken, queue_control.NotWoken) and woken.running:
        print(
            f"gsmtp: server not signalled ({woken.reason}); it sees the change within a second",
            file=sys.stderr,
        )
