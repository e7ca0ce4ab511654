"""A real IMAP server reads what gsmtp delivered: Dovecot (Debian's dovecot-imapd) on a
loopback port, its mail processes running as `nobody`, reading gsmtp's Maildirs through
maildir.group ("nogroup") and maildir.mode ("0640")."""

from __future__ import annotations

import imaplib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.harness import GsmtpProcess, free_port, wait_for
from tests.integration.remote import send

DOVECOT = "/usr/sbin/dovecot"
PASSWORD = "imap-Secret-1"
NOBODY = 65534  # Debian's nobody:nogroup


class Dovecot:
    """dovecot -F with a throw-away configuration under `base` (nothing of the system's
    /etc/dovecot is read): IMAP without TLS on 127.0.0.1:`port`, users from a
    passwd-file, mail at maildir:<root>/<domain>/<local-part> (gsmtp's layout), indexes
    and control files in a directory of its own, since the Maildirs are read-only to it."""

    def __init__(self, base: Path, maildir_root: Path, users: list[str]) -> None:
        self.port = free_port()
        work = base / "dovecot"
        (work / "index").mkdir(parents=True)
        os.chown(work / "index", NOBODY, NOBODY)
        passwd = work / "passwd"
        passwd.write_text(
            "".join(
                f"{user}:{{PLAIN}}{PASSWORD}:{NOBODY}:{NOBODY}::{work}/index/{user}::\n"
                for user in users
            )
        )
        passwd.chmod(0o644)
        self.log_path = work / "dovecot.log"
        config = work / "dovecot.conf"
        config.write_text(
            f"""
protocols = imap
listen = 127.0.0.1
base_dir = {work}/run
state_dir = {work}/state
log_path = {self.log_path}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
first_valid_uid = {NOBODY}
first_valid_gid = {NOBODY}
mail_location = maildir:{maildir_root}/%d/%n:INDEX={work}/index/%u:CONTROL={work}/index/%u
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {passwd}
}}
"""
        )
        self.process = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_for(self._listening, timeout=20, what="Dovecot to listen")

    def _listening(self) -> bool:
        if self.process.poll() is not None:
            error = self.process.stderr.read().decode() if self.process.stderr else ""
            raise AssertionError(f"dovecot exited {self.process.returncode}: {error}{self.log()}")
        try:
            with imaplib.IMAP4("127.0.0.1", self.port, timeout=2) as probe:
                return "IMAP4REV1" in probe.capabilities
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


@pytest.fixture
def shared_base() -> Iterator[Path]:
    """A directory other users may pass through (pytest's own is 0700 to them)."""
    base = Path(tempfile.mkdtemp(prefix="gsmtp-dovecot-", dir="/tmp"))
    base.chmod(0o711)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def dovecot_setup(
    gsmtp_factory: Callable[..., GsmtpProcess], shared_base: Path
) -> Iterator[Callable[[str], tuple[GsmtpProcess, Dovecot, Path]]]:
    if os.geteuid() != 0:
        pytest.skip("Dovecot's mail processes run as another user (nobody): needs root")
    if not os.access(DOVECOT, os.X_OK):
        pytest.skip("Dovecot is not installed (Debian: apt-get install dovecot-imapd)")
    started: list[Dovecot] = []

    def make(mode: str) -> tuple[GsmtpProcess, Dovecot, Path]:
        root = shared_base / f"mail-{mode}"
        gsmtp = gsmtp_factory({"maildir": {"root": str(root), "group": "nogroup", "mode": mode}})
        dovecot = Dovecot(shared_base / mode, root, ["jones@foo.com"])
        started.append(dovecot)
        return gsmtp, dovecot, root

    yield make
    for dovecot in started:
        dovecot.stop()


def deliver(gsmtp: GsmtpProcess, root: Path, subject: str) -> Path:
    send(gsmtp, "someone@remote.example", ["jones@foo.com"], subject=subject)
    new = root / "foo.com" / "jones" / "new"
    (file,) = wait_for(lambda: new.is_dir() and list(new.iterdir()), what="the Maildir file")
    return file  # type: ignore[no-any-return]


def fetch_inbox(dovecot: Dovecot) -> list[bytes] | None:
    """Every message in jones's INBOX, over IMAP; None if Dovecot cannot open it."""
    with imaplib.IMAP4("127.0.0.1", dovecot.port, timeout=10) as imap:
        imap.login("jones@foo.com", PASSWORD)
        status, _ = imap.select("INBOX", readonly=True)
        if status != "OK":
            return None
        _, found = imap.search(None, "ALL")
        messages = []
        for number in found[0].split():
            _, data = imap.fetch(number, "(RFC822)")
            messages.append(data[0][1])  # type: ignore[index]
        return messages


def test_dovecot_fetches_what_gsmtp_delivered(
    dovecot_setup: Callable[[str], tuple[GsmtpProcess, Dovecot, Path]],
) -> None:
    gsmtp, dovecot, root = dovecot_setup("0640")
    file = deliver(gsmtp, root, "for-imap")
    assert file.stat().st_mode & 0o777 == 0o640 and file.stat().st_gid == NOBODY
    (message,) = wait_for(lambda: fetch_inbox(dovecot), what="the message over IMAP")
    assert b"Subject: for-imap" in message
    assert b"Delivered-To: jones@foo.com" in message
    assert b"\r\nbody\r\n" in message  # stored with LF, served with CRLF by Dovecot
    # The mail process really was not root: nobody owns what Dovecot wrote.
    index = Path(dovecot.log_path.parent / "index" / "jones@foo.com")
    assert index.is_dir() and {p.stat().st_uid for p in index.rglob("*")} == {NOBODY}


def test_with_the_default_mode_dovecot_cannot_read_the_mailbox(
    dovecot_setup: Callable[[str], tuple[GsmtpProcess, Dovecot, Path]],
) -> None:
    """The control for the test above: 0600/0700 (the defaults) keep other users out."""
    gsmtp, dovecot, root = dovecot_setup("0600")
    deliver(gsmtp, root, "private")
    assert fetch_inbox(dovecot) is None
    assert "Permission denied" in dovecot.log()
