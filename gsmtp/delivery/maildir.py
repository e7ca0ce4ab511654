"""Local delivery into Maildirs (the qmail spec), `<root>/<domain>/<local-part>/`.

Each copy is written to `tmp/` under a unique name (O_EXCL, O_NOFOLLOW, mode 0600),
fsynced, linked into `new/`, and `new/` itself is fsynced before the recipient counts as
delivered: a file in `new/` is always complete, and survives power loss. Mail is stored
with LF line endings, as qmail, Postfix and Dovecot write it, beginning with
`Return-Path:` and `Delivered-To:`. A crash after the link and before the spool update
delivers again after restart: at least once, never lost (a duplicate is possible).

Blocking file work runs through `run_blocking` (a thread pool in the server) so the
event loop never waits on the disk.
"""

from __future__ import annotations

import errno
import itertools
import os
import secrets
import socket
import stat
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from gsmtp.delivery.base import Outcome, QueuedMessage, RecipientResult

T = TypeVar("T")
_counter = itertools.count(1)


def _run_inline(work: Callable[[], T]) -> T:
    return work()


class MailboxPathError(Exception):
    """An address that would name a path outside the Maildir root."""


def mailbox_path(root: str, address: str) -> str:
    """`<root>/<domain>/<local-part>`, refusing any name that could leave the root: each
    part must be one plain path component (no separator, not "." or "..", no leading
    dot). Symlinks inside are refused when the directories are opened."""
    local, _, domain = address.rpartition("@")
    for part in (local, domain):
        if not part or part.startswith(".") or "/" in part or "\x00" in part:
            raise MailboxPathError(f"unsafe mailbox name: {address!r}")
    path = os.path.join(root, domain, local)
    if os.path.commonpath([root, path]) != root:
        raise MailboxPathError(f"mailbox path escapes the root: {address!r}")
    return path


def unique_name(now: float) -> str:
    """`<sec>.M<usec>P<pid>Q<n>R<random>.<host>`; the host with '/' and ':' escaped."""
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    seconds = int(now)
    micros = int((now - seconds) * 1_000_000)
    return f"{seconds}.M{micros}P{os.getpid()}Q{next(_counter)}R{secrets.token_hex(4)}.{host}"


def to_lf(body: bytes) -> bytes:
    return body.replace(b"\r\n", b"\n")


class MaildirDeliverer:
    """The `local` transport. `resolve_mailbox` maps a recipient to its canonical
    mailbox name (`jones@foo.com` for `Jones@FOO.com`), or None if there is none."""

    def __init__(
        self,
        root: str,
        *,
        resolve_mailbox: Callable[[str], str | None],
        run_blocking: Callable[[Callable[[], RecipientResult]], RecipientResult] = _run_inline,
    ) -> None:
        self._root = os.path.abspath(root)
        self._resolve_mailbox = resolve_mailbox
        self._run_blocking = run_blocking

    def deliver(self, message: QueuedMessage, recipients: Sequence[str]) -> list[RecipientResult]:
        return [self._deliver_one(message, recipient) for recipient in recipients]

    def _deliver_one(self, message: QueuedMessage, recipient: str) -> RecipientResult:
        mailbox = self._resolve_mailbox(recipient)
        if mailbox is None:
            return RecipientResult(
                recipient, Outcome.FAILED, "5.1.1", "550 5.1.1 No such user here"
            )
        try:
            path = mailbox_path(self._root, mailbox)
        except MailboxPathError as error:
            return RecipientResult(recipient, Outcome.FAILED, "5.1.3", f"550 5.1.3 {error}")
        return self._run_blocking(lambda: _write(path, message, recipient, mailbox))


def _ensure_maildir(path: str) -> None:
    """Create `path/{tmp,new,cur}` (and the domain directory) 0700 whatever the umask;
    refuse a symlink planted in their place (S-05)."""
    domain_dir = os.path.dirname(path)
    os.makedirs(os.path.dirname(domain_dir), mode=0o700, exist_ok=True)
    directories = (domain_dir, path, *(os.path.join(path, sub) for sub in ("tmp", "new", "cur")))
    for directory in directories:
        try:
            os.mkdir(directory, 0o700)
            os.chmod(directory, 0o700)
        except FileExistsError:
            pass
        if not stat.S_ISDIR(os.lstat(directory).st_mode):
            raise OSError(errno.ELOOP, "not a real directory", directory)


def _write(path: str, message: QueuedMessage, recipient: str, mailbox: str) -> RecipientResult:
    """In a worker thread: tmp → fsync → link into new → fsync new/."""
    header = f"Return-Path: <{message.sender}>\nDelivered-To: {mailbox}\n".encode()
    try:
        _ensure_maildir(path)
        name = unique_name(time.time())
        tmp_path = os.path.join(path, "tmp", name)
        new_path = os.path.join(path, "new", name)
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb", closefd=False) as handle:
                handle.write(header)
                handle.write(to_lf(message.body))
                handle.flush()
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp_path, new_path)
        finally:
            os.unlink(tmp_path)
        dir_fd = os.open(os.path.join(path, "new"), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as error:
        # Disk full, permissions, a symlink planted in the way: try again later, never
        # bounce for a local fault (RFC 5321 §6.1: no loss "for frivolous reasons").
        code = errno.errorcode.get(error.errno or 0, "EIO")
        return RecipientResult(
            recipient, Outcome.DEFERRED, "4.3.0", f"451 4.3.0 Maildir write failed: {code}"
        )
    return RecipientResult(recipient, Outcome.DELIVERED, "2.0.0", "250 2.0.0 Delivered to Maildir")
