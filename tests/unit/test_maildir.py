"""Maildir writer: qmail layout, LF endings, permissions, no escape from the root."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from gsmtp.delivery.base import MessageId, Outcome, QueuedMessage
from gsmtp.delivery.maildir import MailboxPathError, MaildirDeliverer, mailbox_path

MESSAGE = QueuedMessage(
    MessageId("M1"), "bob@remote.example", b"Subject: hi\r\n\r\nbody\r\n", 0.0, False
)


def deliverer(root: Path, exists: bool = True) -> MaildirDeliverer:
    return MaildirDeliverer(str(root), resolve_mailbox=lambda a: a.lower() if exists else None)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """umask 0, the most permissive: the writer must set its modes itself."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def test_delivers_into_new_with_trace_headers_and_lf(
    tmp_path: Path, permissive_umask: None
) -> None:
    (result,) = deliverer(tmp_path).deliver(MESSAGE, ["Alice@local.example"])
    assert result.outcome is Outcome.DELIVERED
    box = tmp_path / "local.example" / "alice"
    (file,) = list((box / "new").iterdir())
    assert file.read_bytes() == (
        b"Return-Path: <bob@remote.example>\nDelivered-To: alice@local.example\n"
        b"Subject: hi\n\nbody\n"
    )
    assert list((box / "tmp").iterdir()) == []
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    for directory in (box, box / "new", box / "tmp", box / "cur"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_unique_names_for_many_copies(tmp_path: Path) -> None:
    d = deliverer(tmp_path)
    for _ in range(50):
        d.deliver(MESSAGE, ["alice@local.example"])
    assert len(list((tmp_path / "local.example" / "alice" / "new").iterdir())) == 50


def test_unknown_mailbox_fails_permanently(tmp_path: Path) -> None:
    (result,) = deliverer(tmp_path, exists=False).deliver(MESSAGE, ["gone@local.example"])
    assert (result.outcome, result.status) == (Outcome.FAILED, "5.1.1")


@pytest.mark.parametrize(
    "address", ["../x@local.example", "a/b@local.example", "a@..", ".x@local.example"]
)
def test_paths_outside_the_root_are_refused(tmp_path: Path, address: str) -> None:
    with pytest.raises(MailboxPathError):
        mailbox_path(str(tmp_path), address)


def test_a_planted_symlink_defers_instead_of_writing_elsewhere(tmp_path: Path) -> None:
    """S-05."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    box = tmp_path / "root" / "local.example" / "alice"
    box.mkdir(parents=True)
    (box / "new").symlink_to(elsewhere)
    (result,) = deliverer(tmp_path / "root").deliver(MESSAGE, ["alice@local.example"])
    assert result.outcome is Outcome.DEFERRED
    assert list(elsewhere.iterdir()) == []


def test_write_failure_is_temporary(tmp_path: Path) -> None:
    """D-18: a local fault defers, never bounces."""
    (tmp_path / "local.example").write_text("a file where a directory should be")
    (result,) = deliverer(tmp_path).deliver(MESSAGE, ["alice@local.example"])
    assert result.outcome is Outcome.DEFERRED
