"""Maildir writer: qmail layout, LF endings, permissions, no escape from the root."""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import gevent
import pytest
from gevent.threadpool import ThreadPool

from gsmtp.delivery.maildir import (
    FSYNC_PIECE_MIN,
    WRITE_PIECE,
    FileJob,
    MailboxPathError,
    MaildirDeliverer,
    MaildirWriter,
    Permissions,
    WriterClosed,
    mailbox_path,
    write_content,
)
from gsmtp.message import MessageId, Outcome, QueuedMessage

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


@pytest.mark.parametrize(
    ("sender", "mailbox"),
    [
        ("evil\nX-Injected: yes", "alice@local.example"),
        ("evil\r@remote.example", "alice@local.example"),
        ("bob@remote.example", "alice\nX-Injected: yes@local.example"),
    ],
    ids=["sender-lf", "sender-cr", "mailbox-lf"],
)
def test_a_control_character_never_reaches_return_path_or_delivered_to(
    tmp_path: Path, sender: str, mailbox: str
) -> None:
    """Red-team finding: a sender with a LF written into the spool from outside made
    `Return-Path: <evil\nX-Injected: yes>`. The spool sets such messages aside; the
    writer refuses on its own as well, and defers saying why."""
    message = QueuedMessage(MessageId("M1"), sender, b"Subject: hi\r\n\r\nbody\r\n", 0.0, False)
    d = MaildirDeliverer(str(tmp_path), resolve_mailbox=lambda a: mailbox)
    (result,) = d.deliver(message, ["alice@local.example"])
    assert result.outcome is Outcome.DEFERRED
    assert result.reply.startswith("451 4.3.0 Refused to write a control character into")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


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


def test_a_mailbox_removed_while_cached_is_opened_afresh(tmp_path: Path) -> None:
    """The writer keeps a Maildir's directories open; an administrator who removes the
    Maildir meanwhile gets it made again by the next delivery, not a deferral."""
    d = deliverer(tmp_path)
    assert d.deliver(MESSAGE, ["alice@local.example"])[0].outcome is Outcome.DELIVERED
    box = tmp_path / "local.example" / "alice"
    shutil.rmtree(box)
    assert d.deliver(MESSAGE, ["alice@local.example"])[0].outcome is Outcome.DELIVERED
    assert len(list((box / "new").iterdir())) == 1
    assert list((box / "tmp").iterdir()) == []


