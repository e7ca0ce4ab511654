"""A bare gevent SMTP sink that stores nothing: the ceiling any durable server is held
against. Answers every command at once, reads DATA in bulk.

    python -m bench.sink --listen 127.0.0.1:2700

As the relay cells' MX it counts what it received: `XSTA` (a verb of its own) answers
`250 <messages> <wall-clock time of the last one>`.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from gevent.server import StreamServer  # noqa: E402

_EHLO = (
    b"250-sink.bench\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n250-8BITMIME\r\n"
    b"250 ENHANCEDSTATUSCODES\r\n"
)


class Received:
    """Messages received so far, and when the last one was (wall clock)."""

    count = 0
    last = 0.0


def handle(sock: socket.socket, _address: Any) -> None:
    sock.sendall(b"220 sink.bench ESMTP\r\n")
    buffer = b""
    in_data = False
    while True:
        chunk = sock.recv(262144)
        if not chunk:
            return
        buffer += chunk
        out = []
        while True:
            if in_data:
                end = buffer.find(b"\r\n.\r\n")
                if end < 0:
                    buffer = buffer[-4:]
                    break
                buffer = buffer[end + 5 :]
                in_data = False
                Received.count += 1
                Received.last = time.time()
                out.append(b"250 2.0.0 Ok\r\n")
                continue
            newline = buffer.find(b"\r\n")
            if newline < 0:
                break
            verb = buffer[:4].upper()
            buffer = buffer[newline + 2 :]
            if verb == b"EHLO":
                out.append(_EHLO)
            elif verb == b"DATA":
                out.append(b"354 go\r\n")
                in_data = True
                buffer = b"\r\n" + buffer  # the first line may be the end
            elif verb == b"XSTA":
                out.append(f"250 {Received.count} {Received.last:.6f}\r\n".encode())
            elif verb == b"QUIT":
                sock.sendall(b"".join(out) + b"221 bye\r\n")
                return
            else:
                out.append(b"250 Ok\r\n")
        if out:
            sock.sendall(b"".join(out))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", default="127.0.0.1:2700")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    StreamServer((host, int(port)), handle, backlog=1024).serve_forever()


if __name__ == "__main__":
    main()
