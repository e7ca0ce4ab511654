"""Listening sockets, bound the same way by the server and by the workers' supervisor.

Standard library only (the supervisor binds before any worker exists, without gevent;
a worker wraps the inherited descriptor in gevent's socket after monkey-patching).
"""

from __future__ import annotations

import socket

BACKLOG = 1024


def bind_listener(host: str, port: int) -> socket.socket:
    """A TCP socket listening on host:port (IPv6 only for an IPv6 address). OSError
    when the address cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        listener.bind((host, port))
        listener.listen(BACKLOG)
    except BaseException:
        listener.close()
        raise
    return listener
