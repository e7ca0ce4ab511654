"""The import arrows of STYLE.md, checked by walking every module's imports with ast."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[2] / "gsmtp"
FORBIDDEN_IN_PROTOCOL = {
    "gevent",
    "socket",
    "ssl",
    "apsw",
    "dns",
    "time",
    "random",
    "logging",
    "structlog",
    "os",
    "select",
    "threading",
    "secrets",
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def modules(sub: str) -> list[Path]:
    return sorted((PACKAGE / sub).glob("*.py")) if sub else sorted(PACKAGE.glob("*.py"))


@pytest.mark.parametrize("path", modules("protocol"), ids=lambda p: p.name)
def test_protocol_uses_the_standard_library_only(path: Path) -> None:
    for name in imports_of(path):
        top = name.split(".")[0]
        assert top not in FORBIDDEN_IN_PROTOCOL, f"{path.name} imports {name}"
        if top == "gsmtp":
            assert name.startswith("gsmtp.protocol"), f"{path.name} imports {name}"


@pytest.mark.parametrize("path", modules("queue"), ids=lambda p: p.name)
def test_the_queue_manager_never_imports_a_concrete_deliverer(path: Path) -> None:
    names = imports_of(path)
    forbidden = {"gsmtp.delivery.maildir", "gsmtp.delivery.smtp", "gsmtp.server", "gsmtp.app"}
    assert not forbidden & names, f"{path.name} imports {forbidden & names}"
    assert "gsmtp.config" not in names


@pytest.mark.parametrize("name", ["spool.py", "spool_admin.py", "db.py", "writer.py"])
def test_storage_never_imports_the_queue_manager(name: str) -> None:
    assert not [n for n in imports_of(PACKAGE / name) if n.startswith("gsmtp.queue")]


@pytest.mark.parametrize("name", ["server.py", "policy.py", "spool.py", "accounts.py", "db.py"])
def test_only_the_composition_root_reads_config(name: str) -> None:
    assert "gsmtp.config" not in imports_of(PACKAGE / name)


@pytest.mark.parametrize("path", modules("delivery"), ids=lambda p: p.name)
def test_delivery_depends_on_base_and_protocol_values(path: Path) -> None:
    for name in imports_of(path):
        if name.startswith("gsmtp."):
            assert name.startswith(
                ("gsmtp.delivery", "gsmtp.message", "gsmtp.protocol", "gsmtp.log", "gsmtp.metrics")
            ), f"{path.name} imports {name}"
