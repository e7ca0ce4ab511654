"""Transcript-driven SMTP dialogues, run both against a bare session and a live server.

A transcript is a text file of steps:

    C: EHLO bar.com          send the line with CRLF
    C~ b"DATA\\r\\nx\\n.\\n"   send raw bytes (a Python bytes literal)
    S: 250 2.1.5             expect the next reply: its code (and enhanced code, if given)
    S* 250                   expect a multi-line reply ending with this code
    X:                       expect the server to have closed the connection
    # comment

Codes must match; texts may differ, as in the issue's transcript.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

TRANSCRIPTS = Path(__file__).parent / "transcripts"


class Wire(Protocol):
    def send(self, data: bytes) -> None: ...

    def read_reply(self) -> list[str]:
        """The next complete reply as its lines (without CRLF); [] when closed."""
        ...


@dataclass(frozen=True)
class Step:
    kind: str
    payload: str


def load(name: str) -> list[Step]:
    steps = []
    for raw in (TRANSCRIPTS / name).read_text().splitlines():
        line = raw.rstrip("\n")
        if not line.strip() or line.startswith("#"):
            continue
        kind, payload = line[:2], line[3:] if len(line) > 3 else ""
        if kind not in ("C:", "C~", "S:", "S*", "X:"):
            raise ValueError(f"{name}: bad step {line!r}")
        steps.append(Step(kind, payload))
    return steps


def run(steps: list[Step], wire: Wire) -> None:
    for number, step in enumerate(steps, 1):
        if step.kind == "C:":
            wire.send(step.payload.encode("utf-8") + b"\r\n")
        elif step.kind == "C~":
            wire.send(ast.literal_eval(step.payload))
        elif step.kind == "X:":
            reply = wire.read_reply()
            assert reply == [], f"step {number}: expected close, got {reply!r}"
        else:
            reply = wire.read_reply()
            assert reply, f"step {number}: expected {step.payload!r}, connection closed"
            expected = step.payload.split()
            last = reply[-1]
            got = last[4:].split()[: len(expected) - 1]
            assert last[:3] == expected[0], (
                f"step {number}: expected {step.payload!r}, got {reply!r}"
            )
            assert got == expected[1:], f"step {number}: expected {step.payload!r}, got {reply!r}"
            if step.kind == "S:":
                assert len(reply) == 1, f"step {number}: expected one line, got {reply!r}"
