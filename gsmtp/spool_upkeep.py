"""Keeping a serving spool's files in shape: the WAL moved into the database file (the
checkpoint), pages that stayed free given back to the file system (incremental
vacuum), and the way back from a full disk. Each is a housekeeping task of its worker
(gsmtp.app starts them); the work itself runs on the spool's threads, the reads on the
body reader, the writes through the writer, never on the event loop.
"""

from __future__ import annotations

from functools import partial

import apsw

from gsmtp import db, log
from gsmtp.diskspace import Ballast, FreePages, SpaceReserve
from gsmtp.spool import Spool, give_back_pages
from gsmtp.writer import GroupCommitter, ThreadReader

CHECKPOINT_SECONDS = 0.5
# The WAL starts again from its beginning once it holds RESTART_FRAMES frames (about
# 8 MB of 4 KiB pages, half of db.JOURNAL_SIZE_LIMIT) and a checkpoint on the reader
# thread has left at most LEFT_FRAMES of them: the writer then copies what is left
# itself (GroupCommitter.finish_checkpoint). Otherwise the WAL grows under steady
# writes to the auto-checkpoint size (about 200 MB), and every frame past the size
# limit goes to a block of the file that ext4 must allocate and zero first; restarted,
# the WAL is written over blocks it already has.
RESTART_FRAMES = 2048
LEFT_FRAMES = 1024
# Free pages go back to the file system once VACUUM_MIN_PAGES of them stayed free for
# VACUUM_WINDOW_SECONDS (some slack is kept for new mail; see diskspace.FreePages), at
# most VACUUM_MAX_PAGES per round so that the writer, which does it between client
# commits, is never held up for long.
VACUUM_SECONDS = 1.0
VACUUM_WINDOW_SECONDS = 10.0
VACUUM_MIN_PAGES = 2048
VACUUM_SLACK_PAGES = 1024
VACUUM_MAX_PAGES = 4096


class SpoolUpkeep:
    """The checkpoint and vacuum tasks of one worker's spool (see the module)."""

    def __init__(
        self,
        spool: Spool,
        *,
        writer: GroupCommitter,
        bodies: ThreadReader,
        ballast: Ballast,
        reserve: SpaceReserve,
    ) -> None:
        self._spool = spool
        self._writer = writer
        self._bodies = bodies
        self._ballast = ballast
        self._reserve = reserve
        self._free_pages = FreePages(
            window=VACUUM_WINDOW_SECONDS,
            minimum=VACUUM_MIN_PAGES,
            slack=VACUUM_SLACK_PAGES,
            step=VACUUM_MAX_PAGES,
        )
        self._log = log.get_logger(component="spool")

    def recovering(self) -> bool:
        """The spool is recovering from a full disk: a write failed with SQLITE_FULL,
        the ballast was given up for it, or parts of refused messages are still owed."""
        spool = self._spool
        return spool.disk_was_full or self._ballast.given_up or bool(spool.discards_owed)

    def checkpoint(self) -> None:
        """Move the WAL into the database on the reader thread, and have the writer
        finish the checkpoint when that lets a long WAL restart (RESTART_FRAMES). After
        a full disk (a write failed with SQLITE_FULL, the ballast was given up, parts
        are owed), also recover: discard the parts owed, cut the WAL to nothing (it may
        hold the whole disk: a WAL only restarts, it keeps its size) and take the
        ballast back once there is room. Each step is retried on the next round until
        it succeeds. A ballast that a start could not make (too little room) is no full
        disk: the WAL is not cut every round for it, the file is made once there is
        room."""
        spool = self._spool
        recovering = self.recovering()
        if spool.discards_owed:
            owed = len(spool.discards_owed)
            try:
                spool.retry_discards()
            except apsw.Error as error:
                if isinstance(error, apsw.FullError):
                    self._ballast.release()
                self._log.warning("body_parts_not_discarded", messages=owed, error=str(error))
            else:
                self._log.info("body_parts_discarded", messages=owed)
        try:
            frames, copied = self._bodies.checkpoint(truncate=recovering)
            if not recovering and frames >= RESTART_FRAMES and frames - copied <= LEFT_FRAMES:
                self._writer.finish_checkpoint()
        except apsw.Error as error:
            if isinstance(error, apsw.FullError):
                spool.disk_was_full = True  # recover (TRUNCATE) from the next round
                self._ballast.release()  # room for the database file to take the WAL
            self._log.warning("checkpoint_failed", error=str(error))
            return
        if not recovering:
            if self._ballast.released and self._ballast.restore() is None:
                self._log.info("spool_ballast_made", path=str(self._ballast.path))
            return
        if spool.discards_owed:
            return
        spool.disk_was_full = False
        if self._ballast.restore() is None:
            self._log.info("spool_space_recovered", ballast=str(self._ballast.path))

    def give_back_space(self) -> None:
        """Incremental vacuum through the writer (it is a write) of the pages that
        stayed free for a while, or at once when the disk is short (below the reserve,
        a MAIL refused for its SIZE= within the window, or recovering from a full
        disk); the count is read on the reader thread, off the event loop."""
        short = (
            not self._reserve.has_room(None)
            or self._reserve.refused_within(VACUUM_WINDOW_SECONDS)  # a SIZE= refused
            or self.recovering()
        )
        pages = self._free_pages.to_give_back(self._bodies.run(db.free_pages), urgent=short)
        if pages <= 0:
            return
        # In steps of their own (see give_back_pages): one transaction of 4096 pages
        # would spill most of them into the WAL, writing megabytes to free them.
        left = pages
        while left > 0:
            left = self._writer.submit(partial(give_back_pages, pages=left))
        self._free_pages.given_back(pages)
        self._log.info("spool_vacuumed", pages=pages, free_pages=self._bodies.run(db.free_pages))
