"""`send_all`: one send for what the socket takes at once, sendall for the rest."""

from __future__ import annotations

import gevent
import gevent.socket

from gsmtp.sockets import send_all


class TakesSome:
    """A socket whose send takes at most `room` bytes; records every call."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.calls: list[tuple[str, bytes]] = []

    def send(self, data: bytes | memoryview) -> int:
        taken = bytes(data[: self.room])
        self.calls.append(("send", taken))
        return len(taken)

    def sendall(self, data: bytes | memoryview) -> None:
        self.calls.append(("sendall", bytes(data)))

    def getsockopt(self, *args: object) -> int:
        raise AssertionError("send_all asked for the buffer size")


def test_a_reply_the_socket_takes_whole_is_one_send() -> None:
    sock = TakesSome(room=1000)
    send_all(sock, b"250 2.0.0 Ok: queued\r\n")
    assert sock.calls == [("send", b"250 2.0.0 Ok: queued\r\n")]


def test_what_one_send_left_goes_to_sendall_in_order() -> None:
    sock = TakesSome(room=4)
    send_all(sock, memoryview(b"MAIL FROM:<a@b>\r\n"))
    assert sock.calls == [("send", b"MAIL"), ("sendall", b" FROM:<a@b>\r\n")]


def test_more_than_a_socket_buffer_arrives_whole_on_a_real_socket() -> None:
    """The reader drains slowly, so the first send is partial and sendall waits."""
    left, right = gevent.socket.socketpair()
    payload = bytes(range(256)) * 40_000  # 10 MB: far past the socket buffers
    received = bytearray()

    def read() -> None:
        while len(received) < len(payload):
            gevent.sleep(0.001)
            received.extend(right.recv(65536))

    reader = gevent.spawn(read)
    try:
        send_all(left, payload)
        reader.get(timeout=30)
    finally:
        left.close()
        right.close()
    assert bytes(received) == payload
