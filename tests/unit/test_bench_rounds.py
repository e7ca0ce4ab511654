"""The bench's key cells run in rounds, the peers' order reversed every other round, and
each cell keeps the median of its rounds with every round's rate (bench/compare.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import compare, workdirs
from bench.compare import KEY_CELLS, Cell, Measurement, PeerRuns, median_of, round_order
from bench.peers import Peer
from bench.report import _targets


def test_the_order_is_reversed_every_other_round_and_neighbours_stay_neighbours() -> None:
    peers = ["gsmtp", "postfix", "aiosmtpd+sqlite", "gsmtp-w2", "gsmtp-w1"]
    rounds = round_order(peers, 3)
    assert rounds == [peers, peers[::-1], peers]
    for order in rounds:  # the workers pair side by side in every round
        assert abs(order.index("gsmtp-w2") - order.index("gsmtp-w1")) == 1
    assert round_order(peers, 1) == [peers]
    assert peers == ["gsmtp", "postfix", "aiosmtpd+sqlite", "gsmtp-w2", "gsmtp-w1"]


def measurement(rate: float, accepted: int = 100) -> Measurement:
    return Measurement(rate, rate / 100, 1.0, 2.0, 50.0, accepted, 0)


def test_a_cell_keeps_its_median_round_with_every_rounds_rate_in_order() -> None:
    kept = median_of([measurement(1500.0), measurement(1200.0), measurement(1800.0)])
    assert kept.msgs_per_s == 1500.0
    assert kept.runs == [1500.0, 1200.0, 1800.0]


def test_a_start_that_lost_mail_fails_the_target_though_the_totals_balance() -> None:
    """The counts add up every start of the peer: one start storing 5 more than it was
    seen to accept must not hide another's 5 lost."""
    found = PeerRuns(runs={(100, 100, 1024): [measurement(1000.0)]})
    found.accepted, found.stored, found.missing = 200, 200, 5
    results = found.results()
    assert results["missing"] == 5
    rows = {
        name: (value, met)
        for name, value, met in _targets({"results": {"gsmtp": results}, "idle": {}, "skipped": {}})
    }
    value, met = rows["every accepted message stored"]
    assert met is False and "5 missing" in value, value


class FakePeer(Peer):
    """Starts (or fails to, in the rounds in `fails`) and stores what it is told to:
    measure's bookkeeping without a server."""

    def __init__(self, name: str, log: list[str], fails: int = 0, stores: int = 0) -> None:
        super().__init__()
        self.name, self.log, self.fails, self.stores = name, log, fails, stores

    def start(self, workdir: Path) -> None:
        self.log.append(self.name)
        if self.log.count(self.name) == self.fails:
            raise RuntimeError("did not start listening")

    @property
    def pid(self) -> int:
        return 0

    def stored(self) -> int:
        return self.stores


@pytest.fixture
def no_servers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`compare.measure` without servers or load: every cell measures 1,000 msg/s and
    10 messages accepted; cell directories go under `tmp_path`."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setattr(workdirs, "_run", None)
    monkeypatch.setattr(compare, "settle", lambda peer, limit=0.0: None)
    monkeypatch.setattr(compare, "run_load", lambda peer, cell, seconds: measurement(1000.0, 10))


def test_a_start_that_fails_loses_that_round_only(no_servers: None) -> None:
    """B fails to start in round 2: its two other rounds are kept and the failure said;
    A's three rounds are all there. The counts add up each peer's good starts."""
    log: list[str] = []
    a, b = FakePeer("A", log, stores=30), FakePeer("B", log, fails=2, stores=25)
    found = compare.measure([a, b], [Cell(*key) for key in KEY_CELLS], 0.1, 3)
    workdirs.remove_all()
    assert log == ["A", "B", "B", "A", "A", "B"]
    assert [len(found["A"].runs[key]) for key in KEY_CELLS] == [3, 3, 3]
    assert [len(found["B"].runs[key]) for key in KEY_CELLS] == [2, 2, 2]
    assert found["A"].failures == []
    assert found["B"].failures == ["failed in round 2: did not start listening"]
    assert (found["A"].accepted, found["A"].stored, found["A"].missing) == (90, 90, 0)
    assert (found["B"].accepted, found["B"].stored, found["B"].missing) == (60, 50, 10)


def test_the_workers_pair_runs_its_own_extra_rounds_still_alternating(
    no_servers: None,
) -> None:
    """Three common rounds of every key peer, then two more of the workers pair alone,
    its order still reversed every other round; each keeps every round it ran."""
    log: list[str] = []
    a, w2, w1 = FakePeer("A", log, stores=30), FakePeer("w2", log), FakePeer("w1", log)
    w2.stores = w1.stores = 10
    cells = [Cell(*key) for key in KEY_CELLS]
    found = compare.measure([a, w2, w1], cells, 0.1, 3, workers=[w2, w1], workers_repeats=5)
    workdirs.remove_all()
    assert log == ["A", "w2", "w1", "w1", "w2", "A", "A", "w2", "w1", "w1", "w2", "w2", "w1"]
    assert [len(found["A"].runs[key]) for key in KEY_CELLS] == [3, 3, 3]
    assert {key: len(runs) for key, runs in found["w2"].runs.items()} == {KEY_CELLS[0]: 5}
    assert {key: len(runs) for key, runs in found["w1"].runs.items()} == {KEY_CELLS[0]: 5}
    assert (found["w1"].accepted, found["w1"].stored) == (50, 50)


def test_the_workers_row_gives_each_rounds_ratio_in_order() -> None:
    """The target is the ratio of the two medians; beside it, two workers ÷ one round by
    round (the pair ran side by side in each), so a reader sees how far they swing."""
    two = [measurement(r) for r in (7000.0, 6300.0, 8000.0, 7500.0, 6600.0)]
    one = [measurement(r) for r in (5000.0, 5000.0, 6400.0, 5000.0, 6000.0)]
    results = {
        "gsmtp-w2": {KEY_CELLS[0]: median_of(two)},
        "gsmtp-w1": {KEY_CELLS[0]: median_of(one)},
    }
    rows = {
        name: (value, met)
        for name, value, met in _targets({"results": results, "idle": {}, "skipped": {}})
    }
    value, met = rows["Acknowledged, C=100 M=100 1 KiB: workers = 2 ≥ 1.3× workers = 1"]
    assert value.startswith("1.40×; rounds 1.40×, 1.26×, 1.25×, 1.50×, 1.10×"), value
    assert met is True


def test_no_rounds_of_the_pair_alone_when_the_pair_is_not_measured(
    no_servers: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--peers gsmtp`: the workers pair is left out, and so are its extra rounds (no
    empty rounds announced)."""
    log: list[str] = []
    a = FakePeer("A", log, stores=30)
    pair = [FakePeer("w2", []), FakePeer("w1", [])]
    announced: list[str] = []
    monkeypatch.setattr("builtins.print", lambda *args, **_: announced.append(str(args[0])))
    compare.measure([a], [Cell(*key) for key in KEY_CELLS], 0.1, 3, workers=pair, workers_repeats=5)
    workdirs.remove_all()
    assert log == ["A", "A", "A"]
    assert [line for line in announced if line.startswith("key cells, round")] == [
        f"key cells, round {n} of 3: A" for n in (1, 2, 3)
    ]
