"""The physical ceiling of local delivery on a file system: how many new Maildir files a
second it can make durable, with no server in the way.

    python -m bench.probe --dir /tmp/x --files 30000 [--mode fsync|syncfs] [--json]

Writes 1 KiB files into one Maildir (the issue's probe; `--mailboxes` spreads them), in
batches of 50: each file created in tmp/, written, (mode fsync) fsynced, linked into
new/ and unlinked from tmp/; then (fsync) one fsync of each new/ the batch touched, or
(syncfs) one syncfs(2) of the whole file system per batch. One thread, as a single
delivery process would; `bench.compare` runs it on the file system the peers' Maildirs
are on, beside their end-to-end cells.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path

_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _syncfs() -> object:
    libc = ctypes.CDLL(None, use_errno=True)

    def syncfs(fd: int) -> None:
        if libc.syncfs(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))

    return syncfs


def probe(
    directory: Path, files: int, *, mode: str = "fsync", mailboxes: int = 1, batch: int = 50
) -> dict[str, float | int | str]:
    """Make `files` durable Maildir files under `directory`; files/s and the counts."""
    syncfs = _syncfs() if mode == "syncfs" else None
    boxes = []
    for number in range(mailboxes):
        box = directory / f"box{number}"
        for sub in ("tmp", "new", "cur"):
            (box / sub).mkdir(parents=True, exist_ok=True)
        boxes.append((os.open(box / "tmp", _DIRECTORY), os.open(box / "new", _DIRECTORY)))
    content = b"x" * 1023 + b"\n"
    started = time.perf_counter()
    made = directory_syncs = 0
    try:
        while made < files:
            touched: set[int] = set()
            for number in range(made, min(files, made + batch)):
                tmp, new = boxes[number % mailboxes]
                name = f"{number}.probe"
                fd = os.open(name, _NEW_FILE, 0o600, dir_fd=tmp)
                try:
                    os.write(fd, content)
                    if syncfs is None:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                os.link(name, name, src_dir_fd=tmp, dst_dir_fd=new)
                os.unlink(name, dir_fd=tmp)
                touched.add(new)
            made = min(files, made + batch)
            if syncfs is None:
                for new in touched:
                    os.fsync(new)
                    directory_syncs += 1
            else:
                syncfs(boxes[0][1])  # type: ignore[operator]
                directory_syncs += 1
        elapsed = time.perf_counter() - started
    finally:
        for tmp, new in boxes:
            os.close(tmp)
            os.close(new)
    stored = sum(len(os.listdir(directory / f"box{n}" / "new")) for n in range(mailboxes))
    return {
        "mode": mode,
        "files": files,
        "stored": stored,
        "seconds": round(elapsed, 3),
        "files_per_s": round(files / elapsed, 1) if elapsed else 0.0,
        "syncs": directory_syncs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.probe", description=__doc__)
    parser.add_argument("--dir", type=Path, required=True, help="an empty directory to fill")
    parser.add_argument("--files", type=int, default=30000)
    parser.add_argument("--mode", choices=("fsync", "syncfs"), default="fsync")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--mailboxes", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = probe(args.dir, args.files, mode=args.mode, batch=args.batch, mailboxes=args.mailboxes)
    print(json.dumps(result) if args.json else result)
    return 0 if result["stored"] == args.files else 1


if __name__ == "__main__":
    sys.exit(main())
