"""The bench keeps a repeated end-to-end cell as its median run, with every run."""

from __future__ import annotations

from bench.e2e import EndToEnd, combine_runs, median_of
from bench.report import _e2e_section, _e2e_targets


def run(rate: float, delivered: int = 100, note: str = "") -> EndToEnd:
    return EndToEnd("local", "gsmtp", True, 100, 100, delivered, 5000.0, rate, 1.0, note=note)


def test_the_median_run_is_kept_with_every_runs_rate_in_order() -> None:
    kept = median_of([run(1500.0), run(1200.0), run(1800.0)])
    assert kept.delivered_per_s == 1500.0
    assert kept.runs == [1500.0, 1200.0, 1800.0]
    assert kept.exact_runs == 3


def test_a_run_that_lost_or_duplicated_mail_is_counted_and_its_note_kept() -> None:
    kept = median_of(
        [run(1500.0), run(900.0, delivered=97, note="3 accepted messages not delivered")]
    )
    assert kept.delivered_per_s == 1500.0  # of two, the upper
    assert kept.exact_runs == 1
    assert kept.note == "run 2: 3 accepted messages not delivered"


def test_a_run_that_failed_leaves_the_exactly_once_target_unmet() -> None:
    """Of three runs of gsmtp's local cell, one failed (it could not start, or the load
    broke off): nothing says that run delivered every accepted message exactly once,
    so the target must not read "exactly once in 2 of 2 runs: yes"."""
    runs = {"local: gsmtp": [run(1500.0), run(1200.0)]}
    failures = {"local: gsmtp": ["run 2: failed: gsmtp did not start listening"]}
    cells, skipped = combine_runs(runs, failures)
    assert skipped == {}
    checks: list[tuple[str, str, bool | None]] = []
    _e2e_targets({"e2e": cells}, lambda *check: checks.append(check))
    [(_, said, met)] = [check for check in checks if "exactly once" in check[0]]
    assert met is False, said
    assert "of 3 runs" in said, said
    assert cells[0].note == "run 2: failed: gsmtp did not start listening"


def test_a_failed_runs_multi_line_reason_keeps_the_table_one_row_per_cell() -> None:
    """A run that failed puts its reason in the kept cell's note, a table cell of
    RESULTS.md: bench.load's stderr (a traceback: several lines, maybe a `|`) must not
    break the row (the smoke test's parser, and the table, want 10 cells a row)."""
    reason = (
        "run 3: failed: bench.load failed: Traceback (most recent call last):\n"
        '  File "bench/load.py", line 335, in check\n'
        "RuntimeError: expected 250, got b'451 4.3.0 | try later'"
    )
    cells, _ = combine_runs(
        {"local: gsmtp": [run(1500.0), run(1200.0)]}, {"local: gsmtp": [reason]}
    )
    section = _e2e_section({"e2e": cells})
    rows = [line for line in section if line.startswith("| local")]
    assert len(rows) == 1, section
    assert len(rows[0].strip("|").split("|")) == 10, rows[0]
    assert "Traceback" in rows[0]
