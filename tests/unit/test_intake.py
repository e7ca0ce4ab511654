"""The budget for bodies in flight: reads sized to the room left, never below MIN_READ."""

from __future__ import annotations

from gsmtp.intake import MIN_READ, DataMemory


def test_reads_shrink_with_the_room_left_but_never_below_the_minimum() -> None:
    memory = DataMemory(1_000_000)
    first, second = memory.account(), memory.account()
    assert memory.read_size(262_144) == 262_144
    first.set(900_000)
    assert memory.read_size(262_144) == 100_000
    second.set(200_000)
    assert memory.exceeded and memory.read_size(262_144) == MIN_READ
    first.set(0)
    assert not memory.exceeded and memory.used == 200_000
    second.set(0)
    assert memory.used == 0
