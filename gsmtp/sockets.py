"""Listening sockets, bound the same way by the server and by the workers' supervisor;
and `send_all`, the way replies and commands are written.

Standard library only (the supervisor binds before any worker exists, without gevent;
a worker wraps the inherited descriptor in gevent's socket after monkey-patching).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

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


def bound_to(sock: socket.socket, host: str, port: int) -> bool:
    """Whether `sock` is bound to host:port (how a socket systemd passed is matched to
    a configured address: ListenStream= must name the address `listen` names)."""
    try:
        name = sock.getsockname()
        return (
            isinstance(name, tuple)
            and name[1] == port
            and ipaddress.ip_address(name[0]) == ipaddress.ip_address(host)
        )
    except (OSError, ValueError):
        return False


def take_bound(sockets: list[socket.socket], host: str, port: int) -> socket.socket | None:
    """The socket of `sockets` bound to host:port, removed from the list; None if none."""
    for index, candidate in enumerate(sockets):
        if bound_to(candidate, host, port):
            return sockets.pop(index)
    return None


def send_all(sock: Any, data: bytes | memoryview) -> None:
    """`sock.sendall(data)`, as one send when the socket takes it all, as it does a
    reply or a group of commands. gevent's sendall asks the kernel for the socket's
    buffer size (a getsockopt system call) on every call, to size its chunks: on the
    server that was a system call for each of the three or four replies a message
    gets. The rest of a partial send, and the waiting, are left to sendall; a timeout
    set on the socket applies to each of the two calls."""
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])
