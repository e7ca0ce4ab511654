"""Local delivery into Maildirs (the qmail spec), `<root>/<domain>/<local-part>/`.

Each copy is written to `tmp/` under a unique name (O_EXCL, O_NOFOLLOW, mode 0600),
fsynced, linked into `new/`, and `new/` itself is fsynced before the recipient counts as
delivered: a file in `new/` is always complete, and survives power loss. Mail is stored
with LF line endings, as qmail, Postfix and Dovecot write it, beginning with
`Return-Path:` and `Delivered-To:`. A crash after the link and before the spool update
delivers again after restart: at least once, never lost (a duplicate is possible).

Every file operation is relative to directory descriptors opened with O_NOFOLLOW, so a
symlink planted in a mailbox fails the delivery (deferred) instead of redirecting it.
Blocking file work runs through `run_blocking` (one thread in the server) so the event
loop never waits on the disk.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from gsmtp.message import Outcome, QueuedMessage, RecipientResult

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
        self._writer = MaildirWriter(self._root)
        self._resolve_mailbox = resolve_mailbox
        self._run_blocking = run_blocking

    def deliver(self, message: QueuedMessage, recipients: Sequence[str]) -> list[RecipientResult]:
        return [self._deliver_one(message, recipient) for recipient in recipients]

    def close(self) -> None:
        self._writer.close()

    def _deliver_one(self, message: QueuedMessage, recipient: str) -> RecipientResult:
        mailbox = self._resolve_mailbox(recipient)
        if mailbox is None:
            return RecipientResult(
                recipient, Outcome.FAILED, "5.1.1", "550 5.1.1 No such user here"
            )
        try:
            mailbox_path(self._root, mailbox)
        except MailboxPathError as error:
            return RecipientResult(recipient, Outcome.FAILED, "5.1.3", f"550 5.1.3 {error}")
        local, _, domain = mailbox.rpartition("@")
        header = f"Return-Path: <{message.sender}>\nDelivered-To: {mailbox}\n".encode()
        return self._run_blocking(
            lambda: self._store(recipient, domain, local, header, message.body)
        )

    def _store(
        self, recipient: str, domain: str, local: str, header: bytes, body: bytes
    ) -> RecipientResult:
        """In the writer thread (the copy to LF line endings too: off the event loop)."""
        try:
            self._writer.write(domain, local, header + to_lf(body))
        except OSError as error:
            # Disk full, permissions, a symlink planted in the way: try again later, never
            # bounce for a local fault (RFC 5321 §6.1: no loss "for frivolous reasons").
            code = errno.errorcode.get(error.errno or 0, "EIO")
            return RecipientResult(
                recipient, Outcome.DEFERRED, "4.3.0", f"451 4.3.0 Maildir write failed: {code}"
            )
        return RecipientResult(
            recipient, Outcome.DELIVERED, "2.0.0", "250 2.0.0 Delivered to Maildir"
        )


_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_directory(name: str, parent: int, *, create: bool = True) -> int:
    """A directory under `parent`, created 0700 whatever the umask if missing. O_NOFOLLOW:
    a symlink planted in its place fails with ELOOP instead of being followed (S-05)."""
    try:
        return os.open(name, _DIRECTORY, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=parent)
        fd = os.open(name, _DIRECTORY, dir_fd=parent)
        os.fchmod(fd, 0o700)
        return fd


@dataclass(frozen=True, slots=True)
class _Mailbox:
    """Open descriptors of one Maildir's tmp/ and new/: every later file operation is
    relative to them, so nothing on the way can be swapped for a symlink."""

    tmp: int
    new: int

    def close(self) -> None:
        os.close(self.tmp)
        os.close(self.new)


class MaildirWriter:
    """Writes message files; keeps the directories of recently used Maildirs open, so a
    delivery costs seven system calls: create, write, fsync, close, link, unlink and the
    fsync of new/. Used from one thread at a time."""

    CACHED_MAILBOXES = 256

    def __init__(self, root: str) -> None:
        self._root_path = root
        self._root: int | None = None
        self._open: OrderedDict[str, _Mailbox] = OrderedDict()

    def write(self, domain: str, local: str, content: bytes) -> None:
        """Store `content` in `<domain>/<local>/new/` durably, or raise OSError."""
        if self._root is None:
            os.makedirs(self._root_path, mode=0o700, exist_ok=True)
            self._root = os.open(self._root_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        key = f"{domain}/{local}"
        mailbox = self._open.pop(key, None)
        try:
            if mailbox is None:
                mailbox = self._open_mailbox(domain, local)
            self._write_file(mailbox, content)
        except FileNotFoundError:
            # The Maildir was removed while its directories were open: open it afresh.
            if mailbox is not None:
                mailbox.close()
            mailbox = self._open_mailbox(domain, local)
            self._write_file(mailbox, content)
        except OSError:
            if mailbox is not None:
                mailbox.close()
            raise
        self._open[key] = mailbox
        if len(self._open) > self.CACHED_MAILBOXES:
            _, oldest = self._open.popitem(last=False)
            oldest.close()

    def close(self) -> None:
        for mailbox in self._open.values():
            mailbox.close()
        self._open.clear()
        if self._root is not None:
            os.close(self._root)
            self._root = None

    def _open_mailbox(self, domain: str, local: str) -> _Mailbox:
        assert self._root is not None
        domain_fd = _open_directory(domain, self._root)
        try:
            box = _open_directory(local, domain_fd)
        finally:
            os.close(domain_fd)
        try:
            os.close(_open_directory("cur", box))
            return _Mailbox(_open_directory("tmp", box), _open_directory("new", box))
        finally:
            os.close(box)

    @staticmethod
    def _write_file(mailbox: _Mailbox, content: bytes) -> None:
        name = unique_name(time.time())
        fd = os.open(name, _NEW_FILE, 0o600, dir_fd=mailbox.tmp)
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(name, name, src_dir_fd=mailbox.tmp, dst_dir_fd=mailbox.new)
        finally:
            os.unlink(name, dir_fd=mailbox.tmp)
        os.fsync(mailbox.new)
