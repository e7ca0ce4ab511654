"""Which CPUs each worker is kept on (`server.cpu_affinity = "auto"`): disjoint sets that
cover every allowed CPU, or none at all where that cannot be done."""

from __future__ import annotations

import pytest

from gsmtp.workers import worker_cpus


@pytest.mark.parametrize(
    ("count", "allowed", "expected"),
    [
        (2, {0, 1}, [{0}, {1}]),  # this machine: one CPU each
        (2, {0, 1, 2, 3}, [{0, 2}, {1, 3}]),  # every other CPU: all of them used
        (3, {0, 1, 2, 3, 4, 5, 6}, [{0, 3, 6}, {1, 4}, {2, 5}]),
        (2, {5, 2}, [{2}, {5}]),  # a cpuset (taskset, CPUAffinity=) of scattered CPUs
    ],
)
def test_the_workers_share_no_cpu_and_use_every_allowed_one(
    count: int, allowed: set[int], expected: list[set[int]]
) -> None:
    found = [worker_cpus(index, count, allowed) for index in range(count)]
    assert found == expected


@pytest.mark.parametrize(
    ("index", "count", "allowed"),
    [
        (0, 1, {0, 1}),  # one process: its threads keep every CPU
        (0, 3, {0, 1}),  # more workers than CPUs: left to the scheduler
        (2, 3, {0, 1}),
        (2, 2, {0, 1}),  # no such worker
    ],
)
def test_none_where_each_worker_cannot_have_cpus_of_its_own(
    index: int, count: int, allowed: set[int]
) -> None:
    assert worker_cpus(index, count, allowed) is None
