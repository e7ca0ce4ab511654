"""The descriptor limit raised at start, and the Maildir's share of it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gsmtp.delivery.maildir import DELIVERIES_AT_ONCE, MaildirDeliverer
from gsmtp.descriptors import maildir_shares

RAISE = (
    "import resource, sys\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2])))\n"
    "from gsmtp.descriptors import raise_limit\n"
    "print(raise_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
)


def raised(soft: int, hard: int) -> list[int]:
    output = subprocess.run(
        [sys.executable, "-c", RAISE, str(soft), str(hard)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [int(value) for value in output.split()]


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    """A login shell's 1,024 with a hard limit above it: the server takes the hard one."""
    assert raised(256, 4096) == [4096, 4096]


def test_a_low_hard_limit_is_worked_within() -> None:
    """`ulimit -n 1024` sets both limits: nothing to raise, the Maildir takes less."""
    assert raised(1024, 1024) == [1024, 1024]
    assert maildir_shares(1024, 256, 256) == (64, 32)


def test_a_generous_limit_leaves_the_maildir_its_full_batch() -> None:
    assert maildir_shares(65536, 256, 256) == (256, 256)
    assert maildir_shares(4, 256, 256) == (1, 1)


def test_the_local_lane_is_two_batches_of_the_maildir_it_feeds(tmp_path: Path) -> None:
    """Under a low limit the batch shrinks, and the local lane with it."""
    default = MaildirDeliverer(str(tmp_path), resolve_mailbox=lambda address: address)
    small = MaildirDeliverer(str(tmp_path), resolve_mailbox=lambda address: address, max_batch=64)
    assert default.deliveries_at_once == DELIVERIES_AT_ONCE == 512
    assert small.deliveries_at_once == 128
