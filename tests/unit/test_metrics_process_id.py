"""prometheus_client's multiprocess values, as a worker uses them: an update makes no
system call for the PID, and a forked child still writes files of its own."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UPDATES = 2000
CHILD = f"""
import os
import gsmtp.metrics as metrics

for _ in range({UPDATES}):
    metrics.MESSAGES_RECEIVED.labels("accepted").inc()
    metrics.DELIVERIES_IN_FLIGHT.set(3)
parent = os.getpid()
child = os.fork()
if child == 0:
    metrics.MESSAGES_RECEIVED.labels("accepted").inc()
    os._exit(0)
os.waitpid(child, 0)
print(parent, child)
"""
REPOSITORY = Path(__file__).resolve().parents[2]


def run_child(directory: Path, *prefix: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-c", CHILD],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PROMETHEUS_MULTIPROC_DIR": str(directory), "PATH": "/usr/bin:/bin"},
        cwd=str(REPOSITORY),
    )


def test_a_forked_child_still_writes_files_of_its_own(tmp_path: Path) -> None:
    output = run_child(tmp_path)
    assert output.returncode == 0, output.stderr
    parent, child = output.stdout.split()
    files = {path.name for path in tmp_path.iterdir()}
    assert f"counter_{parent}.db" in files
    assert f"counter_{child}.db" in files  # the child's update went to its own file
    assert f"gauge_livesum_{parent}.db" in files


def strace_refused() -> str | None:
    """Why strace cannot trace here (not installed, or ptrace not allowed), or None."""
    if shutil.which("strace") is None:
        return "strace is not installed"
    trial = subprocess.run(["strace", "-c", "true"], capture_output=True, text=True, timeout=60)
    return None if trial.returncode == 0 else f"strace cannot trace here: {trial.stderr[:200]}"


def test_updates_make_no_getpid_system_call(tmp_path: Path) -> None:
    refused = strace_refused()
    if refused:
        pytest.skip(refused)
    output = run_child(tmp_path, "strace", "-f", "-c", "-e", "trace=getpid")
    assert output.returncode == 0, output.stderr
    counted = re.search(
        r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?getpid$", output.stderr, re.M
    )
    calls = int(counted.group(1)) if counted else 0
    assert calls < UPDATES // 10, output.stderr  # 2 per update without the remembered PID
