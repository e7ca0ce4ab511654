"""Once started, a server freezes what it has built and spaces its collections."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gsmtp import collector


@pytest.fixture
def restored_collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_collector")
def test_settling_freezes_the_started_objects_and_spaces_young_collections() -> None:
    gc.unfreeze()
    long_lived = [object() for _ in range(10)]
    collector.settle_after_start()
    assert gc.get_threshold() == (collector.YOUNGEST, collector.OLDER, collector.OLDER)
    assert gc.get_freeze_count() >= len(long_lived)
    assert not any(item is long_lived for item in gc.get_objects(generation=2))


@pytest.mark.usefixtures("restored_collector")
def test_cycles_made_after_settling_are_still_collected() -> None:
    collector.settle_after_start()

    class Node:
        partner: object = None

    first, second = Node(), Node()
    first.partner, second.partner = second, first
    del first, second
    assert gc.collect() >= 2
