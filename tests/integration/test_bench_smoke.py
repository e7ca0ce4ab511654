"""The benchmark harness runs and counts correctly (never its speed: machines are noisy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.harness import GsmtpProcess, wait_for

ROOT = Path(__file__).parents[2]


def bench(*args: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-m", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_load_generator_counts_what_the_server_stored(gsmtp: GsmtpProcess) -> None:
    assert gsmtp.process is not None
    result = bench(
        "bench.load",
        "--target",
        f"127.0.0.1:{gsmtp.port}",
        "-c",
        "5",
        "-m",
        "7",
        "-s",
        "2KiB",
        "--to",
        "jones@foo.com",
        "--quiet",
        "--pid",
        str(gsmtp.process.pid),
    )
    assert result["accepted"] == 35 and result["errors"] == 0 and result["sessions"] == 5
    assert float(result["p99_ms"]) >= float(result["p50_ms"]) > 0  # type: ignore[arg-type]
    files = wait_for(lambda: len(f := gsmtp.maildir_files("jones@foo.com")) >= 35 and f, what="35")
    assert len(files) == 35
    assert all(2048 <= f.stat().st_size < 2048 + 400 for f in files)  # body + trace headers


def test_load_generator_refuses_non_loopback_targets() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.load", "--target", "192.0.2.1:25"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 2 and "non-loopback" in result.stderr


def test_idle_harness_holds_and_checks_connections(gsmtp: GsmtpProcess) -> None:
    assert gsmtp.process is not None
    result = bench(
        "bench.idle",
        "--target",
        f"127.0.0.1:{gsmtp.port}",
        "-n",
        "40",
        "--pid",
        str(gsmtp.process.pid),
        "--hold",
        "0.2",
    )
    assert result["opened"] == 40 and result["dropped"] == 0


@pytest.mark.timeout(300)
def test_compare_writes_results_for_the_peers_it_ran(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.compare",
            "--quick",
            "--no-idle",
            "--seconds",
            "0.5",
            "--peers",
            "gsmtp,gevent-sink",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = (tmp_path / "RESULTS.md").read_text()
    assert "| C=100 M=100 1 KiB |" in report and "gevent-sink" in report
    assert "every accepted message stored" in report
    stored_line = next(line for line in report.splitlines() if line.startswith("- gsmtp:"))
    accepted, stored = [
        int(part.split()[0].replace(",", "")) for part in stored_line[8:].split(", ")
    ]
    assert stored >= accepted > 0
