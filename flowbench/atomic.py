"""Write-then-rename: every file flowbench writes appears whole or not at all, and a write that
fails for want of space or permission is one FlowbenchError line naming the path."""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from flowbench.errors import FlowbenchError

# what a user can do about each: errnos a full disk or a closed folder raise
_ADVICE = {
    errno.ENOSPC: ("no space left on device", "free space there or give another output folder, then run again"),
    errno.EDQUOT: ("disk quota exceeded", "free some of your quota or give another output folder, then run again"),
    errno.EACCES: ("permission denied", "make the folder writable for you or give another one, then run again"),
    errno.EPERM: ("permission denied", "make the folder writable for you or give another one, then run again"),
    errno.EROFS: ("read-only file system", "give an output folder on a writable disk, then run again"),
}
KEPT = " (its previous version is intact)"
_FULL = 1 << 20  # below a MiB free, a writer's failure is taken for a full disk


def write_error(path: str | Path, err: OSError, kept: str = "") -> FlowbenchError | None:
    """The one line for a write to ``path`` that failed with ``err`` (``kept``: what is intact);
    None for errors other than a full disk or a closed folder."""
    if err.errno not in _ADVICE:
        return None
    what, advice = _ADVICE[err.errno]
    return FlowbenchError(f"{what} writing {path}{kept}: {advice}")


def _raise_write_error(path: Path, err: OSError) -> NoReturn:
    """Raise the one-line error for ``err`` if it is a full disk or a closed folder, else ``err``."""
    translated = write_error(path, err, KEPT)
    if translated is None:
        raise err
    raise translated from None


def _disk_full(folder: Path) -> bool:
    """Whether ``folder``'s file system has (next to) no space left for an ordinary user."""
    try:
        stat = os.statvfs(folder)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < _FULL


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; it replaces ``path`` only once the block
    ends without error, so a crash or a failed write never leaves half a file.

    The temporary name is unique (two writers of one file do not share it) and keeps ``path``'s
    extension for writers that infer the format from it. The data is fsynced before the rename
    and the folder after it, so a power cut leaves the old file or the new one, not an empty one.
    A full disk, a read-only or unwritable folder raise FlowbenchError naming ``path`` — also
    when the writer hides the errno (torch.save raises RuntimeError 'unexpected pos').
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: never another writer's file; mode 0o666 less the umask, as open() would make it
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
    except OSError as err:
        _raise_write_error(path, err)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as err:
        _raise_write_error(path, err)
    except RuntimeError:
        if _disk_full(path.parent):
            _raise_write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        raise
    finally:
        tmp.unlink(missing_ok=True)
