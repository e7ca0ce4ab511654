"""The smaller items of "facing the internet": a network typo refused, IDNA2008 / UTS #46,
planted delivery headers removed, the CLI's escapes, and the bounded /metrics endpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent import socket as gsocket

from gsmtp import metrics
from gsmtp.cli import shown
from gsmtp.config import ConfigError, load
from gsmtp.protocol.address import AddressError, parse_domain, parse_path
from gsmtp.protocol.trace import without_fields

# -- configuration --------------------------------------------------------------------


@pytest.mark.parametrize("network", ["203.0.113.7/0", "10.1.2.3/8", "2001:db8::1/64"])
def test_a_network_with_host_bits_set_is_refused_naming_the_key(
    tmp_path: Path, network: str
) -> None:
    path = tmp_path / "gsmtp.toml"
    path.write_text(f'[server]\ntrusted_networks = ["127.0.0.0/8", "{network}"]\n')
    with pytest.raises(ConfigError) as error:
        load(path)
    assert str(error.value).startswith(f"{path}: [server] trusted_networks: '{network}'")
    assert "host bits" in str(error.value)


def test_networks_without_host_bits_and_single_addresses_load(tmp_path: Path) -> None:
    path = tmp_path / "gsmtp.toml"
    path.write_text('[server]\ntrusted_networks = ["0.0.0.0/0", "10.0.0.0/8", "192.0.2.7"]\n')
    assert [str(n) for n in load(path).server.trusted_networks] == [
        "0.0.0.0/0",
        "10.0.0.0/8",
        "192.0.2.7/32",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[tls]\nmin_version = "TLSv1.1"\n', "[tls] min_version: must be one of"),
        ('[server]\ncommand_deadline = "0s"\n', "[server] command_deadline: must be longer"),
        ('[server]\nmin_data_rate = "fast"\n', "[server] min_data_rate: expected a size"),
        ("[server]\nsoft_error_limit = 0\n", "[server] soft_error_limit: must be at least 1"),
        ("[server]\njunk_command_limit = 0\n", "[server] junk_command_limit: must be at least"),
    ],
)
def test_new_keys_name_themselves_on_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "gsmtp.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load(path)


def test_zero_turns_off_the_data_rate_and_the_tarpit(tmp_path: Path) -> None:
    path = tmp_path / "gsmtp.toml"
    path.write_text('[server]\nmin_data_rate = "0"\nerror_sleep = "0s"\n')
    server = load(path).server
    assert (server.min_data_rate, server.error_sleep) == (0, 0.0)


# -- IDNA2008 / UTS #46 ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "a_labels"),
    [
        ("faß.example", "xn--fa-hia.example"),  # IDNA2003 would give fass.example
        ("FAß.Example", "xn--fa-hia.example"),  # UTS #46 maps case
        ("xn--fa-hia.example", "xn--fa-hia.example"),  # IDNA2003 refused this A-label
        ("ＡＢＣ.example", "abc.example"),  # UTS #46 width mapping
        ("bücher.example", "xn--bcher-kva.example"),
    ],
)
def test_domains_are_idna2008_with_uts46(domain: str, a_labels: str) -> None:
    assert parse_domain(domain) == a_labels


@pytest.mark.parametrize("domain", ["☃.example", "a\u200db.example", "xn--a.example"])
def test_names_idna2008_disallows_are_refused(domain: str) -> None:
    assert isinstance(parse_domain(domain), AddressError)


def test_a_utf8_recipient_keeps_its_sharp_s() -> None:
    address = parse_path("<u@faß.example>", allow_null=False, allow_utf8=True)
    assert str(address) == "u@xn--fa-hia.example"


# -- Return-Path / Delivered-To planted by the client ---------------------------------

PLANTED = (
    b"Received: from c.example\r\n\tby mx.foo.com\r\n"
    b"Return-Path: <evil@attacker.example>\r\n"
    b"Subject: hello\r\n"
    b"delivered-to : jones@foo.com,\r\n  other@foo.com\r\n"
    b"X-Kept: yes\r\n"
    b"\r\n"
    b"Return-Path: <in the body, kept>\r\n"
    b"Delivered-To: also kept\r\n"
)


def test_planted_delivery_fields_are_removed_with_their_continuations() -> None:
    assert without_fields(PLANTED) == (
        b"Received: from c.example\r\n\tby mx.foo.com\r\n"
        b"Subject: hello\r\n"
        b"X-Kept: yes\r\n"
        b"\r\n"
        b"Return-Path: <in the body, kept>\r\n"
        b"Delivered-To: also kept\r\n"
    )


def test_the_header_section_ends_at_the_first_line_that_is_not_a_field() -> None:
    no_headers = b"hello there\r\nReturn-Path: <x@y>\r\n"
    assert without_fields(no_headers) is no_headers
    only_headers = b"Subject: s\r\nReturn-Path: <x@y>\r\n"
    assert without_fields(only_headers) == b"Subject: s\r\n"


def test_a_message_without_such_fields_is_returned_as_it_is() -> None:
    body = b"Subject: s\r\n\r\nReturn-Path: body\r\n"
    assert without_fields(body) is body


# -- CLI output -----------------------------------------------------------------------


def test_controls_are_escaped_for_the_terminal() -> None:
    assert shown("evil\x1b[2J\x07.example") == "evil\\x1b[2J\\x07.example"
    assert shown("a\x9bb\x7fc") == "a\\x9bb\\x7fc"  # C1 CSI and DEL
    assert shown("a\u202eb\u2028c") == "a\\u202eb\\u2028c"  # bidi override, separator
    assert shown("line\tand\nmore") == "line\\x09and\\x0amore"
    assert shown("Subject: x\n\tfolded\r\n", multiline=True) == "Subject: x\n\tfolded\\x0d\n"
    assert shown("jörg@faß.example") == "jörg@faß.example"


# -- /metrics -------------------------------------------------------------------------


@pytest.fixture
def metrics_server():  # type: ignore[no-untyped-def]
    servers = []

    def start(**kwargs: float) -> Any:
        server = metrics.start_server("127.0.0.1", 0, lambda: None, **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(timeout=1)


def _closed_within(sock: gsocket.socket, seconds: float) -> bool:
    """True if the peer closes `sock` within `seconds` (gevent-friendly)."""
    with gevent.Timeout(seconds, False):
        while True:
            try:
                if not sock.recv(4096):
                    return True
            except ConnectionResetError:
                return True
    return False


def test_a_slow_metrics_client_is_cut(metrics_server) -> None:  # type: ignore[no-untyped-def]
    port = metrics_server(request_timeout=0.5).server_port
    slow = gsocket.create_connection(("127.0.0.1", port))
    slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the end of it
    assert _closed_within(slow, 10)
    slow.close()
    fine = gsocket.create_connection(("127.0.0.1", port))
    fine.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
    answer = b""
    while chunk := fine.recv(65536):
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and b"gsmtp_connections_total" in answer
    fine.close()


def test_metrics_connections_beyond_the_cap_wait_for_a_slot(metrics_server) -> None:  # type: ignore[no-untyped-def]
    """With one slot held by a silent client, a second client is answered only once the
    first has been cut, not beside it."""
    server = metrics_server(request_timeout=0.5, max_connections=1)
    port = server.server_port
    holder = gsocket.create_connection(("127.0.0.1", port))
    with gevent.Timeout(5):
        while not len(server.pool):  # until the server has taken it into a greenlet
            gevent.sleep(0.005)
    waiting = gsocket.create_connection(("127.0.0.1", port))
    waiting.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
    assert waiting.recv(12).startswith(b"HTTP/1.1 200")
    assert _closed_within(holder, 0.01), "answered while the only slot was taken"
    holder.close()
    waiting.close()


def _scrape(port: int, source: str) -> bytes:
    client = gsocket.create_connection(("127.0.0.1", port), source_address=(source, 0))
    try:
        client.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
        return answer
    finally:
        client.close()


def test_idle_sockets_from_one_address_do_not_starve_a_scrape(metrics_server) -> None:  # type: ignore[no-untyped-def]
    """100 silent connections from 127.0.0.9 (each slot would be held for the 10 s
    request timeout): that address gets at most MAX_PER_PEER slots, so a scrape from
    127.0.0.1 is served while they are all open, within a Prometheus-like timeout."""
    port = metrics_server().server_port
    idle = [
        gsocket.create_connection(("127.0.0.1", port), source_address=("127.0.0.9", 0))
        for _ in range(100)
    ]
    try:
        starved = AssertionError("no answer while the idle sockets were open")
        with gevent.Timeout(8, starved):  # Prometheus' default scrape timeout is 10 s
            answer = _scrape(port, "127.0.0.1")
        assert answer.startswith(b"HTTP/1.1 200") and b"gsmtp_connections_total" in answer
        # The over-cap sockets were closed; those kept are cut at the header deadline.
        still_open = [sock for sock in idle if not _closed_within(sock, 0.01)]
        assert len(still_open) <= metrics.MAX_PER_PEER
    finally:
        for sock in idle:
            sock.close()


def test_a_silent_metrics_client_is_cut_at_the_header_deadline(metrics_server) -> None:  # type: ignore[no-untyped-def]
    """The head of a request has its own deadline, shorter than the request's: a client
    that sends half a request line is cut by it, a complete request is still answered."""
    port = metrics_server(header_timeout=0.2, request_timeout=60).server_port
    for head in (b"GET /metr", b"GET /metrics HTTP/1.1\r\nHost: x\r\n"):
        silent = gsocket.create_connection(("127.0.0.1", port))
        silent.sendall(head)
        assert _closed_within(silent, 10), f"not cut at the header deadline: {head!r}"
        silent.close()
    assert _scrape(port, "127.0.0.1").startswith(b"HTTP/1.1 200")
