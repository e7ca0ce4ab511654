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
            f"{idle['connections']:,} idle connections ≤ 12 KiB each, none dropped",
            f"{idle['kib_per_connection']:.1f} KiB, {idle['dropped']} dropped",
            idle["kib_per_connection"] <= 12 and idle["dropped"] == 0,
        )
    else:
        check("10,000 idle connections ≤ 12 KiB each", "not measured", None)
    results = report["results"].get(g, {})
    if "stored" in results:
        check(
            "every accepted message stored",
            f"{results['accepted']:,} accepted, {results['stored']:,} stored",
            results["stored"] >= results["accepted"],
        )
    return rows


def write_results(
    path: Path,
    report: dict[str, Any],
    cells: list[Any],
    cross: dict[str, float],
    machine: dict[str, str],
) -> None:
    peers = list(report["results"])
    lines = [
        "# Benchmark results",
        "",
        f"Written by `make bench` (`python -m bench.compare`) on {machine['date']}:"
        f" {machine['cores']} cores, Python {machine['python']}, Linux {machine['kernel']}."
        " Every peer ran on this machine in the same run, one after another, loaded by"
        " `bench.load` (gevent, PIPELINING where offered) over loopback. Each cell lasts a"
        " few seconds with sessions repeated; the key cells ran three times and the median"
        " is shown. Compare ratios, not absolute numbers: these machines are noisy.",
        "",
        "## Peers",
        "",
    ]
    for name, description in report["descriptions"].items():
        lines.append(f"- **{name}**: {description}")
    for name, reason in report["skipped"].items():
        lines.append(f"- **{name}**: skipped, {reason}")
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
        lines += ["", "## Idle connections (greeted, then silent)", ""]
        lines.append("| server | connections | RSS growth | per connection | dropped |")
        lines.append("|---|---|---|---|---|")
        for name, idle in report["idle"].items():
            if idle:
                lines.append(
                    f"| {name} | {idle['connections']:,} | {idle['rss_growth_kib'] / 1024:.1f} MiB"
                    f" | {idle['kib_per_connection']:.1f} KiB | {idle['dropped']} |"
                )
    lines += ["", "## Stored versus accepted", ""]
    for name, results in report["results"].items():
        stored = results.get("stored")
        if stored is None:
            lines.append(f"- {name}: keeps nothing to count ({results['accepted']:,} accepted)")
        else:
            lines.append(f"- {name}: {results['accepted']:,} accepted, {stored:,} stored")
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


def write_plot(path: Path, report: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, messages in zip(axes, (100, 1), strict=True):
        for peer, results in report["results"].items():
            xs, ys = [], []
            for connections in (1, 10, 100):
                cell = results.get((connections, messages, KiB))
                if cell is not None:
                    xs.append(connections)
                    ys.append(cell.msgs_per_s)
            if xs:
                axis.plot(xs, ys, marker="o", label=peer)
        axis.set_xscale("log")
        axis.set_xticks([1, 10, 100], ["1", "10", "100"])
        axis.set_xlabel("concurrent connections")
        axis.set_ylabel("accepted messages / s")
        axis.set_title(f"1 KiB messages, {messages} per session")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
