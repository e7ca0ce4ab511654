"""`gsmtp check-config`: what the parser cannot see, and the settings that differ from the
defaults (`postconf -n`).

The parser (gsmtp.config) already reports every malformed or unknown key at once; this
looks at the machine: TLS certificate and key files that cannot be read, a spool or
Maildir directory that neither exists nor can be created. Each problem is one line
naming the section and key. Reads files' metadata and opens the TLS files to read a
byte; creates nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gsmtp.config import Config


def environment_problems(config: Config) -> list[str]:
    """Every problem with the files and directories the configuration names."""
    problems = []
    for key in ("cert", "key"):
        path = getattr(config.tls, key)
        if path:
            problem = _unreadable(Path(path))
            if problem:
                problems.append(f"[tls] {key}: {problem}")
    if config.tls.enabled and not problems:
        problems += _tls_pair_problems(config)
    spool = Path(config.spool.path)
    problem = _not_creatable(spool.parent) or _not_writable_file(spool)
    if problem:
        problems.append(f"[spool] path: {problem}")
    problem = _not_creatable(Path(config.maildir.root))
    if problem:
        problems.append(f"[maildir] root: {problem}")
    if config.maildir.group and _group_id(config.maildir.group) is None:
        problems.append(f"[maildir] group: group {config.maildir.group!r} does not exist")
    problems += _delivery_file_problems(config)
    problems += _dkim_key_problems(config)
    return [f"{config.path}: {problem}" for problem in problems]


def _delivery_file_problems(config: Config) -> list[str]:
    """The files `serve` would refuse to start with: the smarthost credentials (mode
    0600, "user:password") and the CA file."""
    from gsmtp.delivery.smarthost import AuthFileError, read_auth_file
    from gsmtp.delivery.tls_client import TlsClientError, verified_context

    delivery, problems = config.delivery, []
    if delivery.smarthost_auth_file:
        try:
            read_auth_file(delivery.smarthost_auth_file)
        except AuthFileError as error:
            problems.append(f"[delivery] smarthost_auth_file: {error}")
    if delivery.ca_file:
        try:
            verified_context(delivery.ca_file)
        except TlsClientError as error:
            problems.append(f"[delivery] ca_file: {error}")
    return problems


def _tls_pair_problems(config: Config) -> list[str]:
    """The certificate and key loaded as a pair, as `serve` (and a reload) loads them:
    readable files are not enough (garbage, or a key of another certificate)."""
    from gsmtp.tls import TlsError, server_context

    try:
        server_context(config.tls.cert, config.tls.key, config.tls.min_version)
    except TlsError as error:
        return [f"[tls] {error}"]
    return []


def _group_id(name: str) -> int | None:
    """The id of the group `name` (maildir.group), None if there is no such group."""
    import grp

    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def _dkim_key_problems(config: Config) -> list[str]:
    """The [dkim] keys `serve` would refuse to start with (each read and parsed)."""
    from gsmtp.dkim import DkimKeyError, load_key

    problems = []
    for entry in config.dkim.keys:
        try:
            load_key(entry.domain, entry.selector, entry.key)
        except DkimKeyError as error:
            problems.append(f"[dkim] keys: {error}")
    return problems


def non_default(
    effective: Mapping[str, Mapping[str, Any]], defaults: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The settings (as printed) that differ from the defaults (as printed), by section."""
    changed: dict[str, dict[str, Any]] = {}
    for section, values in effective.items():
        for key, value in values.items():
            if defaults.get(section, {}).get(key) != value:
                changed.setdefault(section, {})[key] = value
    return changed


def _unreadable(path: Path) -> str | None:
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as error:
        return f"cannot read {path}: {error.strerror}"
    return None


def _not_creatable(directory: Path) -> str | None:
    """None if `directory` exists and can be written, or could be created."""
    probe = directory
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        if probe == directory:
            return f"directory {directory} is not writable"
        return (
            f"directory {directory} does not exist and cannot be created ({probe} is not writable)"
        )
    return None


def _not_writable_file(path: Path) -> str | None:
    if path.is_dir():
        return f"{path} is a directory (spool.path names the database file)"
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return f"{path} cannot be read and written"
    return None
