"""Locks between processes, and files created without following symbolic links.

Several processes (extraction jobs, runs, a user's notebook), on one machine or on several
sharing a file system, may write the same activation store or output. They agree through
OS file locks (:class:`filelock.FileLock`: ``flock``, which Linux's NFS client maps to
NFS locks); a process that dies releases its locks with it.

In a folder that other users can write to, a name this package is about to create may
already be a symbolic link planted there; following it would let that user choose which
of your files gets written. Lock files, marker files and probes are therefore created
with ``O_EXCL | O_NOFOLLOW``, or written to a fresh temporary file that is then renamed
over the name (a rename replaces a link, it never writes through it).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LockError", "LockTimeout", "create_new", "held", "replace_file"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class LockError(OSError):
    """A lock that cannot be taken: its file cannot be created, or is a symbolic link."""


class LockTimeout(LockError, TimeoutError):
    """A lock another process holds was not released in time."""


@contextlib.contextmanager
def held(
    path: str | os.PathLike, *, timeout: float, what: str, remove: bool = False
) -> Iterator[None]:
    """Hold the OS lock on ``path`` (created if absent) for the duration of the block.

    Parameters
    ----------
    path
        The lock file; its folder is created if needed.
    timeout
        Seconds to wait for another holder (0: do not wait).
    what
        What the lock protects, for the error messages.
    remove
        Delete the lock file when the block ends, however it ends. It is unlinked while
        the lock is still held: a process that opened it just before then holds a lock on
        an unlinked file, which filelock (4.3 and later) detects and does not count, and
        takes the lock again on a new file. (Unlinked after the release instead, two
        processes could each hold a lock: one on the old file, one on a new one.)

    Raises
    ------
    LockTimeout
        Another process held the lock for ``timeout`` seconds.
    LockError
        The lock file is a symbolic link, or cannot be created.
    """
    from filelock import FileLock, Timeout

    path = Path(path)
    if path.is_symlink():
        raise LockError(f"the lock file of {what}, {str(path)!r}, is a symbolic link; "
                        "refusing to follow it")
    # One lock object per acquisition: a per-path singleton would make a second
    # acquisition in this process re-entrant instead of waiting.
    lock = FileLock(str(path), timeout=timeout, is_singleton=False, thread_local=False)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except Timeout:
        raise LockTimeout(
            f"{what} is locked by another process (lock file {str(path)!r}); "
            f"waited {timeout:g} s"
        ) from None
    except OSError as err:
        raise LockError(f"cannot lock {what} ({str(path)!r}): {err}") from err
    ours = os.stat(path)
    try:
        yield
    finally:
        try:
            if remove:
                with contextlib.suppress(OSError):
                    if os.path.samestat(os.stat(path), ours):
                        path.unlink()
        finally:
            lock.release()


def create_new(path: str | os.PathLike, data: bytes = b"", *, mode: int = 0o600) -> None:
    """Create the file ``path`` holding ``data``; fail if anything, a link included, is there.

    Raises
    ------
    FileExistsError
        Something exists at ``path`` (a dangling symbolic link counts).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def replace_file(path: str | os.PathLike, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically: a fresh temporary file renamed over ``path``.

    A symbolic link at ``path`` is replaced by the file, never written through.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
