"""The HAProxy PROXY protocol header, versions 1 and 2, as a sans-I/O parser.

A load balancer in front of gsmtp opens its own TCP connection to us, so the socket's
peer is the balancer; the PROXY header it sends first names the real client
(https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt). Whoever parses that
header decides relay rights and limits, so the parser is strict: anything that is not
exactly a well-formed header is an error, and the connection is closed without a word.

Feeding: `ProxyHeaderParser.feed(chunk)` returns `NEED_MORE` (every byte fed so far is
part of the header: keep them and feed more), a `ProxyHeader` whose `length` says how
many of the bytes fed belong to the header (the rest is the client's SMTP), or a
`ProxyError`. The I/O shell peeks at the socket, feeds what it saw, and then reads
exactly the header's bytes, so what follows stays in the socket for the early-talker
check and for a TLS handshake.

No I/O, no clock: the deadline for the header is the shell's.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

V1_PREFIX = b"PROXY "
# The longest v1 line, "PROXY UNKNOWN ffff:…:ffff ffff:…:ffff 65535 65535\r\n" (spec §2.1).
V1_MAX_LENGTH = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH = 16
# v2 may carry up to 64 KiB of TLVs; a balancer's usual ones (ALPN, authority, unique
# id, SSL details) fit easily in this, and anything longer is refused.
V2_MAX_LENGTH = 4096

_V2_LOCAL, _V2_PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM = 0x1
_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_IPV4_TEXT = re.compile(rb"[0-9.]{7,15}")
_IPV6_TEXT = re.compile(rb"[0-9A-Fa-f:.]{2,45}")

IPAddress = IPv4Address | IPv6Address


@dataclass(frozen=True, slots=True)
class Endpoint:
    ip: IPAddress
    port: int


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete header. `source` is None when the header names no client (v1
    UNKNOWN, v2 LOCAL, v2 UNSPEC or UNIX): the connection's own addresses then stand."""

    version: int
    length: int  # bytes of the header, from its first byte; what follows is SMTP
    source: Endpoint | None = None
    destination: Endpoint | None = None
    local: bool = False  # v2 LOCAL: the balancer's own connection (e.g. a health check)


@dataclass(frozen=True, slots=True)
class ProxyError:
    """Not a valid PROXY header; `reason` is for the log."""

    reason: str


class NeedMore:
    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE = NeedMore()

ProxyResult = ProxyHeader | ProxyError | NeedMore


class ProxyHeaderParser:
    """Accumulates the bytes of one header (at most `V2_MAX_LENGTH`) and parses them."""

    def __init__(self, v2_max_length: int = V2_MAX_LENGTH) -> None:
        self._buffer = b""
        self._v2_max_length = v2_max_length

    def feed(self, data: bytes) -> ProxyResult:
        """Add `data`; with NEED_MORE every byte of it belongs to the header."""
        self._buffer += data
        buffer = self._buffer
        if buffer[:1] == V1_PREFIX[:1]:
            return self._v1(buffer)
        if buffer[:1] == V2_SIGNATURE[:1]:
            return self._v2(buffer)
        if not buffer:
            return NEED_MORE
        return ProxyError("not a PROXY header")

    # -- version 1: one text line ------------------------------------------------------

    def _v1(self, buffer: bytes) -> ProxyResult:
        head = buffer[: len(V1_PREFIX)]
        if head != V1_PREFIX[: len(head)]:
            return ProxyError("not a PROXY header")
        end = buffer.find(b"\r\n", 0, V1_MAX_LENGTH)
        if end < 0:
            if b"\n" in buffer[:V1_MAX_LENGTH]:
                return ProxyError("v1: line not ended by CRLF")
            if len(buffer) >= V1_MAX_LENGTH:
                return ProxyError(f"v1: no CRLF within {V1_MAX_LENGTH} bytes")
            return NEED_MORE
        return _parse_v1_line(buffer[:end], end + 2)

    # -- version 2: binary --------------------------------------------------------------

    def _v2(self, buffer: bytes) -> ProxyResult:
        signature = buffer[: len(V2_SIGNATURE)]
        if signature != V2_SIGNATURE[: len(signature)]:
            return ProxyError("not a PROXY header")
        if len(buffer) < V2_FIXED_LENGTH:
            return NEED_MORE
        version_command, family_transport, length = struct.unpack_from("!BBH", buffer, 12)
        if version_command >> 4 != 2:
            return ProxyError(f"v2: unsupported version {version_command >> 4}")
        command = version_command & 0x0F
        if command not in (_V2_LOCAL, _V2_PROXY):
            return ProxyError(f"v2: unknown command {command}")
        total = V2_FIXED_LENGTH + length
        if total > self._v2_max_length:
            return ProxyError(f"v2: header of {total} bytes, more than {self._v2_max_length}")
        if len(buffer) < total:
            return NEED_MORE
        if command == _V2_LOCAL:
            return ProxyHeader(version=2, length=total, local=True)
        return _parse_v2_addresses(family_transport, buffer[V2_FIXED_LENGTH:total], total)


def _parse_v1_line(line: bytes, length: int) -> ProxyHeader | ProxyError:
    fields = line.split(b" ")
    if fields[1:2] == [b"UNKNOWN"]:
        return ProxyHeader(version=1, length=length)  # the rest of the line is ignored
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        return ProxyError("v1: expected PROXY TCP4|TCP6|UNKNOWN src dst sport dport")
    _, protocol, source_ip, destination_ip, source_port, destination_port = fields
    pattern, family = (
        (_IPV4_TEXT, IPv4Address) if protocol == b"TCP4" else (_IPV6_TEXT, IPv6Address)
    )
    endpoints = []
    for ip_text, port_text in ((source_ip, source_port), (destination_ip, destination_port)):
        if not pattern.fullmatch(ip_text):
            return ProxyError(f"v1: bad {protocol.decode()} address")
        try:
            ip: IPAddress = family(ip_text.decode("ascii"))
        except ValueError:
            return ProxyError(f"v1: bad {protocol.decode()} address")
        if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
            return ProxyError("v1: bad port")
        endpoints.append(Endpoint(ip, int(port_text)))
    return ProxyHeader(version=1, length=length, source=endpoints[0], destination=endpoints[1])


def _parse_v2_addresses(family_transport: int, block: bytes, length: int) -> ProxyResult:
    family, transport = family_transport >> 4, family_transport & 0x0F
    if family in (_AF_UNSPEC, _AF_UNIX):
        # No IP client to name: the spec says to use the connection's own addresses.
        return ProxyHeader(version=2, length=length)
    if family not in (_AF_INET, _AF_INET6):
        return ProxyError(f"v2: unknown address family {family}")
    if transport != _STREAM:
        return ProxyError("v2: not a stream (TCP) connection")
    size = 4 if family == _AF_INET else 16
    if len(block) < 2 * size + 4:
        return ProxyError("v2: length too short for the addresses")
    address: type[IPv4Address] | type[IPv6Address] = (
        IPv4Address if family == _AF_INET else IPv6Address
    )
    source_port, destination_port = struct.unpack_from("!HH", block, 2 * size)
    # What follows the addresses (TLVs) is skipped.
    return ProxyHeader(
        version=2,
        length=length,
        source=Endpoint(address(block[:size]), source_port),
        destination=Endpoint(address(block[size : 2 * size]), destination_port),
    )
