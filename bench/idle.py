"""Idle capacity: open N connections that read the greeting and then stay silent, and
report the server's RSS growth per connection.

    python -m bench.idle --target 127.0.0.1:2525 -n 10000 --pid PID

Raises RLIMIT_NOFILE to its hard limit and spreads the connections over several
127.0.0.x source addresses (ephemeral ports run out near 28,000 per address). At the end
every connection is asked for a NOOP: one that does not answer 250 counts as dropped.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
from gevent.pool import Pool  # noqa: E402

from bench.load import parse_target  # noqa: E402

PER_SOURCE = 2000


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def open_one(target: tuple[str, int], source: str) -> socket.socket | None:
    try:
        sock = socket.create_connection(target, timeout=30, source_address=(source, 0))
        if not sock.recv(512).startswith(b"220"):
            sock.close()
            return None
        return sock
    except OSError:
        return None


def still_there(sock: socket.socket) -> bool:
    try:
        sock.sendall(b"NOOP\r\n")
        return sock.recv(512).startswith(b"250")
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle")
    parser.add_argument("--target", type=parse_target, default=("127.0.0.1", 2525))
    parser.add_argument("-n", "--connections", type=int, default=10000)
    parser.add_argument("--pid", type=int, required=True, help="the server's PID")
    parser.add_argument("--hold", type=float, default=2.0, help="seconds to hold them idle")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not 1 <= args.connections <= 50000:
        parser.error("connections must be 1..50000")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.connections + 100 > hard:
        parser.error(f"RLIMIT_NOFILE hard limit {hard} is too low for {args.connections}")
    baseline = rss_kib(args.pid)
    pool = Pool(500)
    sources = [
        f"127.0.{2 + i // 250}.{1 + i % 250}" for i in range(args.connections // PER_SOURCE + 1)
    ]
    jobs = [
        pool.spawn(open_one, args.target, sources[i // PER_SOURCE]) for i in range(args.connections)
    ]
    pool.join(timeout=300)
    socks = [job.value for job in jobs if job.value is not None]
    time.sleep(args.hold)
    held = rss_kib(args.pid)
    checks = [pool.spawn(still_there, sock) for sock in socks]
    pool.join(timeout=120)
    alive = sum(1 for job in checks if job.value)
    for sock in socks:
        sock.close()
    gevent.sleep(0)
    result = {
        "connections": args.connections,
        "opened": len(socks),
        "dropped": args.connections - alive,
        "rss_before_kib": baseline,
        "rss_held_kib": held,
        "rss_growth_kib": held - baseline,
        "kib_per_connection": round((held - baseline) / max(len(socks), 1), 2),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
