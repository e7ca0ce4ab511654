"""Local delivery into Maildirs (the qmail spec), `<root>/<domain>/<local-part>/`.

Each copy is written to `tmp/` under a unique name (O_EXCL, O_NOFOLLOW, mode 0600),
fsynced, linked into `new/`, and `new/` itself is fsynced before the recipient counts as
delivered: a file in `new/` is always complete, and survives power loss. Once fsynced,
a file's pages leave the page cache (`MaildirWriter._sync`): delivered mail is not kept
in memory for a reader that may never come. Mail is stored
with LF line endings, as qmail, Postfix and Dovecot write it, beginning with
`Return-Path:` and `Delivered-To:` (never with a control character in them: a delivery
that would write one is deferred); copies of those two fields in the message's own
header section are removed first (a client planted them; relayed mail keeps them, as
RFC 5321 §4.4 forbids a relay to look for them). A crash after the link and before the spool update
delivers again after restart: at least once, never lost (a duplicate is possible).

Every file operation is relative to directory descriptors opened with O_NOFOLLOW, so a
symlink planted in a mailbox fails the delivery (deferred) instead of redirecting it.
Blocking file work runs through `run_blocking` (one thread in the server) so the event
loop never waits on the disk.

Files are 0600 and directories 0700 unless `Permissions` says otherwise (maildir.mode,
maildir.group): an IMAP server running as another user reads the mailboxes through a
group, given to every file and directory gsmtp creates, with the group read bit on
files and read and execute bits on directories. The modes are set with fchmod, so the
server's umask (077) does not take them away.
Deliveries are made in batches, as a database commits in groups: while one batch is on
the disk, the deliveries that arrive wait, and the next batch takes all of them (up to
`max_batch` files); it starts as soon as the batch before has linked its files, while
that one still fsyncs its directories. A batch opens the Maildirs on the Maildir thread,
creates, writes and fsyncs every file in `tmp/` through `run_parallel` (several threads,
each with its part of the batch, of at least FSYNC_PIECE_MIN files: the creations and
fsyncs of different files overlap on the disk, which a single thread left waiting on
the journal), links them into `new/`,
and fsyncs each `new/` directory once, whatever the number of files linked into it. Only
then is any of its recipients delivered; their results are answered together, so the
queue records them in one spool commit. A failure of one file (its write, fsync or link)
defers its recipient only; a failed fsync of a `new/` defers the recipients linked into
that directory (a copy may then be delivered twice, never lost).

Nothing is left behind: a write that fails once its `tmp/` file exists (ENOSPC, EIO, any
OSError) removes that file before the delivery is deferred; a directory made for a new
mailbox (the domain, the mailbox, its tmp/new/cur) is fsynced into its parent, so the
file linked into `new/` cannot vanish with its directory after a power loss; and
`clean_tmp` removes files that stayed in `tmp/` for 36 hours (maildir(5): left by a
crash), a bounded number of mailboxes per call.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import secrets
import socket
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache, partial, update_wrapper
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from gevent.event import AsyncResult
from gevent.monkey import get_original

from gsmtp import metrics
from gsmtp.message import Outcome, QueuedMessage, RecipientResult
from gsmtp.protocol.address import has_control
from gsmtp.protocol.trace import split_fields

T = TypeVar("T")
U = TypeVar("U")
_counter = itertools.count(1)
# maildir(5): a file in tmp/ untouched this long was left by a crashed delivery.
STALE_TMP_SECONDS = 36 * 3600
# Mailboxes whose tmp/ one `clean_tmp` call looks at; the next call goes on from there.
CLEAN_TMP_MAILBOXES = 1000
# Files one batch writes at most (their bodies are in memory anyway, held by senders).
MAX_BATCH = 256
# Mailboxes whose tmp/ and new/ stay open between batches (two descriptors each).
CACHED_MAILBOXES = 256
# Local deliveries a worker runs at once (the queue manager's local lane), in batches:
# a batch on the disk and the next one filling. Each holds its body, within the queue's
# body budget. `MaildirDeliverer.deliveries_at_once` for a smaller batch.
BATCHES_AT_ONCE = 2
DELIVERIES_AT_ONCE = BATCHES_AT_ONCE * MAX_BATCH
# Files (or new/ directories) one fsync thread takes at least from a batch. Each piece
# is a hand-off to a pool thread, and waking one costs the event loop more than a
# single file gains from overlapping its fsync with another's. Against one piece per
# thread whatever the batch size: C=100 M=100 1 KiB, six alternated rounds, 6,650
# against 6,462 msg/s acknowledged and 614 against 629 µs of CPU a message with its
# delivery; local end to end, four rounds, 2,232 against 2,141 msg/s.
FSYNC_PIECE_MIN = 4
# A body larger than this is converted to LF and written piece by piece, so that a
# delivery holds about two pieces beside the body (the piece and its conversion).
WRITE_PIECE = 256 * 1024


# The standard os.close, even in a patched process: gevent's first checks the descriptor
# (fcntl, fstat) and defers closing a directory to the loop, in case the loop watches
# it. No Maildir descriptor is ever watched (only threads use them), and the checks
# were two system calls for every file delivered.
_close: Callable[[int], None] = get_original("os", "close")


@dataclass(frozen=True, slots=True)
class Permissions:
    """Mode of message files, and the group (a gid) of everything created; None keeps
    the process's group. Directories get the execute bit wherever the file mode has the
    read bit (0600 → 0700, 0640 → 0750)."""

    file_mode: int = 0o600
    gid: int | None = None

    @property
    def directory_mode(self) -> int:
        return self.file_mode | ((self.file_mode & 0o444) >> 2)

    def apply(self, fd: int, mode: int) -> None:
        """Set `mode` and the group on an open file or directory."""
        os.fchmod(fd, mode)
        if self.gid is not None:
            os.fchown(fd, -1, self.gid)


class RunBlocking(Protocol):
    """Runs file work where blocking is harmless (the Maildir thread) and returns its
    value or raises its exception."""

    def __call__(self, work: Callable[[], T], /) -> T: ...


class RunParallel(Protocol):
    """Runs each piece of work on a thread of its own (as many as there are threads) and
    returns when all are done; raises what one of them raised."""

    def __call__(self, works: Sequence[Callable[[], None]], /) -> None: ...


def _run_inline(work: Callable[[], T]) -> T:
    return work()


def _run_all_inline(works: Sequence[Callable[[], None]]) -> None:
    for work in works:
        work()


class MailboxPathError(Exception):
    """An address that would name a path outside the Maildir root."""


class WriterClosed(OSError):
    """A Maildir step refused because the writer is closed (the server is stopping): the
    batch did not finish, so none of its copies counts as stored."""


@lru_cache(maxsize=4096)
def mailbox_path(root: str, address: str) -> str:
    """`<root>/<domain>/<local-part>`, refusing any name that could leave the root: each
    part must be one plain path component (no separator, not "." or "..", no leading
    dot). Symlinks inside are refused when the directories are opened. Remembered for
    the mailboxes used most (a pure function, checked for every delivery)."""
    local, _, domain = address.rpartition("@")
    for part in (local, domain):
        if not part or part.startswith(".") or "/" in part or "\x00" in part:
            raise MailboxPathError(f"unsafe mailbox name: {address!r}")
    path = os.path.join(root, domain, local)
    if os.path.commonpath([root, path]) != root:
        raise MailboxPathError(f"mailbox path escapes the root: {address!r}")
    return path


@cache
def _escaped_host() -> str:
    """The host name for unique names, '/' and ':' escaped: asked once (a system call
    per file otherwise; a renamed host only changes the part after the last dot)."""
    return socket.gethostname().replace("/", "\\057").replace(":", "\\072")


def unique_name(now: float) -> str:
    """`<sec>.M<usec>P<pid>Q<n>R<random>.<host>`; the host with '/' and ':' escaped."""
    host = _escaped_host()
    seconds = int(now)
    micros = int((now - seconds) * 1_000_000)
    return f"{seconds}.M{micros}P{os.getpid()}Q{next(_counter)}R{secrets.token_hex(4)}.{host}"


def to_lf(body: bytes | memoryview) -> bytes:
    """`body` with LF line endings: every CR deleted. The spool holds only content whose
    every CR is in a CRLF (DATA refuses a bare CR or LF; notices are made with
    `crlf_line_ends`; the trace and DKIM fields gsmtp adds end in CRLF), so this turns
    each CRLF into an LF. Deleting one byte value finds it with memchr: ten times as
    fast as splitting the lines and joining them with LF (CPython 3.11, 100 KiB of
    76-byte lines: 26 against 259 µs), and no list of lines is made. A stray CR, in
    content that came from elsewhere, is dropped: a file of LF lines has no place for it."""
    return bytes(body).replace(b"\r", b"")


def write_content(fd: int, header: bytes, body: bytes) -> None:
    """Write a job's file: the delivery fields, then the body as stored, without planted
    delivery fields and with LF line endings. A large body is converted and written in
    WRITE_PIECE pieces, so a delivery holds the body once, not twice or three times:
    eight threads writing 35 MB messages would otherwise add hundreds of megabytes on
    top of the queue's body budget. Any cut will do: deleting a CR needs no neighbour."""
    kept, rest = split_fields(body)
    if kept is not None:
        header += to_lf(kept)
    size = len(body)
    if size - rest <= WRITE_PIECE:
        _write_all(fd, header + to_lf(body[rest:]))
        return
    _write_all(fd, header)
    view = memoryview(body)
    for start in range(rest, size, WRITE_PIECE):
        _write_all(fd, to_lf(view[start : start + WRITE_PIECE]))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class MaildirDeliverer:
    """The `local` transport. `resolve_mailbox` maps a recipient to its canonical
    mailbox name (`jones@foo.com` for `Jones@FOO.com`), or None if there is none.

    `run_blocking` runs the file work of a batch that must stay in order (create, write,
    link); `run_parallel` the fsyncs, spread over `fsync_threads` pieces of work."""

    def __init__(
        self,
        root: str,
        *,
        resolve_mailbox: Callable[[str], str | None],
        run_blocking: RunBlocking = _run_inline,
        run_parallel: RunParallel = _run_all_inline,
        fsync_threads: int = 1,
        max_batch: int = MAX_BATCH,
        cached_mailboxes: int = CACHED_MAILBOXES,
        fsync: Callable[[int], None] = os.fsync,
        permissions: Permissions = Permissions(),
    ) -> None:
        self._root = os.path.abspath(root)
        self._writer = MaildirWriter(
            self._root, fsync=fsync, permissions=permissions, cached_mailboxes=cached_mailboxes
        )
        self._resolve_mailbox = resolve_mailbox
        self._run_blocking = run_blocking
        self._run_parallel = run_parallel
        self._fsync_threads = max(1, fsync_threads)
        self._batches = _GroupWriter(self._write_batch, max_batch)
        # A batch on the disk and the next one filling (DELIVERIES_AT_ONCE).
        self.deliveries_at_once = BATCHES_AT_ONCE * max(1, max_batch)

    def deliver(self, message: QueuedMessage, recipients: Sequence[str]) -> list[RecipientResult]:
        prepared = [self._prepare(message, recipient) for recipient in recipients]
        jobs = [job for job in prepared if isinstance(job, FileJob)]
        if jobs:
            try:
                self._batches.run(jobs)
            except WriterClosed as closed:
                for job in jobs:  # deferred (451), delivered again after the restart
                    job.error = closed
        return [
            _stored(recipient, job) if isinstance(job, FileJob) else job
            for recipient, job in zip(recipients, prepared, strict=True)
        ]

    def clean_tmp(self, now: float, *, max_mailboxes: int = CLEAN_TMP_MAILBOXES) -> int:
        """Remove files in `<mailbox>/tmp/` last modified more than 36 hours before `now`
        (wall-clock seconds), looking at up to `max_mailboxes` mailboxes and going on
        from there at the next call. Runs on the Maildir thread; returns how many files
        went. Raises OSError only for the root itself; a broken mailbox is skipped."""
        return self._run_blocking(lambda: self._writer.clean_tmp(now, max_mailboxes))

    def close(self) -> None:
        self._writer.close()

    def _prepare(self, message: QueuedMessage, recipient: str) -> FileJob | RecipientResult:
        """The copy to write for `recipient`, or why there is none."""
        mailbox = self._resolve_mailbox(recipient)
        if mailbox is None:
            return RecipientResult(
                recipient, Outcome.FAILED, "5.1.1", "550 5.1.1 No such user here"
            )
        try:
            mailbox_path(self._root, mailbox)
        except MailboxPathError as error:
            return RecipientResult(recipient, Outcome.FAILED, "5.1.3", f"550 5.1.3 {error}")
        for field, value in (("Return-Path", message.sender), ("Delivered-To", mailbox)):
            if has_control(value):
                # The spool and the accounts refuse such addresses; this is the last
                # guard: a CR or LF here would add header fields to the stored mail.
                return RecipientResult(
                    recipient,
                    Outcome.DEFERRED,
                    "4.3.0",
                    f"451 4.3.0 Refused to write a control character into {field}:"
                    " the stored address is damaged",
                )
        local, _, domain = mailbox.rpartition("@")
        header = f"Return-Path: <{message.sender}>\nDelivered-To: {mailbox}\n".encode()
        return FileJob(domain, local, header, message.body)

    def _write_batch(self, jobs: list[FileJob], linked: Callable[[], None]) -> None:
        """One batch, in the leader's greenlet: open the mailboxes, create, write and
        fsync the files (in parallel), link all, fsync each new/ once. Each job ends
        with `error` None only if its file and its directory entry are durable. Once
        linked, `linked()` lets the next batch start while these directories are
        fsynced (their descriptors stay open till then: see `MaildirWriter.syncing`)."""
        writer, pieces = self._writer, self._fsync_threads
        self._run_blocking(lambda: writer.open_mailboxes(jobs))
        ready = [job for job in jobs if job.error is None]
        if ready:
            self._run_parallel(
                [partial(writer.write_files, part) for part in _split(ready, pieces)]
            )
            if any(job.reopen or job.error is not None for job in ready):
                self._run_blocking(lambda: writer.after_writes(ready))
        directories = self._run_blocking(lambda: writer.link(jobs))
        if directories:
            writer.syncing.update(directory for directory, _ in directories)
            try:
                linked()
                self._run_parallel(
                    [partial(writer.sync_directories, part) for part in _split(directories, pieces)]
                )
            finally:
                writer.syncing.subtract(directory for directory, _ in directories)
                writer.syncing += Counter()  # drops the zeros: only those syncing stay
        metrics.MAILDIR_BATCHES.inc()
        metrics.MAILDIR_FILES.inc(len(jobs))
        metrics.MAILDIR_DIRECTORY_FSYNCS.inc(len(directories))


