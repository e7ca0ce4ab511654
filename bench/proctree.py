"""A server's process tree from /proc: the PID a harness started and what it forked.

With `server.workers` > 1 gsmtp's PID is the supervisor and the work happens in the
worker processes it forked (and restarts): a cell that measures or kills "the server"
must find them. Plain /proc reads, no gevent: both the gevent bench tools (bench.idle)
and the plain harness (bench.e2e) use it.
"""

from __future__ import annotations

import os


def children(pid: int) -> list[int]:
    """The live children of `pid` (every thread's /proc/<pid>/task/<tid>/children)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as listed:
                found += [int(child) for child in listed.read().split()]
        except OSError:
            continue
    return found


def node_pids(pid: int) -> list[int]:
    """`pid` and all its live descendants (the supervisor and its workers), parents first."""
    found, index = [pid], 0
    while index < len(found):
        found += [child for child in children(found[index]) if child not in found]
        index += 1
    return found


def open_fds(pid: int) -> int:
    """How many file descriptors `pid` has open (0 if it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0
