"""Packaging and first contact (issue 11 item 7): `python -m gsmtp`, `--version`, where
the configuration is looked for, `make run` without the development tools, a wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import gsmtp
from gsmtp.config import DEFAULT_CONFIG_NAME, resolve_path
from tests.integration.harness import environment

ROOT = Path(__file__).parents[2]


def gsmtp_command(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = environment()
    env.pop("GSMTP_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "gsmtp", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
    )


def test_python_m_gsmtp_and_version() -> None:
    version = gsmtp_command("--version")
    assert version.returncode == 0 and version.stdout == f"gsmtp {gsmtp.__version__}\n"
    checked = gsmtp_command("check-config", "-c", str(ROOT / "configuration.toml"))
    assert checked.returncode == 0, checked.stderr
    assert 'hostname = "mail.example.test"' in checked.stdout


def test_the_configuration_is_found_in_etc_after_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = tmp_path / "etc" / "configuration.toml"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert resolve_path(None, environ={}, system=system) == Path(DEFAULT_CONFIG_NAME)
    system.parent.mkdir()
    system.write_text("")
    assert resolve_path(None, environ={}, system=system) == system
    (work / DEFAULT_CONFIG_NAME).write_text("")
    assert resolve_path(None, environ={}, system=system) == Path(DEFAULT_CONFIG_NAME)
    assert resolve_path(None, environ={"GSMTP_CONFIG": "x.toml"}, system=system) == Path("x.toml")
    assert resolve_path("y.toml", environ={"GSMTP_CONFIG": "x.toml"}, system=system) == Path(
        "y.toml"
    )


def test_without_any_configuration_the_error_says_where_it_looked(tmp_path: Path) -> None:
    if Path("/etc/gsmtp/configuration.toml").exists():
        pytest.skip("this machine has an /etc/gsmtp/configuration.toml")
    result = gsmtp_command("domain", "list", cwd=tmp_path)
    assert result.returncode == 2
    assert "/etc/gsmtp/configuration.toml" in result.stderr and "-c FILE" in result.stderr
    assert "Traceback" not in result.stderr


def test_make_run_installs_only_what_the_server_needs(tmp_path: Path) -> None:
    """The development tools come with `make test`/`lint`, never with `make run`."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")

    def planned(target: str) -> str:
        result = subprocess.run(
            ["make", "-n", target, f"VENV={tmp_path / 'venv'}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    run = planned("run")
    assert "pip install --quiet -e .\n" in run and "[dev]" not in run
    for target in ("test", "lint"):
        assert "pip install --quiet -e '.[dev]'" in planned(target)


def test_a_wheel_holds_the_package_and_its_command(tmp_path: Path) -> None:
    """`pip wheel` of a copy of the sources (nothing written into the checkout): the
    wheel holds gsmtp with `__main__`, the `gsmtp` command, the runtime dependencies,
    and the development tools only as the `dev` extra."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "gsmtp", source / "gsmtp", ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if built.returncode != 0 and "No matching distribution" in built.stderr:
        pytest.skip("no package index reachable for the build backend (setuptools)")
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("gsmtp-*.whl")
    assert wheel.name.startswith(f"gsmtp-{gsmtp.__version__}-")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = f"gsmtp-{gsmtp.__version__}.dist-info"
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        metadata = archive.read(f"{info}/METADATA").decode()
    assert {"gsmtp/__main__.py", "gsmtp/cli.py", "gsmtp/queue/manager.py"} <= names
    assert not any(name.startswith("tests/") for name in names)
    assert "gsmtp = gsmtp.cli:main" in entry_points
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert any(line.startswith("Requires-Dist: gevent") for line in requires)
    assert all('extra == "dev"' in line for line in requires if "pytest" in line)
