"""One owner per output folder: an exclusive OS file lock that names its holder.

``fcntl.flock`` on a file inside the folder: the kernel releases it when the holding process
ends, however it ends (SIGKILL included), so a lock left by a killed run needs no cleanup — the
next run simply takes it. The file holds the owner's host, pid and start time for the message
that refuses a second owner; it is never deleted (deleting a lock file lets two processes lock
two different files of one name).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from flowbench.errors import FlowbenchError

LOCK_FILE = ".flowbench.lock"


def _owner(fd: int) -> dict | None:
    """The holder's record; its holder writes it just after locking, so an empty file is retried."""
    for _ in range(20):
        text = os.pread(fd, 4096, 0)
        try:
            return json.loads(text)
        except ValueError:
            time.sleep(0.05)
    return None


@contextlib.contextmanager
def exclusive_lock(folder: str | Path, what: str) -> Iterator[Path]:
    """Hold ``folder`` for this process while the block runs (``what``: e.g. 'flowbench train').

    A second holder, in this process or another, on this host or another one sharing the folder
    (NFS locks too), is refused at once with one FlowbenchError line naming the owner. Yields the
    lock file's path.
    """
    folder = Path(folder)
    path = folder / LOCK_FILE
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            who = (
                f"{owner['what']} (pid {owner['pid']} on {owner['host']}, since {owner['since']})"
                if owner
                else "another process"
            )
            raise FlowbenchError(
                f"{folder} is in use by {who}: wait for it to end or use another folder "
                f"(the lock is {path}; it goes when its owner ends, killed or not)"
            ) from None
        record = {
            "what": what,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the only descriptor releases the lock
