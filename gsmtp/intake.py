"""Message bodies while they arrive: one memory budget for all of them, and the writing of
a large one into the spool as it comes.

The session passes content on as it arrives (`SmtpSession.take_data`). A connection
keeps a body in memory while it is small; past SPOOL_THRESHOLD, or whenever the bodies
of all connections together are over `server.max_data_memory`, it writes what it holds
to the spool as a body part (`Spool.write_part`, group-committed with other work; the
message's own commit, whose fsync comes before the 250, follows it). The message row
comes last, with the rest of the body, so a message is stored whole or not at all.
The parts of one that is not (refused at its end, a spool error, the client gone, the
server stopped) are discarded by its connection, or at the next start if the server died
(`Spool.remove_orphan_parts`). Parts live in the spool database itself: on its file
system (so `spool.min_free` covers them), in its backups, and gone with their message.

Memory: each connection in DATA charges the budget with what it holds (content not yet
written, raw bytes, a part being written) and, before each read, with the most that
read may bring. A read is sized to the room left but never below MIN_READ, so nobody
waits for room (a wait would let slow clients that hold memory stall everyone else).
Over budget, a connection writes out what it holds once that is MIN_READ or more (not
after every small read: a trickling client must not turn each read into a part). So
the bodies in memory stay within max_data_memory plus, per connection in DATA, a read
(MIN_READ), less than MIN_READ of content and less than a line piece of raw bytes.

No sockets, no greenlets: the server's connections call in.
"""

from __future__ import annotations

from gsmtp.message import MessageId, SpooledContent
from gsmtp.spool import Spool

# Content a connection holds before it writes it out. Small messages (nearly all) stay
# in memory and are stored with their message in one statement, as before.
SPOOL_THRESHOLD = 256 * 1024
# A read in DATA always gets this much, however full the budget; over budget, content
# is written out once a connection holds this much.
MIN_READ = 16 * 1024


class DataMemory:
    """Bytes of message bodies in memory, all connections together, against a limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @property
    def exceeded(self) -> bool:
        """Over the limit: every connection writes out what it holds after its read."""
        return self.used > self.limit

    def read_size(self, wanted: int) -> int:
        """How much the next read of a connection in DATA may bring."""
        return max(MIN_READ, min(wanted, self.limit - self.used))

    def account(self) -> MemoryCharge:
        return MemoryCharge(self)


class MemoryCharge:
    """What one connection holds of the budget; set to 0 when it closes."""

    __slots__ = ("_memory", "held")

    def __init__(self, memory: DataMemory) -> None:
        self._memory = memory
        self.held = 0

    def set(self, held: int) -> None:
        self._memory.used += held - self.held
        self.held = held


class SpooledBody:
    """The parts of one message written so far, under the id the message will have.
    `failed`: a part could not be written; the message will be answered 451 and what
    was written is discarded."""

    def __init__(self, spool: Spool, message_id: MessageId) -> None:
        self._spool = spool
        self.message_id = message_id
        self.count = 0
        self.size = 0
        self.failed = False

    def write(self, content: bytes) -> None:
        """Write the next part (returns once committed; raises if it was not)."""
        self._spool.write_part(self.message_id, self.count, content)
        self.count += 1
        self.size += len(content)

    def content(self) -> SpooledContent:
        """What was written, for the accept step (which adds the rest)."""
        return SpooledContent(self.count, self.size)

    def discard(self) -> None:
        """Drop what was written, unless the message was stored meanwhile (safe after
        any outcome of its commit, even one the server could not learn)."""
        self._spool.discard_parts(self.message_id)
