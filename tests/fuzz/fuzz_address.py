"""atheris harness: the RFC 5321 path parser fed arbitrary text (P-53, P-36..P-43).

    python tests/fuzz/fuzz_address.py -max_total_time=30 -artifact_prefix=var/fuzz/ \
        var/fuzz/address tests/fuzz/seeds/address

An input is one byte of flags (bit 0: the null path allowed; bit 1: SMTPUTF8) and the
path as UTF-8 (undecodable bytes are replaced). A failing input is written as
`var/fuzz/crash-<sha1>`; give that file as the argument to run it again.

What must hold: `parse_path` returns an Address or an AddressError and raises nothing;
an Address prints back to a path that parses to the same Address (the form written to
the spool and to the next hop means what was accepted), within RFC 5321's size limits,
with its domain normalised for good (`parse_domain` of it gives it back).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's gsmtp

from gsmtp.protocol.address import (
    MAX_DOMAIN,
    MAX_LOCAL_PART,
    Address,
    AddressError,
    parse_domain,
    parse_path,
)


def check_one(data: bytes) -> None:
    if not data:
        return
    flags, text = data[0], data[1:].decode("utf-8", "replace")
    allow_null, allow_utf8 = bool(flags & 1), bool(flags & 2)
    result = parse_path(text, allow_null=allow_null, allow_utf8=allow_utf8)
    assert isinstance(result, Address | AddressError), result
    if isinstance(result, AddressError):
        return
    if result.is_null:
        assert allow_null
        return
    assert len(result.local.encode("utf-8")) <= MAX_LOCAL_PART
    assert len(result.domain) <= MAX_DOMAIN
    assert allow_utf8 or str(result).isascii()
    again = parse_path(f"<{result}>", allow_null=False, allow_utf8=True)
    assert again == result, f"{text!r} → {result!r} → {again!r}"
    assert parse_domain(result.domain) == result.domain


def fuzz_one_input(data: bytes) -> None:
    """The libFuzzer entry point."""
    check_one(data)


def main() -> None:
    import atheris

    atheris.instrument_all()
    atheris.Setup(sys.argv, fuzz_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
