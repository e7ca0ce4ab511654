"""The fuzz harnesses' checks over their seeds and every crash file kept as a regression
(tests/fuzz/crashes/<harness>-*), under pytest: no atheris needed, and a fixed crash
stays fixed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fuzz import fuzz_address, fuzz_session

FUZZ = Path(__file__).parents[1] / "fuzz"
HARNESSES: dict[str, Callable[[bytes], None]] = {
    "session": fuzz_session.check_one,
    "address": fuzz_address.check_one,
}
CASES = [
    (name, path)
    for name in HARNESSES
    for path in sorted((FUZZ / "seeds" / name).iterdir())
    + sorted((FUZZ / "crashes").glob(f"{name}-*"))
]


@pytest.mark.parametrize(("harness", "path"), CASES, ids=lambda v: getattr(v, "name", v))
def test_fuzz_input(harness: str, path: Path) -> None:
    HARNESSES[harness](path.read_bytes())


def test_the_oracles_accept_a_message_and_refuse_garbage() -> None:
    stream = b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nx\r\n.\r\n"
    fuzz_session.check_one(b"\x00\xff" + stream)
    with pytest.raises(AssertionError):
        fuzz_session.check_replies(b"250 ok\r\ngarbage")
