"""One run per run directory: an exclusive ``flock`` on ``run_dir/.lock``.

    with RunLock(run_dir):           # UserError at once if another run holds the directory
        ...train...

The kernel drops a ``flock`` when its process dies, however it dies (kill -9 included), so a
lock is never stale: the file may stay behind, but the next run locks it again. The file
holds the owner's pid, host and start time, only to name it in the error. Under torchrun only
the main rank takes the lock (the other ranks share its directory by design).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from ..errors import UserError, writing

LOCK_FILE = ".lock"


class RunDirLocked(UserError):
    """Another live process holds the run directory."""


class RunLock:
    """Exclusive, non-blocking lock on a run directory (created when missing).

    Args:
        run_dir: the directory to own.
        field: the config field named in the error (``train.run_dir``).
    """

    def __init__(self, run_dir: str | Path, field: str = "train.run_dir"):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.field = field
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        with writing(self.run_dir):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise RunDirLocked(
                f"{self.field} {str(self.run_dir)!r} is in use by another run ({owner}); wait "
                f"for it to finish, stop it, or choose another {self.field}") from None
        except OSError:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        except OSError:
            pass  # the owner note is informative only; the lock itself is held
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_owner(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "owner unknown"
