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


def module_name(path: Path) -> str:
    """`gsmtp/delivery/smtp.py` → `gsmtp.delivery.smtp` (a package's __init__ → the package)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, source: str | None = None) -> set[str]:
    """Every module a file imports, and every name it imports from one as `module.name`,
    relative imports resolved: `from gsmtp import config` and, in gsmtp/, `from . import
    config` both give `gsmtp.config`. Imports inside functions count."""
    tree = ast.parse(path.read_text() if source is None else source)
    package = module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(filter(None, [*anchor, base]))
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def imports_module(names: set[str], module: str) -> bool:
    """True if `module` itself, or anything in it, is imported."""
    return any(name == module or name.startswith(module + ".") for name in names)


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
    concrete = ("gsmtp.delivery.maildir", "gsmtp.delivery.smtp", "gsmtp.server", "gsmtp.connection")
    for module in (*concrete, "gsmtp.app"):
        assert not imports_module(names, module), f"{path.name} imports {module}"
    assert not imports_module(names, "gsmtp.config")


@pytest.mark.parametrize("name", ["spool.py", "spool_admin.py", "db.py", "writer.py"])
def test_storage_never_imports_the_queue_manager(name: str) -> None:
    assert not imports_module(imports_of(PACKAGE / name), "gsmtp.queue")


@pytest.mark.parametrize(
    "name", ["server.py", "connection.py", "policy.py", "spool.py", "accounts.py", "db.py"]
)
def test_only_the_composition_root_reads_config(name: str) -> None:
    assert not imports_module(imports_of(PACKAGE / name), "gsmtp.config")


@pytest.mark.parametrize("path", modules("delivery"), ids=lambda p: p.name)
def test_delivery_depends_on_base_and_protocol_values(path: Path) -> None:
    for name in imports_of(path):
        if name.startswith("gsmtp."):
            assert name.startswith(
                (
                    "gsmtp.delivery",
                    "gsmtp.message",
                    "gsmtp.protocol",
                    "gsmtp.log",
                    "gsmtp.metrics",
                    "gsmtp.sockets",  # standard-library socket helpers, shared with the server
                )
            ), f"{path.name} imports {name}"


# The supervisor owns components without knowing them (they are registered by name);
# the spool's safety modules take their values as arguments, never from Config.
_SUPERVISION_DEPENDS_ON = {"gsmtp.metrics", "gsmtp.log"}
_NO_CONFIG = ["supervision.py", "housekeeping.py", "diskspace.py", "lockfile.py", "backup.py"]


def test_supervision_knows_no_component() -> None:
    ours = {n for n in imports_of(PACKAGE / "supervision.py") if n.startswith("gsmtp")}
    assert all(any(imports_module({n}, m) for m in _SUPERVISION_DEPENDS_ON) for n in ours), ours


@pytest.mark.parametrize("name", _NO_CONFIG)
def test_spool_safety_modules_read_no_config(name: str) -> None:
    assert "gsmtp.config" not in imports_of(PACKAGE / name)


def test_imports_are_recorded_by_name_and_relative_imports_resolved() -> None:
    """The checks above see the forms the code uses."""
    source = (
        "from gsmtp import config\n"
        "from gsmtp.delivery import smtp\n"
        "from . import maildir\n"
        "from ..protocol import session\n"
        "import gsmtp.server as srv\n"
        "def later():\n"
        "    from gsmtp.spool import Spool\n"
    )
    names = imports_of(PACKAGE / "delivery" / "probe.py", source)
    for module in (
        "gsmtp.config",
        "gsmtp.delivery.smtp",
        "gsmtp.delivery.maildir",
        "gsmtp.protocol.session",
        "gsmtp.server",
        "gsmtp.spool.Spool",
    ):
        assert imports_module(names, module), module


# -- the arrows of issue 7's restructuring ---------------------------------------------

_IO_MODULES = ("gevent", "socket", "ssl", "apsw", "dns", "time", "os", "threading", "select")


def test_the_shared_vocabulary_depends_on_protocol_values_only() -> None:
    """message.py is what storage, delivery and the accept step share: it may use
    protocol values (DSN parameters), nothing that does I/O or holds state."""
    for name in imports_of(PACKAGE / "message.py"):
        assert name.split(".")[0] not in _IO_MODULES, name
        if name.startswith("gsmtp."):
            assert imports_module({name}, "gsmtp.protocol.dsnparams"), name


@pytest.mark.parametrize("name", ["spool.py", "spool_admin.py", "db.py", "writer.py"])
def test_storage_never_imports_its_consumers(name: str) -> None:
    """The spool's vocabulary comes from message.py, not from delivery or the server."""
    names = imports_of(PACKAGE / name)
    consumers = ("gsmtp.delivery", "gsmtp.server", "gsmtp.connection", "gsmtp.app")
    for consumer in (*consumers, "gsmtp.acceptance"):
        assert not imports_module(names, consumer), f"{name} imports {consumer}"


def test_threads_live_in_writer_not_in_db() -> None:
    """db.py is apsw and SQL only; the writer thread and its gevent plumbing are in
    writer.py, imported at the top of the file so the arrow shows."""
    assert not imports_module(imports_of(PACKAGE / "db.py"), "gevent")
    tree = ast.parse((PACKAGE / "writer.py").read_text())
    top_level = {
        alias.name.split(".")[0] if isinstance(node, ast.Import) else (node.module or "")
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert any(name.startswith("gevent") for name in top_level)
    nested = [
        node
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef)
        for node in ast.walk(function)
        if isinstance(node, ast.Import | ast.ImportFrom)
    ]
    assert nested == [], "imports hidden inside functions"


@pytest.mark.parametrize("name", ["acceptance.py", "routing.py"])
def test_the_accept_step_and_routing_do_no_io(name: str) -> None:
    for imported in imports_of(PACKAGE / name):
        assert imported.split(".")[0] not in _IO_MODULES, f"{name} imports {imported}"


def test_the_server_leaves_the_accept_step_to_acceptance() -> None:
    """Message ids and the Received: header are made in acceptance.py (which bounces
    use too), routing in routing.py: not in the listener or the composition root."""
    for listener in ("server.py", "connection.py"):
        names = imports_of(PACKAGE / listener)
        assert not imports_module(names, "gsmtp.protocol.trace")
        assert not imports_module(names, "gsmtp.message.new_message_id")
        assert imports_module(names, "gsmtp.acceptance")
    app = (PACKAGE / "app.py").read_text()
    assert "def _route(" not in app and "def _resolve_mailbox(" not in app