def _cached_pages(path: Path) -> int:
    """How many of the file's pages are in the page cache (mincore(2) on a mapping of
    it, which reads nothing: a read would bring them back)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with path.open("rb") as file, mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY) as view:
        address = ctypes.addressof(ctypes.c_char.from_buffer(view))
        residency = ctypes.create_string_buffer(pages)
        assert libc.mincore(address, size, residency) == 0, os.strerror(ctypes.get_errno())
        return sum(byte & 1 for byte in residency.raw)


def _drops_pages(directory: Path) -> bool:
    """Whether this file system lets fsynced pages go on advice (tmpfs keeps them)."""
    probe = directory / "probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"x" * 65536)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    try:
        return _cached_pages(probe) == 0
    finally:
        probe.unlink()


@pytest.fixture
def dropping_directory(tmp_path: Path) -> Iterator[Path]:
    """A directory on a file system that lets pages go on advice: tmp_path, or, where
    that is a tmpfs (which keeps them), a directory beside the checkout."""
    if _drops_pages(tmp_path):
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parents[2]) as beside:
        if not _drops_pages(Path(beside)):
            pytest.skip("no file system here lets fsynced pages go on advice (tmpfs)")
        yield Path(beside)


def test_a_delivered_file_leaves_the_page_cache_once_it_is_fsynced(
    dropping_directory: Path,
) -> None:
    """A burst of large deliveries must not fill memory with mail an IMAP server reads
    later, if at all (and on a VM that hands freed memory back to its host, each page
    taken afresh cost 300-340 µs of CPU per 100 KiB file instead of 120-130). Both places
    a file is written: `write_files`, and `after_writes` (the Maildir removed between
    the cache's check and the write)."""
    root = dropping_directory
    body = b"x" * 78 * 4096
    large = QueuedMessage(
        MessageId("M2"), "bob@remote.example", b"Subject: big\r\n\r\n" + body + b"\r\n", 0.0, False
    )
    new = root / "local.example" / "alice" / "new"
    removals = 0

    def run_all(works: Sequence[Callable[[], None]]) -> None:
        nonlocal removals
        if removals == 1:  # after the cache's check: the files' creation fails
            shutil.rmtree(new.parent)
            removals = 2
        for work in works:
            work()

    d = MaildirDeliverer(str(root), resolve_mailbox=str.lower, run_parallel=run_all)
    assert d.deliver(large, ["alice@local.example"])[0].outcome is Outcome.DELIVERED
    (first,) = list(new.iterdir())
    assert _cached_pages(first) == 0
    assert first.read_bytes().endswith(body + b"\n")  # all there, read from the disk
    removals = 1
    assert d.deliver(large, ["alice@local.example"])[0].outcome is Outcome.DELIVERED
    (second,) = list(new.iterdir())
    assert second.name != first.name
    assert _cached_pages(second) == 0


def test_a_platform_without_page_cache_advice_delivers_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red team helper-73: without `os.posix_fadvise` (macOS) the AttributeError left
    the fsynced file in tmp/ and the message undelivered."""
    monkeypatch.delattr(os, "posix_fadvise")
    (result,) = deliverer(tmp_path).deliver(MESSAGE, ["alice@local.example"])
    assert result.outcome is Outcome.DELIVERED
    box = tmp_path / "local.example" / "alice"
    assert len(list((box / "new").iterdir())) == 1
    assert list((box / "tmp").iterdir()) == []


def test_a_cached_mailbox_whose_new_directory_was_recreated_gets_its_mail(
    tmp_path: Path,
) -> None:
    """new/ removed and made again while its old descriptor is cached: the next
    delivery links into the new one (it was deferred forever: link() said ENOENT)."""
    d = deliverer(tmp_path)
    assert d.deliver(MESSAGE, ["alice@local.example"])[0].outcome is Outcome.DELIVERED
    new = tmp_path / "local.example" / "alice" / "new"
    shutil.rmtree(new)
    new.mkdir()
    assert d.deliver(MESSAGE, ["alice@local.example"])[0].outcome is Outcome.DELIVERED
    assert len(list(new.iterdir())) == 1


def test_a_cached_mailbox_moved_away_is_not_written_to_any_more(tmp_path: Path) -> None:
    """An administrator archives a Maildir (rename) and makes a fresh one: new mail goes
    to the fresh one at the path, not into the archive through the cached descriptors."""
    d = deliverer(tmp_path)
    assert d.deliver(MESSAGE, ["alice@local.example"])[0].outcome is Outcome.DELIVERED
    box = tmp_path / "local.example" / "alice"
    box.rename(tmp_path / "local.example" / "alice.archive")
    assert d.deliver(MESSAGE, ["alice@local.example"])[0].outcome is Outcome.DELIVERED
    assert len(list((box / "new").iterdir())) == 1
    assert len(list((tmp_path / "local.example" / "alice.archive" / "new").iterdir())) == 1


# -- nothing left behind --------------------------------------------------------------------


def test_a_full_disk_defers_and_leaves_no_partial_file_in_tmp(small_disk: Path) -> None:
    """D-18, item 9: ENOSPC half-way through the file. The recipient is deferred, its
    partial file is gone from tmp/ (the space comes back: a small message fits again)."""
    d = deliverer(small_disk)
    big = QueuedMessage(MessageId("M2"), "bob@remote.example", b"x" * (2 << 20), 0.0, False)
    (result,) = d.deliver(big, ["alice@local.example"])
    assert (result.outcome, result.status) == (Outcome.DEFERRED, "4.3.0")
    assert "ENOSPC" in result.reply
    box = small_disk / "local.example" / "alice"
    assert list((box / "tmp").iterdir()) == []
    assert list((box / "new").iterdir()) == []
    (result,) = d.deliver(MESSAGE, ["alice@local.example"])
    assert result.outcome is Outcome.DELIVERED
    d.close()


def old_file(path: Path, age_hours: float, now: float) -> Path:
    path.write_bytes(b"partial")
    os.utime(path, (now - age_hours * 3600, now - age_hours * 3600))
    return path


def test_clean_tmp_removes_files_left_in_tmp_for_36_hours(tmp_path: Path) -> None:
    """maildir(5): older than 36 h is stale; younger may still be being written."""
    d = deliverer(tmp_path)
    d.deliver(MESSAGE, ["alice@local.example", "bob@other.example"])
    now = time.time() + 7 * 86400  # an injected "now", a week ahead
    alice, bob = tmp_path / "local.example" / "alice", tmp_path / "other.example" / "bob"
    stale = [old_file(alice / "tmp" / "1.stale", 37, now), old_file(bob / "tmp" / "2", 37, now)]
    young = old_file(alice / "tmp" / "3.young", 35, now)
    delivered = list((alice / "new").iterdir())  # older than 36 h at `now`, but in new/
    assert d.clean_tmp(now) == 2
    assert not any(path.exists() for path in stale)
    assert young.exists() and list((alice / "new").iterdir()) == delivered
    assert d.clean_tmp(now) == 0


def test_clean_tmp_never_follows_a_symlink(tmp_path: Path) -> None:
    """S-05: a tmp/ (or a mailbox) swapped for a symlink is skipped, never emptied."""
    now = time.time() + 7 * 86400
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    precious = old_file(elsewhere / "precious", 100, now)
    box = tmp_path / "root" / "local.example" / "alice"
    box.mkdir(parents=True)
    (box / "tmp").symlink_to(elsewhere)
    (tmp_path / "root" / "local.example" / "bob").symlink_to(box)
    assert deliverer(tmp_path / "root").clean_tmp(now) == 0
    assert precious.exists()


def test_clean_tmp_does_bounded_work_per_call(tmp_path: Path) -> None:
    now = time.time() + 7 * 86400
    for n in range(5):
        tmp = tmp_path / "local.example" / f"user{n}" / "tmp"
        tmp.mkdir(parents=True)
        old_file(tmp / "stale", 40, now)
    d = deliverer(tmp_path)
    assert [d.clean_tmp(now, max_mailboxes=2) for _ in range(4)] == [2, 2, 1, 0]
    assert list(tmp_path.glob("*/*/tmp/*")) == []


class RecordingFsync:
    """A real fsync that notes which path each descriptor stands for."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def __call__(self, fd: int) -> None:
        self.paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        os.fsync(fd)


def test_new_directories_are_fsynced_into_their_parents(tmp_path: Path) -> None:
    """A directory entry is durable only once its parent is fsynced: the first delivery
    to a new mailbox fsyncs the root (for the domain), the domain (for the mailbox) and
    the mailbox (for tmp, new, cur); later deliveries only the file and new/."""
    fsync = RecordingFsync()
    root = tmp_path / "mail"
    d = MaildirDeliverer(str(root), resolve_mailbox=str.lower, fsync=fsync)
    d.deliver(MESSAGE, ["alice@local.example"])
    box = root / "local.example" / "alice"
    (file,) = (box / "new").iterdir()
    tmp_file = str(box / "tmp" / file.name) + " (deleted)"
    directories = [path for path in fsync.paths if path != tmp_file]
    assert directories[:3] == [str(tmp_path), str(root), str(root / "local.example")]
    assert directories.count(str(box)) == 3  # after cur, tmp and new were made
    assert directories[-1] == str(box / "new")
    fsync.paths.clear()
    d.deliver(MESSAGE, ["alice@local.example"])
    assert [p for p in fsync.paths if not p.startswith(str(box / "tmp"))] == [str(box / "new")]


def test_mode_and_group_apply_to_everything_created(tmp_path: Path) -> None:
    """maildir.mode "0640" and maildir.group: files 0640, directories 0750 (the root
    gsmtp makes too, and every directory it makes on the way to the root: with
    `root = "top/mail"` a "top" left 0700 would keep the group out), all in the group;
    under the server's umask 077."""
    # A group other than the process's own, so that the chown shows.
    others = [g for g in os.getgroups() if g != os.getgid()]
    group = 65534 if os.geteuid() == 0 else (others[0] if others else None)
    if group is None:
        pytest.skip("this user belongs to no second group to give the files")
    root = tmp_path / "top" / "mail"
    previous = os.umask(0o077)
    try:
        writer = MaildirDeliverer(
            str(root),
            resolve_mailbox=str.lower,
            permissions=Permissions(0o640, group),
        )
        (result,) = writer.deliver(MESSAGE, ["alice@local.example"])
    finally:
        os.umask(previous)
    assert result.outcome is Outcome.DELIVERED
    box = root / "local.example" / "alice"
    (file,) = list((box / "new").iterdir())
    assert stat.S_IMODE(file.stat().st_mode) == 0o640
    assert file.stat().st_gid == group
    made = (root.parent, root, root / "local.example", box, box / "new", box / "tmp", box / "cur")
    for directory in made:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o750, directory
        assert directory.stat().st_gid == group, directory


def test_directory_modes_follow_the_file_mode() -> None:
    assert Permissions().directory_mode == 0o700
    assert Permissions(0o640).directory_mode == 0o750
    assert Permissions(0o644).directory_mode == 0o755


# -- batches ---------------------------------------------------------------------------


class CountingFsync:
    """A real fsync that counts the new/ directories it syncs, and fails (EIO) for
    files whose content holds `poison` or for the new/ of `bad_box`."""

    def __init__(self, poison: bytes = b"\x00never", bad_box: str = "\x00never") -> None:
        self.directories: list[str] = []
        self.poison = poison
        self.bad_box = bad_box

    def __call__(self, fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            if path.endswith("/new"):
                self.directories.append(path)
                if f"/{self.bad_box}/" in path + "/":
                    raise OSError(5, "injected directory fsync failure")
        elif self.poison in Path(path).read_bytes():
            raise OSError(5, "injected file fsync failure")
        os.fsync(fd)


def threaded(fsync: CountingFsync, root: Path, max_batch: int = 256) -> MaildirDeliverer:
    """As the server runs it: file work on a thread, fsyncs on four more, so that the
    deliveries that arrive while a batch is on the disk wait for the next one."""
    files, syncs = ThreadPool(1), ThreadPool(4)

    def in_parallel(works: Sequence[Callable[[], None]]) -> None:
        for result in [syncs.spawn(work) for work in works]:
            result.get()

    return MaildirDeliverer(
        str(root),
        resolve_mailbox=str.lower,
        run_blocking=lambda work: files.apply(work),
        run_parallel=in_parallel,
        fsync_threads=4,
        max_batch=max_batch,
        fsync=fsync,
    )


def message(number: int) -> QueuedMessage:
    body = f"Subject: n{number}\r\n\r\nbody {number}\r\n".encode()
    return QueuedMessage(MessageId(f"M{number}"), "bob@remote.example", body, 0.0, False)


def deliver_concurrently(d: MaildirDeliverer, count: int, boxes: int) -> list[Outcome]:
    greenlets = [
        gevent.spawn(d.deliver, message(n), [f"user{n % boxes}@local.example"])
        for n in range(count)
    ]
    gevent.joinall(greenlets, raise_error=True, timeout=30)
    return [g.value[0].outcome for g in greenlets]


def test_a_small_batch_is_one_hand_off_and_a_large_one_is_spread(tmp_path: Path) -> None:
    """Each piece of a batch's fsyncs wakes a pool thread; a piece takes at least
    FSYNC_PIECE_MIN files (or new/ directories), so a small batch is one hand-off and
    a large one is spread over every fsync thread, each file and directory once."""
    handed: list[int] = []
    fsync = CountingFsync()
    syncs = ThreadPool(4)

    def in_parallel(works: Sequence[Callable[[], None]]) -> None:
        handed.append(len(works))
        for result in [syncs.spawn(work) for work in works]:
            result.get()

    d = MaildirDeliverer(
        str(tmp_path),
        resolve_mailbox=str.lower,
        run_parallel=in_parallel,
        fsync_threads=4,
        fsync=fsync,
    )
    small = [f"s{n}@local.example" for n in range(FSYNC_PIECE_MIN - 1)]
    assert [r.outcome for r in d.deliver(message(1), small)] == [Outcome.DELIVERED] * 3
    assert handed == [1, 1]  # the files, then the new/ directories
    handed.clear()
    large = [f"l{n}@local.example" for n in range(20)]
    assert [r.outcome for r in d.deliver(message(2), large)] == [Outcome.DELIVERED] * 20
    assert handed == [4, 4]  # 20 files and 20 new/: four threads, five each
    assert len(fsync.directories) == 23 and len(set(fsync.directories)) == 23
    assert len(list(tmp_path.glob("local.example/*/new/*"))) == 23


def test_concurrent_deliveries_share_batches_and_one_fsync_per_new(tmp_path: Path) -> None:
    """40 deliveries at once into 4 mailboxes: the first runs alone, the 39 that arrive
    meanwhile form the next batch, which fsyncs each new/ once, not once per file."""
    fsync = CountingFsync()
    outcomes = deliver_concurrently(threaded(fsync, tmp_path), 40, 4)
    assert outcomes == [Outcome.DELIVERED] * 40
    files = sorted(tmp_path.glob("local.example/*/new/*"))
    assert len(files) == 40 and not list(tmp_path.glob("local.example/*/tmp/*"))
    bodies = sorted(f.read_bytes().rsplit(b"body ", 1)[1] for f in files)
    assert bodies == sorted(f"{n}\n".encode() for n in range(40))
    assert len(fsync.directories) <= 8  # 1 + 4 here; 40 without batches


def test_the_next_batch_is_written_while_the_last_one_fsyncs_its_directories(
    tmp_path: Path,
) -> None:
    """Batches overlap: once a batch's files are linked, the next one creates, writes
    and fsyncs its files while the first fsyncs its new/ directories."""
    overlapped = threading.Event()
    in_directory_sync = threading.Event()
    waited: list[bool] = []

    class Overlapping(CountingFsync):
        def __call__(self, fd: int) -> None:
            new = os.readlink(f"/proc/self/fd/{fd}").endswith("/new")
            if new and not in_directory_sync.is_set():
                in_directory_sync.set()  # the first batch's: wait for the next one's files
                waited.append(overlapped.wait(timeout=10))
            elif in_directory_sync.is_set() and not stat.S_ISDIR(os.fstat(fd).st_mode):
                overlapped.set()
            super().__call__(fd)

    assert (
        deliver_concurrently(threaded(Overlapping(), tmp_path), 10, 2) == [Outcome.DELIVERED] * 10
    )
    assert waited == [True]  # the next batch's files were fsynced meanwhile


def test_batches_are_bounded(tmp_path: Path) -> None:
    fsync = CountingFsync()
    outcomes = deliver_concurrently(threaded(fsync, tmp_path, max_batch=5), 21, 1)
    assert outcomes == [Outcome.DELIVERED] * 21
    assert len(fsync.directories) == 5  # batches of 1, 5, 5, 5, 5


def test_a_failed_file_fsync_defers_only_its_recipient(tmp_path: Path) -> None:
    fsync = CountingFsync(poison=b"body 7\n")
    outcomes = deliver_concurrently(threaded(fsync, tmp_path), 20, 2)
    assert outcomes == [Outcome.DEFERRED if n == 7 else Outcome.DELIVERED for n in range(20)]
    files = list(tmp_path.glob("local.example/*/new/*"))
    assert len(files) == 19 and not any(b"body 7\n" in f.read_bytes() for f in files)
    assert not list(tmp_path.glob("local.example/*/tmp/*"))  # no partial file left


def test_a_failed_directory_fsync_defers_the_recipients_linked_into_it(tmp_path: Path) -> None:
    """Delivered means the file AND its new/ entry are durable: if the fsync of user1's
    new/ fails, its recipients are deferred (a copy may come twice, never lost); the
    other mailbox of the same batch is unaffected."""
    fsync = CountingFsync(bad_box="user1")
    outcomes = deliver_concurrently(threaded(fsync, tmp_path), 20, 2)
    assert outcomes == [Outcome.DEFERRED if n % 2 else Outcome.DELIVERED for n in range(20)]


@pytest.mark.parametrize("cut", [-2, -1, 0, 1])
def test_a_large_body_is_written_in_pieces_with_every_crlf_made_lf(
    tmp_path: Path, cut: int
) -> None:
    """A body over WRITE_PIECE is converted and written piece by piece (so a delivery
    does not hold two more copies of it); a CRLF at any place around a piece's end
    (cut 0: its CR is the piece's last byte) still becomes one LF, and a planted
    Delivered-To is still left out."""
    planted = b"Delivered-To: planted@example.com\r\n"
    kept = b"Subject: big\r\n\r\n"
    filler = b"y" * (WRITE_PIECE - len(kept) + cut - 1) + b"\r\n"
    rest = kept + filler + b"x" * 98 + b"\r\n" + b"z" * (WRITE_PIECE + 5) + b"\r\nlast\r\n"
    assert rest[WRITE_PIECE + cut - 1 : WRITE_PIECE + cut + 1] == b"\r\n"
    target = tmp_path / "file"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        write_content(fd, b"Return-Path: <a@b.example>\n", planted + rest)
    finally:
        os.close(fd)
    assert target.read_bytes() == b"Return-Path: <a@b.example>\n" + rest.replace(b"\r\n", b"\n")


def _open_descriptors() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


class _HeldFsync:
    """An fsync that, once `hold` is set, stops in the first call until `release`: a
    step caught running on its thread."""

    def __init__(self) -> None:
        self.hold = False
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, fd: int) -> None:
        if self.hold:
            self.entered.set()
            self.release.wait(10)
        os.fsync(fd)


def _writer_with_a_job(root: Path, fsync: _HeldFsync) -> tuple[MaildirWriter, FileJob]:
    writer = MaildirWriter(str(root), fsync=fsync)
    job = FileJob("example.org", "bob", b"Delivered-To: bob@example.org\n", b"hi\r\n")
    writer.open_mailboxes([job])
    assert job.error is None and job.mailbox is not None
    fsync.hold = True
    return writer, job


def test_close_leaves_the_descriptors_of_a_step_still_running_on_a_thread_to_that_step(
    tmp_path: Path,
) -> None:
    """At stop, a delivery's greenlet is killed but its thread runs on: closing the
    Maildir descriptors under it would let their numbers be reused while it still
    creates and links files relative to them."""
    before = _open_descriptors()
    fsync = _HeldFsync()
    writer, job = _writer_with_a_job(tmp_path, fsync)
    assert job.mailbox is not None
    step = threading.Thread(target=writer.write_files, args=([job],))
    step.start()
    try:
        assert fsync.entered.wait(10)
        writer.close()
        os.fstat(job.mailbox.tmp)  # still open: the running step may use them
        os.fstat(job.mailbox.new)
        with pytest.raises(WriterClosed, match="closed"):
            writer.link([job])  # no step starts once closing
    finally:
        fsync.release.set()
        step.join(10)
    assert job.error is None  # the running step finished its work
    os.close(job.fd)  # its file, which link would have closed
    assert _open_descriptors() == before  # the last step closed the writer's descriptors


def test_close_with_no_step_running_closes_at_once(tmp_path: Path) -> None:
    before = _open_descriptors()
    writer = MaildirWriter(str(tmp_path))
    job = FileJob("example.org", "bob", b"Delivered-To: bob@example.org\n", b"hi\r\n")
    writer.open_mailboxes([job])
    writer.write_files([job])
    writer.link([job])
    assert _open_descriptors() != before
    writer.close()
    assert _open_descriptors() == before
    assert (tmp_path / "example.org" / "bob" / "new" / job.name).read_bytes() == (
        b"Delivered-To: bob@example.org\nhi\n"
    )


def test_a_second_close_while_the_last_step_closes_closes_nothing_again(tmp_path: Path) -> None:
    """Two close() calls, the second while the last running step is closing the
    descriptors: they are closed once (their numbers may be another file's by then)."""
    closing, finish = threading.Event(), threading.Event()
    fsync = _HeldFsync()
    writer, job = _writer_with_a_job(tmp_path, fsync)
    calls = []
    close_all = writer._close_all

    def slow_close_all() -> None:
        calls.append(threading.current_thread().name)
        closing.set()
        finish.wait(10)
        close_all()

    writer._close_all = slow_close_all  # type: ignore[method-assign]
    step = threading.Thread(target=writer.write_files, args=([job],), name="step")
    step.start()
    try:
        assert fsync.entered.wait(10)
        writer.close()  # deferred: the step runs
        fsync.release.set()
        assert closing.wait(10)  # the step is closing the descriptors now
        writer.close()  # and must not close them again
        writer.close()
    finally:
        fsync.release.set()
        finish.set()
        step.join(10)
    assert calls == ["step"]
    os.close(job.fd)


def test_a_delivery_after_close_is_deferred_with_its_reason_not_raised(tmp_path: Path) -> None:
    """A delivery still running when the server stops (its grace ran out) gets a
    temporary failure naming why, not an exception: it is delivered after the restart."""
    d = deliverer(tmp_path)
    d.close()
    results = d.deliver(MESSAGE, ["jones@foo.com"])
    assert [(r.outcome, r.reply) for r in results] == [
        (Outcome.DEFERRED, "451 4.3.0 Maildir write failed: ESHUTDOWN")
    ]
    assert not (tmp_path / "foo.com" / "jones" / "new").exists()


def test_a_mail_root_moved_away_is_not_written_into_any_more(tmp_path: Path) -> None:
    """The open root is checked once a batch: mail goes to `maildir.root`, not into the
    tree an operator moved away (found by a red-team helper: it went on until a restart)."""
    root = tmp_path / "mail"
    d = deliverer(root)
    (first,) = d.deliver(MESSAGE, ["alice@local.example"])
    root.rename(tmp_path / "mail.old")
    (second,) = d.deliver(MESSAGE, ["alice@local.example"])
    assert first.outcome is second.outcome is Outcome.DELIVERED
    assert len(list((tmp_path / "mail.old" / "local.example" / "alice" / "new").iterdir())) == 1
    assert len(list((root / "local.example" / "alice" / "new").iterdir())) == 1


def test_a_mail_root_removed_is_made_again_not_failed_until_a_restart(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    d = deliverer(root)
    d.deliver(MESSAGE, ["alice@local.example"])
    shutil.rmtree(root)
    (result,) = d.deliver(MESSAGE, ["alice@local.example"])
    assert (result.outcome, result.reply) == (Outcome.DELIVERED, "250 2.0.0 Delivered to Maildir")
    assert len(list((root / "local.example" / "alice" / "new").iterdir())) == 1


def test_mailboxes_dropped_from_the_cache_close_while_other_directories_are_fsynced(
    tmp_path: Path,
) -> None:
    """Batches overlap: the next one starts while the last fsyncs its new/ directories.
    Retired mailboxes were kept open while any batch was syncing, which under a steady
    drain was always: 500 mailboxes (1,000 descriptors) stayed open and deliveries
    failed with EMFILE. Only a mailbox whose new/ is being fsynced stays open now."""
    before = _open_descriptors()
    writer = MaildirWriter(str(tmp_path), cached_mailboxes=2)
    first = [FileJob("example.org", f"u{n}", b"", b"x\r\n") for n in range(10)]
    writer.open_mailboxes(first)
    syncing = first[0].mailbox
    assert syncing is not None
    writer.syncing[syncing.new] += 1  # a batch still fsyncs this new/
    second = [FileJob("example.org", f"v{n}", b"", b"x\r\n") for n in range(10)]
    writer.open_mailboxes(second)  # eight of the first ten leave the cache: seven close
    # The two cached, the ten of this batch and the one still syncing (two descriptors
    # each), and the root; keeping every retired one open made it 41.
    assert len(_open_descriptors() - before) == 2 * (2 + 10 + 1) + 1
    writer.syncing[syncing.new] -= 1
    writer.open_mailboxes([FileJob("example.org", "w", b"", b"x\r\n")])
    assert len(_open_descriptors() - before) == 2 * (2 + 1) + 1
    writer.close()
    assert _open_descriptors() == before
