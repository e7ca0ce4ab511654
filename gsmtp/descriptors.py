"""File descriptors: the limit a server starts with, raised where it may be, and the
Maildir's share of it.

A login shell on Debian starts programs with a soft limit of 1,024 descriptors and a
hard one of about a million; a server that keeps thousands of connections and a batch
of Maildir files open raises its soft limit to the hard one, as Go's runtime and most
servers do (the systemd unit sets LimitNOFILE=65536 anyway). Where the hard limit is
low too (`ulimit -n 1024`), the Maildir takes less: a batch of 256 files and 256 cached
mailboxes (two descriptors each) beside 100 clients ran out of descriptors, and 10,000
deliveries of 20,000 were deferred with EMFILE (red team, `ulimit -n 1024`).
"""

from __future__ import annotations

import resource

# Shares of the soft limit: the files one Maildir batch keeps open at once, and the
# mailboxes whose tmp/ and new/ stay open between batches (two descriptors each). At
# worst the Maildir holds a batch's files, the cached mailboxes, those the batch opened
# beyond them and those the batch before still fsyncs: B + 2 × (M + 2 B), three eighths
# of the limit, the rest for clients and the spool.
BATCH_SHARE = 16
MAILBOX_SHARE = 32


def raise_limit() -> int:
    """Raise the soft limit on open descriptors to the hard one; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass  # not allowed here (a container's own cap): work within the soft one
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def maildir_shares(limit: int, max_batch: int, max_mailboxes: int) -> tuple[int, int]:
    """Files per Maildir batch and cached mailboxes within `limit` descriptors."""
    return (
        max(1, min(max_batch, limit // BATCH_SHARE)),
        max(1, min(max_mailboxes, limit // MAILBOX_SHARE)),
    )