def _stored(recipient: str, job: FileJob) -> RecipientResult:
    if job.error is not None:
        # Disk full, permissions, a symlink planted in the way: try again later, never
        # bounce for a local fault (RFC 5321 §6.1: no loss "for frivolous reasons").
        code = errno.errorcode.get(job.error.errno or 0, "EIO")
        return RecipientResult(
            recipient, Outcome.DEFERRED, "4.3.0", f"451 4.3.0 Maildir write failed: {code}"
        )
    return RecipientResult(recipient, Outcome.DELIVERED, "2.0.0", "250 2.0.0 Delivered to Maildir")


def _split(items: Sequence[U], pieces: int) -> list[list[U]]:
    """`items` dealt round-robin into at most `pieces` lists of at least
    FSYNC_PIECE_MIN items each (all in one list when there are fewer)."""
    count = min(pieces, len(items) // FSYNC_PIECE_MIN)
    if count <= 1:
        return [list(items)] if items else []
    return [list(items[start::count]) for start in range(count)]


_LEAD = object()  # a waiting delivery's answer: "the batch is yours to run"


class _GroupWriter:
    """Batches concurrent deliveries, like a database's group commit. The first caller
    (the leader) writes its jobs at once; callers arriving meanwhile wait. When the
    batch calls the hand-over it is given (or ends), the first waiting caller leads the
    next batch, with everything that waits (up to `max_batch` jobs); when a batch is
    done, its followers are answered together. No greenlet of its own: the leader is a
    delivery greenlet, so nothing here needs an owner."""

    def __init__(
        self, write: Callable[[list[FileJob], Callable[[], None]], None], max_batch: int
    ) -> None:
        self._write = write
        self._max_batch = max(1, max_batch)
        self._waiting: deque[tuple[list[FileJob], AsyncResult]] = deque()
        self._busy = False

    def run(self, jobs: list[FileJob]) -> None:
        """Write `jobs` (each ends with its `error` set or None); returns once they are
        durable or failed."""
        mine: tuple[list[FileJob], AsyncResult] = (jobs, AsyncResult())
        self._waiting.append(mine)
        if self._busy:
            try:
                if mine[1].get() is not _LEAD:
                    return  # written by another caller's batch
            except BaseException:
                self._leave(mine)
                raise
        self._busy = True
        taken = [self._waiting.popleft()]  # a leader's own entry is always the first
        count = len(jobs)
        while self._waiting and count + len(self._waiting[0][0]) <= self._max_batch:
            count += len(self._waiting[0][0])
            taken.append(self._waiting.popleft())
        handed_over = False

        def hand_over() -> None:
            nonlocal handed_over
            if not handed_over:
                handed_over = True
                self._hand_over()

        try:
            self._write([job for entry, _ in taken for job in entry], hand_over)
        except BaseException as error:
            # Killed or crashed mid-batch: the followers defer (a copy may be in new/
            # already: delivered twice at worst, never lost).
            failure = error if isinstance(error, Exception) else OSError(errno.EINTR, "stopped")
            for _, done in taken[1:]:
                done.set_exception(failure)
            raise
        else:
            for _, done in taken[1:]:
                done.set(None)
        finally:
            hand_over()

    def _hand_over(self) -> None:
        if self._waiting:
            self._waiting[0][1].set(_LEAD)
        else:
            self._busy = False

    def _leave(self, entry: tuple[list[FileJob], AsyncResult]) -> None:
        """A waiting caller was killed: forget it; if it had just been made leader, the
        next waiting caller leads instead."""
        for index, waiting in enumerate(self._waiting):
            if waiting is entry:
                del self._waiting[index]
                if entry[1].ready() and entry[1].successful() and entry[1].value is _LEAD:
                    self._hand_over()
                return


_PRIVATE = Permissions()  # the default: no extra system calls per message
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_directory(
    name: str,
    parent: int,
    *,
    fsync: Callable[[int], None],
    create: bool = True,
    permissions: Permissions = Permissions(),
) -> int:
    """A directory under `parent`, created with the permissions' directory mode (0700 by
    default) and group whatever the umask if missing, and then
    fsynced into `parent` (its entry is durable before anything is stored in it).
    O_NOFOLLOW: a symlink planted in its place fails with ELOOP instead of being followed
    (S-05)."""
    try:
        return os.open(name, _DIRECTORY, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise
        made = False
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=parent)
            made = True
        fd = os.open(name, _DIRECTORY, dir_fd=parent)
        try:
            permissions.apply(fd, permissions.directory_mode)
            if made:
                fsync(parent)
        except OSError:
            _close(fd)
            raise
        return fd


@dataclass(frozen=True, slots=True)
class _Mailbox:
    """Open descriptors of one Maildir's tmp/ and new/: every later file operation is
    relative to them, so nothing on the way can be swapped for a symlink."""

    tmp: int
    new: int

    def close(self) -> None:
        _close(self.tmp)
        _close(self.new)


def _is_at(fd: int, path: str, *, dir_fd: int | None = None, follow: bool = False) -> bool:
    """The open directory `fd` is still the one at `path`: not removed, recreated or
    moved away since it was opened. Two stat calls."""
    try:
        there = os.stat(path, dir_fd=dir_fd, follow_symlinks=follow)
        held = os.fstat(fd)
    except OSError:
        return False
    return (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino)


def _still_there(root: int, key: str, mailbox: _Mailbox) -> bool:
    """A cached Maildir's tmp/ and new/ are still the directories at its path (else
    files would be linked into a directory no one reads, or fail there forever). Checked
    once a mailbox a batch; a symlink now in their place is not followed and does not
    match."""
    return all(
        _is_at(fd, f"{key}/{name}", dir_fd=root)
        for name, fd in (("tmp", mailbox.tmp), ("new", mailbox.new))
    )


P = ParamSpec("P")
R = TypeVar("R")


def _step(
    method: Callable[Concatenate[MaildirWriter, P], R],
) -> Callable[Concatenate[MaildirWriter, P], R]:
    """A MaildirWriter step that runs on a thread: counted while it runs, refused once
    the writer is closing. A step outlives its greenlet when that is killed (a delivery
    cut at stop), so `close()` must not close a descriptor the step may still use: the
    number could be reused at once by another open, and the step would then create
    directories and link files relative to a directory that is not its own."""

    def run(writer: MaildirWriter, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with writer._steps_lock:
            if writer._closing:
                raise WriterClosed(errno.ESHUTDOWN, "the Maildir writer is closed (stopping)")
            writer._steps += 1
        try:
            return method(writer, *args, **kwargs)
        finally:
            with writer._steps_lock:
                writer._steps -= 1
                last = writer._closing and writer._steps == 0 and not writer._closed
                writer._closed = writer._closed or last
            if last:
                writer._close_all()  # close() came while this step ran: it closes now

    update_wrapper(run, method)
    return run


@dataclass(slots=True, eq=False)
class FileJob:
    """One copy to store in `<domain>/<local>/new/`; the writer fills in the rest as the
    batch goes, and `error` says at the end whether it was stored (None) or why not."""

    domain: str
    local: str
    header: bytes
    body: bytes  # as spooled: CRLF line endings, possibly planted delivery fields
    name: str = ""
    fd: int = -1
    mailbox: _Mailbox | None = None
    error: OSError | None = None
    reopen: bool = False  # its Maildir came from the cache (it may have gone since)


class MaildirWriter:
    """Writes message files in batches; keeps the directories of recently used Maildirs
    open, so a file costs create, write, fsync, close, link and unlink, and a batch one
    fsync per new/ directory it touched. `open_mailboxes`, `after_writes` and `link`
    run on one thread, one batch at a time; `write_files` and `sync_directories` on
    several threads at once, each on its own part of the batch."""

    def __init__(
        self,
        root: str,
        *,
        fsync: Callable[[int], None] = os.fsync,
        permissions: Permissions = Permissions(),
        cached_mailboxes: int = CACHED_MAILBOXES,
    ) -> None:
        self._cached_mailboxes = cached_mailboxes
        self._root_path = root
        self._permissions = permissions
        self._root: int | None = None
        self._open: OrderedDict[str, _Mailbox] = OrderedDict()
        # Mailboxes dropped from the cache during a batch: its jobs may still use their
        # descriptors, so they are closed when the next batch starts.
        self._retired: list[_Mailbox] = []
        self._fsync = fsync
        self._sweep: Generator[int, None, None] | None = None
        # The new/ directories being fsynced by batches that linked their files (the next
        # batch may start meanwhile): a retired mailbox stays open while its new/ is
        # one of them. Only those: with batches overlapping all the time, waiting for
        # none to be syncing kept 500 retired mailboxes (1,000 descriptors) open.
        self.syncing: Counter[int] = Counter()
        # Steps running on threads (see `_step`), whether close() was called, and
        # whether the descriptors went (once: a second close() must not close them
        # again, their numbers may belong to another file by then).
        self._steps_lock = get_original("threading", "Lock")()
        self._steps = 0
        self._closing = False
        self._closed = False

    @_step
    def open_mailboxes(self, jobs: Sequence[FileJob]) -> None:
        """Give each job its Maildir's open tmp/ and new/ (from the cache, or opened and
        created now); a job whose Maildir cannot be opened ends with its error. On the
        Maildir thread: the cache is this thread's alone."""
        self._close_retired()
        if self._root is not None and not _is_at(self._root, self._root_path, follow=True):
            self._drop_root()
        try:
            root = self._open_root()
        except OSError as error:
            for job in jobs:
                job.error = error
            return
        checked: set[str] = set()
        for job in jobs:
            key = f"{job.domain}/{job.local}"
            mailbox = self._open.get(key)
            if mailbox is not None and key not in checked and not _still_there(root, key, mailbox):
                self._retire(key)  # removed, recreated or moved away: opened afresh below
                mailbox = None
            checked.add(key)
            try:
                if mailbox is None:
                    mailbox = self._mailbox(root, key, job)
                else:
                    self._open.move_to_end(key)
                    job.reopen = True  # may have been removed since: see after_writes
            except OSError as error:
                self._retire(key)
                self._abandon(job, error)
                continue
            job.mailbox = mailbox

    @_step
    def write_files(self, jobs: Sequence[FileJob]) -> None:
        """Create and write each job's file in its tmp/: the header, then the body
        without planted delivery fields and with LF line endings; then fsync each one.
        On one of several threads, each with its own part of the batch (the creations
        and fsyncs of different files overlap on the disk); touches no shared state."""
        written = []
        for job in jobs:
            assert job.mailbox is not None
            try:
                self._start_file(job.mailbox, job)
            except OSError as error:
                # Not found in a cached Maildir: it was removed while its directories
                # were open; after_writes tries again in the Maildir opened afresh.
                again = job.reopen and isinstance(error, FileNotFoundError)
                self._abandon(job, error)
                job.reopen = again
                continue
            job.reopen = False
            written.append(job)
        for job in written:
            try:
                self._sync(job.fd)
            except OSError as error:
                job.error = error  # link() closes the file and removes its tmp/ name

    @_step
    def after_writes(self, jobs: Sequence[FileJob]) -> None:
        """On the Maildir thread, once the parallel writes are done: a job whose cached
        Maildir had gone is written again into the Maildir opened afresh (and fsynced);
        a Maildir whose file could not be written leaves the cache (opened afresh next
        time)."""
        for job in jobs:
            if not job.reopen:
                if job.error is not None and job.fd < 0:
                    self._retire(f"{job.domain}/{job.local}")  # opened afresh next time
                continue
            job.reopen = False
            key = f"{job.domain}/{job.local}"
            self._retire(key)
            job.error = None
            try:
                self._start_file(self._mailbox(self._open_root(), key, job), job)
                self._sync(job.fd)
            except OSError as error:
                self._retire(key)
                self._abandon(job, error)

    @_step
    def link(self, jobs: Sequence[FileJob]) -> list[tuple[int, list[FileJob]]]:
        """Close each file, link the fsynced ones into new/, remove every tmp/ name; the
        new/ directories linked into (a descriptor each) with their jobs."""
        directories: dict[int, list[FileJob]] = {}
        for job in jobs:
            if job.fd < 0 or job.mailbox is None:
                continue  # failed before its file existed, or cleaned up already
            mailbox, fd = job.mailbox, job.fd
            job.fd = -1
            try:
                _close(fd)
                if job.error is None:
                    os.link(job.name, job.name, src_dir_fd=mailbox.tmp, dst_dir_fd=mailbox.new)
                    directories.setdefault(mailbox.new, []).append(job)
            except OSError as error:
                job.error = error
                self._retire(f"{job.domain}/{job.local}")  # opened afresh next time
            finally:
                # Linked into new/ or failed on the way (ENOSPC, EIO...): the tmp/ name
                # goes either way, so a failed write leaves no partial file behind.
                try:
                    os.unlink(job.name, dir_fd=mailbox.tmp)
                except FileNotFoundError:
                    pass
                except OSError as error:
                    job.error = job.error or error
        return list(directories.items())

    @_step
    def sync_directories(self, directories: Sequence[tuple[int, list[FileJob]]]) -> None:
        """fsync each new/ once for all the files just linked into it (on one of several
        threads); if it fails, none of those files counts as stored."""
        for directory, jobs in directories:
            try:
                self._fsync(directory)
            except OSError as error:
                for job in jobs:
                    job.error = job.error or error

    def close(self) -> None:
        """Close every descriptor, at once if no step runs on a thread; else the last
        running step closes them when it ends. No step starts after this."""
        with self._steps_lock:
            self._closing = True
            if self._steps or self._closed:
                return
            self._closed = True
        self._close_all()

    def _close_all(self) -> None:
        """Every descriptor (no step runs any more: none is in use)."""
        self._drop_root()
        for mailbox in self._retired:
            mailbox.close()
        self._retired.clear()

    def _mailbox(self, root: int, key: str, job: FileJob) -> _Mailbox:
        mailbox = self._open_mailbox(root, job.domain, job.local)
        self._open[key] = mailbox
        return mailbox

    def _retire(self, key: str) -> None:
        mailbox = self._open.pop(key, None)
        if mailbox is not None:
            self._retired.append(mailbox)

    def _close_retired(self) -> None:
        """Between batches: close what was dropped, and what the cache holds too many
        (later, while an earlier batch still fsyncs directories)."""
        while len(self._open) > self._cached_mailboxes:
            self._retired.append(self._open.popitem(last=False)[1])
        kept = []
        for mailbox in self._retired:
            if self.syncing[mailbox.new]:
                kept.append(mailbox)
            else:
                mailbox.close()
        self._retired = kept

    def _start_file(self, mailbox: _Mailbox, job: FileJob) -> None:
        job.name = unique_name(time.time())
        job.fd = os.open(job.name, _NEW_FILE, 0o600, dir_fd=mailbox.tmp)
        job.mailbox = mailbox
        if self._permissions != _PRIVATE:
            self._permissions.apply(job.fd, self._permissions.file_mode)
        write_content(job.fd, job.header, job.body)

    def _sync(self, fd: int) -> None:
        """fsync a written file, then let its pages go from the page cache (clean after
        the fsync, so that only frees them). A delivered message is read later, if at
        all, by another program (an IMAP server); cached, a burst of deliveries pushes
        the spool's own pages out of memory. The pages freed are what the next files
        are written into while they are still warm: on a VM that hands freed memory
        back to its host (virtio free page reporting, 2 s after it is freed), each page
        taken afresh costs a fault in the host, and a 100 KiB file took 300-340 µs of
        CPU to write and fsync instead of 120-130 (`bench/notes.md`). Advice only: a
        file system that refuses it, or a platform without it, delivers as before."""
        self._fsync(fd)
        if hasattr(os, "posix_fadvise"):  # not on macOS
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def _abandon(self, job: FileJob, error: OSError) -> None:
        """A failed job: its file (if made) closed and removed, its error noted."""
        job.error = error
        if job.fd >= 0:
            with contextlib.suppress(OSError):
                _close(job.fd)
            job.fd = -1
            if job.mailbox is not None:
                with contextlib.suppress(OSError):
                    os.unlink(job.name, dir_fd=job.mailbox.tmp)
        job.mailbox = None

    def _drop_root(self) -> None:
        """The root was moved away or removed (checked once a batch): every Maildir
        opened through it goes too, and it is opened afresh (created if missing). Else
        mail would go on into the moved tree, or fail with ENOENT until a restart."""
        for key in list(self._open):
            self._retire(key)
        if self._sweep is not None:
            self._sweep.close()
            self._sweep = None
        if self._root is not None:
            _close(self._root)
            self._root = None

    def _open_root(self) -> int:
        """The root, created if missing together with every missing directory on the
        way to it (`maildir.root = "mail/sub"`), each with the directory mode and group
        of the mailboxes: a parent left 0700 would keep the group (Dovecot) out."""
        if self._root is None:
            missing = []
            path = os.path.abspath(self._root_path)
            while not os.path.isdir(path) and os.path.dirname(path) != path:
                missing.append(path)
                path = os.path.dirname(path)
            if missing:
                parent = os.open(path, _DIRECTORY)
                try:
                    for directory in reversed(missing):
                        made = _open_directory(
                            os.path.basename(directory),
                            parent,
                            fsync=self._fsync,
                            permissions=self._permissions,
                        )
                        _close(parent)
                        parent = made
                finally:
                    _close(parent)
            self._root = os.open(self._root_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self._root

    def _open_mailbox(self, root: int, domain: str, local: str) -> _Mailbox:
        def opened(name: str, parent: int) -> int:
            return _open_directory(name, parent, fsync=self._fsync, permissions=self._permissions)

        domain_fd = opened(domain, root)
        try:
            box = opened(local, domain_fd)
        finally:
            _close(domain_fd)
        try:
            _close(opened("cur", box))
            tmp = opened("tmp", box)
            try:
                return _Mailbox(tmp, opened("new", box))
            except OSError:
                _close(tmp)
                raise
        finally:
            _close(box)

    # -- tmp/ clean-up ----------------------------------------------------------------------

    @_step
    def clean_tmp(self, now: float, max_mailboxes: int) -> int:
        """See `MaildirDeliverer.clean_tmp`."""
        root = self._open_root()
        removed = 0
        for _ in range(max_mailboxes):
            if self._sweep is None:
                self._sweep = _tmp_directories(root)
            tmp = next(self._sweep, None)
            if tmp is None:
                self._sweep = None  # a whole pass is done; the next call starts another
                break
            try:
                removed += _remove_stale(tmp, now - STALE_TMP_SECONDS)
            finally:
                _close(tmp)
        return removed


def _tmp_directories(root: int) -> Generator[int, None, None]:
    """An open descriptor of each `<domain>/<local>/tmp` under the root (the caller closes
    it). Symlinks are never followed at any level; what cannot be opened is skipped."""
    for domain in _subdirectories(root):
        try:
            domain_fd = os.open(domain, _DIRECTORY, dir_fd=root)
        except OSError:
            continue
        try:
            for local in _subdirectories(domain_fd):
                try:
                    box = os.open(local, _DIRECTORY, dir_fd=domain_fd)
                except OSError:
                    continue
                try:
                    tmp = os.open("tmp", _DIRECTORY, dir_fd=box)
                except OSError:
                    continue
                finally:
                    _close(box)
                yield tmp
        finally:
            _close(domain_fd)


def _subdirectories(directory: int) -> list[str]:
    try:
        with os.scandir(directory) as entries:
            return [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _remove_stale(tmp: int, cutoff: float) -> int:
    """Unlink the regular files in `tmp` last modified before `cutoff`."""
    removed = 0
    try:
        with os.scandir(tmp) as entries:
            stale = [
                entry.name
                for entry in entries
                if entry.is_file(follow_symlinks=False)
                and entry.stat(follow_symlinks=False).st_mtime < cutoff
            ]
    except OSError:
        return 0
    for name in stale:
        try:
            os.unlink(name, dir_fd=tmp)
        except OSError:  # gone already, or not ours to remove: the next pass tries again
            continue
        removed += 1
    return removed
