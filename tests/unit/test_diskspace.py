"""The free-space reserve: measured with statvfs (faked here), cached, asked at MAIL;
and which free spool pages go back to the file system."""

from __future__ import annotations

from pathlib import Path

from gsmtp.diskspace import FreePages, SpaceReserve, spool_free_space
from tests.unit.session_driver import SessionWire

MB = 1024 * 1024


class FakeDisk:
    def __init__(self, free: int) -> None:
        self.free = free
        self.calls = 0

    def measure(self, path: str) -> int:
        self.calls += 1
        return self.free


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def reserve(disk: FakeDisk, clock: FakeClock, size: int = 70 * MB) -> SpaceReserve:
    return SpaceReserve("/var/spool/spool.sqlite", size, clock=clock, measure=disk.measure)


def test_below_the_reserve_there_is_no_room() -> None:
    disk, clock = FakeDisk(100 * MB), FakeClock()
    space = reserve(disk, clock)
    assert space.has_room(None)
    assert space.has_room(30 * MB)
    assert not space.has_room(30 * MB + 4096), "SIZE= larger than free minus the reserve"
    disk.free = 69 * MB
    clock.now += 1
    assert not space.has_room(None)
    assert not space.has_room(1)


def test_a_refused_size_is_remembered_for_a_while() -> None:
    """The vacuum asks: a MAIL refused for its SIZE= alone means the disk is short for
    that mail, though MAIL without SIZE= is still accepted."""
    disk, clock = FakeDisk(100 * MB), FakeClock()
    space = reserve(disk, clock)
    assert space.has_room(None) and not space.refused_within(10.0)
    assert not space.has_room(40 * MB)
    clock.now += 10.0
    assert space.refused_within(10.0)
    clock.now += 0.5
    assert space.has_room(None) and not space.refused_within(10.0)


def test_free_space_is_measured_at_most_once_a_second() -> None:
    disk, clock = FakeDisk(100 * MB), FakeClock()
    space = reserve(disk, clock)
    for _ in range(50):
        space.has_room(None)
    assert disk.calls == 1
    disk.free = 10 * MB
    clock.now += 0.5
    assert space.has_room(None), "cached"
    clock.now += 0.5
    assert not space.has_room(None)
    assert disk.calls == 2


def test_a_reserve_of_zero_is_off() -> None:
    disk, clock = FakeDisk(0), FakeClock()
    space = reserve(disk, clock, size=0)
    assert space.has_room(10**12)
    assert disk.calls == 0


def test_mail_gets_452_4_3_1_from_the_session_when_there_is_no_room() -> None:
    """The session asks (MailFrom event) and answers what the shell decided; RCPT after
    a refused MAIL is out of sequence."""
    disk, clock = FakeDisk(100 * MB), FakeClock()
    space = reserve(disk, clock)
    wire = SessionWire(greeted=True, has_room=space.has_room)
    wire.send(b"EHLO c.example\r\n")
    wire.read_reply()
    wire.send(b"MAIL FROM:<bob@remote.example> SIZE=31500000\r\n")
    assert wire.read_reply() == ["452 4.3.1 Insufficient system storage"]
    wire.send(b"RCPT TO:<jones@foo.com>\r\n")
    assert wire.read_reply()[0].startswith("503 5.5.1")
    wire.send(b"MAIL FROM:<bob@remote.example> SIZE=1000\r\n")
    assert wire.read_reply() == ["250 2.1.0 Sender ok"]
    disk.free = 60 * MB
    clock.now += 1
    wire.send(b"RSET\r\nMAIL FROM:<bob@remote.example>\r\n")
    assert wire.read_reply()[0].startswith("250")
    assert wire.read_reply() == ["452 4.3.1 Insufficient system storage"]


def test_what_was_stored_since_the_last_measurement_counts_at_once() -> None:
    """A burst of large messages inside one cached second cannot run past the reserve."""
    disk, clock = FakeDisk(100 * MB), FakeClock()
    space = reserve(disk, clock)
    assert space.has_room(None)
    space.spend(5 * MB)  # counted twice: in the WAL now, in the database later
    assert space.has_room(20 * MB)
    assert not space.has_room(20 * MB + 1)
    space.spend(10 * MB + 1)
    assert not space.has_room(None)
    disk.free = 95 * MB  # the delivery of the first two made room meanwhile
    clock.now += 1
    assert space.has_room(None)
    assert disk.calls == 2


def test_the_wal_counts_as_used(tmp_path: Path) -> None:
    """Its frames are copied into the database at the next checkpoint: until then a
    message takes its room twice."""
    spool = tmp_path / "spool.sqlite"
    spool.write_bytes(b"")
    without_wal = spool_free_space(str(spool))
    Path(f"{spool}-wal").write_bytes(b"x" * 4 * MB)
    assert without_wal - spool_free_space(str(spool)) >= 4 * MB


def free_pages_policy(clock: FakeClock) -> FreePages:
    return FreePages(window=10.0, minimum=2048, slack=1024, step=4096, clock=clock)


def rounds(policy: FreePages, clock: FakeClock, free: list[int]) -> list[int]:
    """One round a second with these free counts; what each gave back."""
    given = []
    for pages in free:
        clock.now += 1.0
        given.append(policy.to_give_back(pages))
    return given


def test_pages_free_only_between_bursts_are_not_given_back() -> None:
    """Under a steady load the pages freed by delivered mail are written into again a
    moment later: giving them back would move and rewrite the queued messages and grow
    the file again. A dip in the window means they were needed."""
    clock = FakeClock()
    policy = free_pages_policy(clock)
    free = [6000, 9000, 500, 7000, 8000, 9000, 300, 8000, 9000, 6000] * 3
    assert rounds(policy, clock, free) == [0] * len(free)


def test_pages_that_stayed_free_for_the_window_go_back_a_step_at_a_time() -> None:
    clock = FakeClock()
    policy = free_pages_policy(clock)
    given = rounds(policy, clock, [9000] * 9)
    assert given == [0] * 9  # not watched for a whole window yet
    assert rounds(policy, clock, [9000]) == [4096]  # at most a step
    policy.given_back(4096)
    assert rounds(policy, clock, [4904]) == [4904 - 1024]  # the slack stays
    policy.given_back(4904 - 1024)
    assert rounds(policy, clock, [1024] * 12) == [0] * 12


def test_after_a_burst_the_space_comes_back_one_window_later() -> None:
    clock = FakeClock()
    policy = free_pages_policy(clock)
    assert rounds(policy, clock, [100, 5000, 200, 6000, 300]) == [0] * 5  # the load
    given = rounds(policy, clock, [8000] * 11)  # the queue has drained
    assert given == [0] * 10 + [4096]  # the last low count was 10 s before


def test_a_short_disk_gets_every_free_page_back_at_once() -> None:
    """Refusing mail, or recovering from a full disk: the space is needed now."""
    clock = FakeClock()
    policy = free_pages_policy(clock)
    clock.now += 1.0
    assert policy.to_give_back(3000, urgent=True) == 3000 - 1024
    assert policy.to_give_back(1500, urgent=True) == 0  # below the minimum
