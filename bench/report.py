"""Turn a `bench.compare` run into bench/RESULTS.md and bench/results.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
KiB = 1024


def _rate(report: dict[str, Any], peer: str, key: tuple[int, int, int]) -> float | None:
    cell = report["results"].get(peer, {}).get(key)
    return cell.msgs_per_s if cell is not None else None


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


def _targets(report: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    g = "gsmtp"
    key1, key2, key3 = (100, 100, KiB), (100, 1, KiB), (10, 100, 100 * KiB)
    gsmtp1, postfix1, aio1 = (
        _rate(report, g, key1),
        _rate(report, "postfix", key1),
        _rate(report, "aiosmtpd+sqlite", key1),
    )
    gsmtp2, postfix2 = _rate(report, g, key2), _rate(report, "postfix", key2)
    gsmtp3, postfix3 = _rate(report, g, key3), _rate(report, "postfix", key3)
    rows: list[tuple[str, str, bool | None]] = []

    def check(name: str, value: str, ok: bool | None) -> None:
        rows.append((name, value, ok))

    check(
        "C=100 M=100 1 KiB ≥ 5,000 msgs/s", f"{gsmtp1 or 0:,.0f}", bool(gsmtp1 and gsmtp1 >= 5000)
    )
    check(
        "… and ≥ 3× Postfix",
        _ratio(gsmtp1, postfix1),
        None if not postfix1 else bool(gsmtp1 and gsmtp1 >= 3 * postfix1),
    )
    check(
        "… and ≥ 3× aiosmtpd+sqlite",
        _ratio(gsmtp1, aio1),
        None if not aio1 else bool(gsmtp1 and gsmtp1 >= 3 * aio1),
    )
    check("C=100 M=1 1 KiB ≥ 2,000 msgs/s", f"{gsmtp2 or 0:,.0f}", bool(gsmtp2 and gsmtp2 >= 2000))
    check(
        "… and ≥ 2× Postfix",
        _ratio(gsmtp2, postfix2),
        None if not postfix2 else bool(gsmtp2 and gsmtp2 >= 2 * postfix2),
    )
    check(
        "C=10 M=100 100 KiB ≥ 1.5× Postfix",
        _ratio(gsmtp3, postfix3),
        None if not postfix3 else bool(gsmtp3 and gsmtp3 >= 1.5 * postfix3),
    )
    cells = report["results"].get(g, {})
    p99 = [cells[k].p99_ms for k in (key1, key2) if k in cells]
    check(
        "p99 DATA-end→250 at C=100 ≤ 20 ms",
        ", ".join(f"{v:.1f} ms" for v in p99),
        bool(p99) and max(p99) <= 20,
    )
    idle = report["idle"].get(g)
    if idle:
        check(
            f"{idle['connections']:,} idle connections across all workers ≤ 12 KiB each"
            " (node's summed PSS growth), none dropped",
            f"{idle['kib_per_connection']:.1f} KiB ({idle.get('memory', 'rss').upper()},"
            f" {idle['processes']} processes), {idle['dropped']} dropped",
            idle["kib_per_connection"] <= 12
            and idle["dropped"] == 0
            and idle["opened"] == idle["connections"],
        )
    else:
        check("10,000 idle connections ≤ 12 KiB each", "not measured", None)
    _e2e_targets(report, check)
    w2, w1 = _rate(report, "gsmtp-w2", key1), _rate(report, "gsmtp-w1", key1)
    check(
        "Acknowledged, C=100 M=100 1 KiB: workers = 2 ≥ 1.3× workers = 1",
        (_ratio(w2, w1) + _round_ratios(report, key1) + _cpu_per_message(report, key1))
        if w2 and w1
        else _not_measured(report, "gsmtp-w2", "gsmtp-w1"),
        bool(w2 and w1 and w2 >= 1.3 * w1) if w2 and w1 else None,
    )
    results = report["results"].get(g, {})
    if "stored" in results:
        check(
            "every accepted message stored",
            f"{results['accepted']:,} accepted, {results['stored']:,} stored{_missing(results)}",
            results["stored"] >= results["accepted"] and not results.get("missing"),
        )
    return rows


def _missing(results: dict[Any, Any]) -> str:
    """`, **12 missing** …` where a start of the peer stored fewer than it accepted (the
    totals add up every start, where one's surplus could hide another's shortfall)."""
    missing = results.get("missing", 0)
    return f", **{missing:,} missing** in the starts that stored less" if missing else ""


def _not_measured(report: dict[str, Any], *peers: str) -> str:
    """Why a row has no figure: the reason a peer was skipped, or that it was not asked for."""
    reasons = [f"{p}: {report['skipped'][p]}" for p in peers if p in report["skipped"]]
    return "not measured (" + ("; ".join(reasons) or "not in this run's --peers") + ")"


def _pair_cells(report: dict[str, Any], key: Any) -> list[Any]:
    """The workers cells at `key`: two workers', then one worker's (None if not run)."""
    return [report["results"].get(name, {}).get(key) for name in ("gsmtp-w2", "gsmtp-w1")]


def _round_ratios(report: dict[str, Any], key: Any) -> str:
    """`; rounds 1.36×, 1.26×, …`: two workers ÷ one in each round, in the order they
    ran (the pair runs side by side in a round, so each round's ratio shares the
    machine's state of the moment). Empty unless both ran the same rounds, more than one."""
    cells = _pair_cells(report, key)
    runs = [getattr(cell, "runs", None) or [] for cell in cells]
    if len(runs[0]) < 2 or len(runs[0]) != len(runs[1]) or not all(runs[1]):
        return ""
    return "; rounds " + ", ".join(f"{two / one:.2f}×" for two, one in zip(*runs, strict=True))


def _cpu_per_message(report: dict[str, Any], key: Any) -> str:
    """CPU per accepted message of the two workers cells and of their load generator
    (on 2 cores, workers = 2 is bound by all three together; workers = 1 by its one
    event loop). Empty for results from before these were measured."""
    cells = _pair_cells(report, key)
    if not all(getattr(cell, "cpu_us_per_msg", 0) for cell in cells):
        return ""
    w2, w1 = cells
    return (
        f" (CPU per message: {w2.cpu_us_per_msg:,.0f} µs with 2 workers,"
        f" {w1.cpu_us_per_msg:,.0f} µs with 1; load generator"
        f" {w2.load_cpu_us_per_msg:,.0f} / {w1.load_cpu_us_per_msg:,.0f} µs)"
    )


def _e2e(report: dict[str, Any], kind: str, peer: str) -> Any:
    return next(
        (c for c in report.get("e2e", []) if c.kind == kind and c.peer == peer),
        None,
    )


def _e2e_targets(report: dict[str, Any], check: Any) -> None:
    if not report.get("e2e"):
        check("End-to-end cells", "not run", None)
        return
    gsmtp, postfix = _e2e(report, "local", "gsmtp"), _e2e(report, "local", "postfix-local")
    probe = _e2e(report, "probe", "probe (fsync)")
    if gsmtp is not None:
        wanted = [x for x in (postfix and 2 * postfix.delivered_per_s,) if x]
        if probe is not None:
            wanted.append(0.8 * probe.delivered_per_s)
        bar = min(wanted) if wanted else None
        of_postfix = postfix.delivered_per_s if postfix else None
        of_probe = probe.delivered_per_s if probe else None
        check(
            "End to end, local, 1 KiB C=100 M=100: ≥ 2× Postfix local(8)"
            " or ≥ 0.8 of the probe, whichever is lower",
            f"{gsmtp.delivered_per_s:,.0f} msg/s{_median_note(gsmtp)}"
            f" ({_ratio(gsmtp.delivered_per_s, of_postfix)}"
            f" Postfix{_median_note(postfix)}, {_ratio(gsmtp.delivered_per_s, of_probe)} probe)",
            None if bar is None else gsmtp.delivered_per_s >= bar,
        )
        # A run that failed is one that did not show every message delivered exactly once.
        failed = gsmtp.failed_runs
        every_run = (len(gsmtp.runs) or 1) + failed
        check(
            "… every accepted message in a Maildir exactly once",
            f"{gsmtp.accepted:,} accepted, {gsmtp.delivered:,} delivered"
            + (
                f"; exactly once in {gsmtp.exact_runs} of {every_run} runs"
                + (f" ({failed} failed)" if failed else "")
                if every_run > 1
                else ""
            ),
            gsmtp.exact_runs == every_run and gsmtp.delivered == gsmtp.accepted,
        )
    _kill_target(report, check)
    relay, postfix_relay = _e2e(report, "relay", "gsmtp"), _e2e(report, "relay", "postfix-relay")
    if relay is not None:
        check(
            "End to end, relay to a sink: ≥ 2× Postfix relaying to the same sink",
            f"{relay.delivered_per_s:,.0f} msg/s{_median_note(relay)}"
            f" ({_ratio(relay.delivered_per_s, postfix_relay and postfix_relay.delivered_per_s)}"
            f" Postfix{_median_note(postfix_relay)})",
            None
            if postfix_relay is None
            else relay.delivered_per_s >= 2 * postfix_relay.delivered_per_s,
        )


def _median_note(cell: Any) -> str:
    """`, median of 1,200 / 1,350 / 1,410` for a cell run more than once."""
    if cell is None or len(cell.runs) + cell.failed_runs < 2:
        return ""
    failed = f" ({cell.failed_runs} failed)" if cell.failed_runs else ""
    return ", median of " + _rates(cell.runs) + failed


def _rates(runs: list[float]) -> str:
    """Every run's rate, in order: `1,200 / 1,350 / 1,410`."""
    return " / ".join(f"{rate:,.0f}" for rate in runs)


def _kill_target(report: dict[str, Any], check: Any) -> None:
    from bench.e2e import KillCell

    name = (
        "No message lost: kill -9 of one worker during the local e2e cell, then restart:"
        " every message answered 250 in a Maildir (duplicates allowed, counted)"
    )
    cell = report.get("e2e_kill")
    if cell is None:
        return
    if not isinstance(cell, KillCell):
        check(name, f"not measured: {cell}", None)
        return
    killed = cell.killed_pid is not None and cell.restarted_pid is not None
    value = f"missing {cell.missing}, duplicates {cell.duplicates}"
    value += f" ({cell.accepted:,} answered 250, {cell.files:,} files"
    if cell.killed_pid is None:
        value += "; **no worker was killed**)"
    else:
        worker = "" if cell.killed_worker is None else f" {cell.killed_worker}"
        value += f"; worker{worker} killed after {cell.killed_after:,} acknowledged)"
    check(name, value, None if cell.killed_pid is None else killed and cell.missing == 0)


def write_results(
    path: Path,
    report: dict[str, Any],
    cells: list[Any],
    cross: dict[str, float],
    machine: dict[str, str],
) -> None:
    peers = list(report["results"])
    repeats = report.get("repeats", 3)
    workers_repeats = report.get("workers_repeats", repeats)
    rounds = (
        f"The key cells ran in {repeats} alternating rounds and the workers cells in"
        f" {workers_repeats}"
        if workers_repeats != repeats
        else f"The key cells (and the workers cells) ran in {repeats} alternating rounds"
    )
    lines = [
        "# Benchmark results",
        "",
        f"Written by `make bench` (`python -m bench.compare`) on {machine['date']}:"
        f" {machine['cores']} cores, Python {machine['python']}, Linux {machine['kernel']}."
        " Every peer ran on this machine in the same run, loaded by `bench.load` (one epoll"
        " loop, PIPELINING where offered) over loopback. Each cell lasts a few seconds with"
        " sessions repeated. "
        + (
            rounds
            + ", each peer started fresh in each round and the order of the peers reversed every"
            " other round, so that the machine's drift falls on every peer alike; the"
            " median of the rounds is shown. The other cells and the idle connections ran"
            " once, one peer after another."
            if repeats > 1
            else "`--quick`: the key cells only, in one round, each peer started fresh for"
            " it: a single run, no median."
        )
        + " Compare ratios, not absolute numbers: these machines are noisy.",
        "",
        "## Peers",
        "",
    ]
    durable = report.get("durable", {})
    for name, description in report["descriptions"].items():
        kind = "durable" if durable.get(name) else "not durable"
        lines.append(f"- **{name}** ({kind}): {description}")
    for name, reason in report["skipped"].items():
        # A peer measured in some rounds and not in others has its results and this line.
        verdict = "not every start ran" if name in report["results"] else "skipped"
        lines.append(f"- **{name}**: {verdict}, {reason}")
    lines += [
        "",
        "*Durable*: the peer has the message on disk (fsynced) before it answers 250."
        " The others acknowledge from memory: they are ceilings, not competitors.",
    ]
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for name, value, ok in _targets(report):
        mark = "yes" if ok else ("n/a" if ok is None else "**no**")
        lines.append(f"| {name} | {value} | {mark} |")
    header = "| cell | " + " | ".join(f"{p} msgs/s" for p in peers)
    header += " | gsmtp ÷ postfix | gsmtp ÷ aiosmtpd+sqlite | gsmtp p99 ms | gsmtp CPU % |"
    lines += ["", "## Throughput (accepted messages per second)", "", header]
    lines.append("|" + "---|" * (header.count("|") - 1))
    for cell in cells:
        key = cell.key
        rates = [_rate(report, p, key) for p in peers]
        gsmtp_cell = report["results"].get("gsmtp", {}).get(key)
        row = f"| {cell.label()} | " + " | ".join(f"{r:,.0f}" if r else "–" for r in rates)
        row += f" | {_ratio(_rate(report, 'gsmtp', key), _rate(report, 'postfix', key))}"
        row += f" | {_ratio(_rate(report, 'gsmtp', key), _rate(report, 'aiosmtpd+sqlite', key))}"
        row += f" | {gsmtp_cell.p99_ms:.1f}" if gsmtp_cell else " | –"
        row += f" | {gsmtp_cell.cpu_percent:.0f} |" if gsmtp_cell else " | – |"
        lines.append(row)
    lines += _e2e_section(report)
    lines += ["", "## Latency, end of DATA to the reply (p50 / p99 ms)", ""]
    lines.append("| cell | " + " | ".join(peers) + " |")
    lines.append("|" + "---|" * (len(peers) + 1))
    for cell in cells:
        row = f"| {cell.label()} |"
        for peer in peers:
            m = report["results"][peer].get(cell.key)
            row += f" {m.p50_ms:.1f} / {m.p99_ms:.1f} |" if m else " – |"
        lines.append(row)
    if report["idle"]:
        lines += _idle_section(report["idle"])
    lines += ["", "## Stored versus accepted", ""]
    for name, results in report["results"].items():
        stored = results.get("stored")
        if stored is None:
            lines.append(f"- {name}: keeps nothing to count ({results['accepted']:,} accepted)")
        else:
            lines.append(
                f"- {name}: {results['accepted']:,} accepted, {stored:,} stored{_missing(results)}"
            )
    if cross:
        lines += [
            "",
            "## Cross-check with Postfix's smtp-source",
            "",
            "`smtp-source -s 100 -m 10000 -l 1024 -d` (100 sessions, 10,000 messages of"
            " 1 KiB), timed end to end:",
            "",
        ]
        for name, rate in cross.items():
            lines.append(f"- {name}: {rate:,.0f} msgs/s")
    notes = HERE / "notes.md"
    if notes.exists():
        lines += ["", notes.read_text().rstrip()]
    path.write_text("\n".join(lines) + "\n")


def idle_spread(result: dict[str, Any]) -> str:
    """How the held connections spread over the node's processes: "5,400 / 4,600"."""
    held = [p["connections"] for p in result.get("per_process", []) if p["connections"] > 0]
    return " / ".join(f"{count:,}" for count in held) or "none"


def _idle_section(idle: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Idle connections (greeted, then silent)",
        "",
        "Memory of the whole node: the PID the bench started and every process below it"
        " (gsmtp's supervisor and its workers). *Per connection* is the growth of their"
        " summed PSS (proportional set size, /proc/<pid>/smaps_rollup) while the"
        " connections are held, ÷ the connections: a worker forked from the supervisor"
        " shares pages with it copy-on-write, and summed RSS counts a shared page once per"
        " process (and misses a page copied on write, shared before and private after);"
        " summed PSS charges each page once, so its growth is the memory the connections"
        " took. Summed RSS growth beside it, for comparison. *Spread*: the connections each"
        " process held (growth of its open descriptors).",
        "",
        "| server | connections | processes | PSS growth | per connection | RSS growth"
        " | spread | dropped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, result in idle.items():
        if not result:
            continue
        memory = result.get("memory", "rss")
        grown = f"{result['growth_kib'] / 1024:.1f} MiB"
        if memory != "pss":
            grown = f"n/a (RSS: {grown})"
        lines.append(
            f"| {name} | {result['connections']:,} | {result['processes']} | {grown}"
            f" | {result['kib_per_connection']:.1f} KiB ({memory.upper()})"
            f" | {result['rss_growth_kib'] / 1024:.1f} MiB | {idle_spread(result)}"
            f" | {result['dropped']} |"
        )
    return lines


def _e2e_section(report: dict[str, Any]) -> list[str]:
    cells = report.get("e2e") or []
    if not cells and not report.get("e2e_skipped") and report.get("e2e_kill") is None:
        return []
    count = max((c.messages for c in cells), default=0)
    lines = [
        "",
        "## End to end: acknowledged and delivered",
        "",
        f"{count:,} messages of 1 KiB at C=100 M=100 (bench.load --total), spread over 100 "
        "mailboxes. A server cell run more than once (the peers taking turns, round by round, "
        "in reversed order every other round) shows the run with the median delivered rate, and"
        " every run's rate in the last column. *Acknowledged*: accepted messages ÷ the load's "
        "own time. *Delivered*: messages ÷ the time from the first connect to the last file "
        "linked into a new/ (local) or the last message the sink received (relay). The probe "
        "makes the same number of durable Maildir files with no server in the way, on the same "
        "file system: the physical ceiling of local delivery.",
        "",
        "| cell | peer | durable | accepted | delivered | acknowledged msgs/s"
        " | delivered msgs/s | delivered ÷ Postfix | note | delivered msgs/s, every run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        postfix = _e2e(report, cell.kind, f"postfix-{cell.kind}")
        ratio = "–"
        if cell.kind != "probe" and postfix is not None:
            ratio = _ratio(cell.delivered_per_s, postfix.delivered_per_s)
        acknowledged = "–" if cell.kind == "probe" else f"{cell.acknowledged_per_s:,.0f}"
        lines.append(
            f"| {cell.kind} | {cell.peer} | {'yes' if cell.durable else 'no'}"
            f" | {cell.accepted:,} | {cell.delivered:,} | {acknowledged}"
            f" | {cell.delivered_per_s:,.0f} | {ratio} | {_table_text(cell.note)}"
            f" | {_rates(cell.runs) or '–'} |"
        )
    descriptions = report.get("e2e_descriptions", {})
    if descriptions:
        lines.append("")
        for name, description in descriptions.items():
            lines.append(f"- {name}: {description}")
    for name, reason in report.get("e2e_skipped", {}).items():
        lines.append(f"- {name}: skipped, {reason}")
    kill = report.get("e2e_kill")
    if kill is not None:
        from bench.e2e import describe_kill

        lines += [
            "",
            "*No message lost* (gsmtp, its default workers): the local cell's load, each"
            " message numbered (bench.load --record keeps the number of every message"
            " answered 250); when half were acknowledged, `kill -9` of the busiest worker"
            " (the supervisor restarts it); then, once the spool is empty, every Maildir"
            " file's number is read. *Missing*: answered 250 and in no mailbox (must be"
            " 0). *Duplicates*: copies beyond the first (a batch in the Maildir whose result"
            " commit died with the worker is delivered again). *Delivered without a 250"
            " seen*: committed, but the reply died with the worker (allowed: the client"
            " would send it again).",
            "",
            f"- kill: {describe_kill(kill)}",
        ]
    return lines


def _table_text(text: str) -> str:
    """`text` as one table cell: on one line, no `|` (a failed run's reason in a note
    may be bench.load's stderr, a traceback)."""
    return " ".join(text.split()).replace("|", "/")


def _series(
    results: dict[Any, Any], messages: int, size: int
) -> tuple[list[int], list[float], list[list[float]]]:
    """x, y and asymmetric error bars (the spread of repeated runs) of one peer's line."""
    xs: list[int] = []
    ys: list[float] = []
    low: list[float] = []
    high: list[float] = []
    for connections in (1, 10, 100):
        cell = results.get((connections, messages, size))
        if cell is not None:
            runs = cell.runs or [cell.msgs_per_s]
            xs.append(connections)
            ys.append(cell.msgs_per_s)
            low.append(cell.msgs_per_s - min(runs))
            high.append(max(runs) - cell.msgs_per_s)
    return xs, ys, [low, high]


def write_plot(path: Path, report: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    durable = report.get("durable", {})
    figure, axes = plt.subplots(2, 3, figsize=(16, 9))
    panels = [
        (axes[0][0], True, 100, KiB, "durable peers: 1 KiB, 100 per session"),
        (axes[0][1], True, 1, KiB, "durable peers: 1 KiB, 1 per session"),
        (axes[0][2], True, 100, 100 * KiB, "durable peers: 100 KiB, 100 per session"),
        (axes[1][0], False, 100, KiB, "not durable (ceilings): 1 KiB, 100 per session"),
        (axes[1][1], False, 100, 100 * KiB, "not durable (ceilings): 100 KiB, 100 per session"),
    ]
    for axis, want_durable, messages, size, title in panels:
        for peer, results in report["results"].items():
            if bool(durable.get(peer)) != want_durable:
                continue
            xs, ys, errors = _series(results, messages, size)
            if len(xs) > 1:
                axis.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=peer)
            elif xs:  # the workers cells: one point
                axis.errorbar(xs, ys, yerr=errors, marker="s", capsize=3, ls="", label=peer)
        axis.set_xscale("log")
        axis.set_xticks([1, 10, 100], ["1", "10", "100"])
        axis.set_xlabel("concurrent connections")
        axis.set_ylabel("acknowledged messages / s")
        axis.set_title(title, fontsize=10)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    _plot_e2e(axes[1][2], report)
    machine = report.get("machine")
    if machine:
        figure.text(
            0.5,
            0.005,
            f"bench.compare, {machine['date']}: {machine['cores']} cores"
            f" ({machine.get('cpu', '')}), Linux {machine['kernel']},"
            f" Python {machine['python']}. Error bars: spread of the repeated key cells.",
            ha="center",
            fontsize=8,
        )
    figure.tight_layout(rect=(0, 0.02, 1, 1))
    figure.savefig(path, dpi=110)


def _plot_e2e(axis: Any, report: dict[str, Any]) -> None:
    """Acknowledged and delivered rates side by side; the probe as the ceiling."""
    cells = [c for c in report.get("e2e", []) if c.kind != "probe"]
    probes = [c for c in report.get("e2e", []) if c.kind == "probe"]
    labels = [f"{c.kind}\n{c.peer}" for c in cells]
    positions = list(range(len(cells)))
    axis.bar(
        [x - 0.2 for x in positions],
        [c.acknowledged_per_s for c in cells],
        width=0.4,
        label="acknowledged",
    )
    axis.bar(
        [x + 0.2 for x in positions],
        [c.delivered_per_s for c in cells],
        width=0.4,
        label="delivered (end to end; bars: lowest and highest run)",
        yerr=[
            [c.delivered_per_s - min(c.runs or [c.delivered_per_s]) for c in cells],
            [max(c.runs or [c.delivered_per_s]) - c.delivered_per_s for c in cells],
        ],
        capsize=3,
    )
    for probe, style in zip(probes, ("--", ":"), strict=False):
        axis.axhline(probe.delivered_per_s, ls=style, color="grey", label=probe.peer)
    axis.set_xticks(positions, labels, fontsize=7)
    axis.set_ylabel("messages / s")
    axis.set_title("end to end, 1 KiB, C=100 M=100", fontsize=10)
    axis.grid(alpha=0.3, axis="y")
    if cells or probes:
        axis.legend(fontsize=7)
