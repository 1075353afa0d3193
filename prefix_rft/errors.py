"""User errors: one clean line instead of a traceback.

    raise UserError("model.path '/m' does not exist: set it to a local HF model directory")

A :class:`UserError` is a mistake the user can fix (a config value, a path, the data, the
device, the disk); the command line prints its message as one line and exits with status 2.
Anything else is a bug and keeps its traceback. ``--debug`` shows the traceback of user
errors too. :func:`user_error_from` turns the ``OSError``s that are really user problems
(disk full, read-only or permission-denied run directory) into a ``UserError`` naming the
path; :func:`save_file` opens the file itself so that a full disk surfaces as
``ENOSPC`` ("no space left on device: <path>") instead of torch's "unexpected pos".
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class UserError(ValueError):
    """A mistake the user can fix; its message is one line naming the field or file and what
    to do. Subclasses ``ValueError`` so existing ``except ValueError`` callers keep working."""


class NonFiniteError(UserError):
    """NaN/Inf where training cannot go on (weights, repeated bad steps, rewards by config)."""


# errno -> what to tell the user (the path is appended)
_OS_MESSAGES = {
    errno.ENOSPC: "no space left on device: {path} (free some space or point "
                  "train.run_dir elsewhere)",
    errno.EDQUOT: "disk quota exceeded: {path} (free some space or point train.run_dir "
                  "elsewhere)",
    errno.EROFS: "read-only file system: {path} (set train.run_dir to a writable directory)",
    errno.EACCES: "permission denied: {path} (set train.run_dir to a directory you can "
                  "write, or fix its permissions)",
    errno.EPERM: "operation not permitted: {path} (set train.run_dir to a directory you can "
                 "write)",
}


def user_error_from(err: BaseException, path: str | Path | None = None) -> UserError | None:
    """The :class:`UserError` for an ``OSError`` that is the user's to fix, else None.

    ``path`` names the file when the error does not carry one (e.g. a failed write)."""
    if isinstance(err, UserError):
        return err
    seen: BaseException | None = err
    for _ in range(8):  # torch wraps the OSError of a failed write in a RuntimeError
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in _OS_MESSAGES:
            where = seen.filename if seen.filename is not None else path
            return UserError(_OS_MESSAGES[seen.errno].format(
                path=where if where is not None else "?"))
        seen = seen.__cause__ or seen.__context__
    if "unexpected pos" in str(err) and path is not None:  # torch.save given a path
        return UserError(f"could not write {path} ({' '.join(str(err).split())[-40:]}; "
                         f"usually no space left on device)")
    return None


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Re-raise a disk-full / read-only / permission ``OSError`` inside as a ``UserError``
    naming ``path``; other errors pass through unchanged."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        user = user_error_from(err, path)
        if user is None:
            raise
        raise user from err


def save_file(path: str | Path, write: Callable[[Any], None]) -> None:
    """Open ``path`` for binary writing, call ``write(handle)``, flush and fsync.

    ``torch.save(obj, handle)`` through a Python file object reports a full disk as
    ``OSError(ENOSPC)`` (given a path, torch reports only "unexpected pos N vs M")."""
    with writing(path), open(path, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def write_text_atomic(path: str | Path, text: str, *, pause: str = "") -> None:
    """Replace ``path`` with ``text`` atomically: a temp file beside it, fsync, rename.

    A kill at any instant leaves either the old or the new content, never a mix or nothing.
    ``pause``: the :func:`crash_point` name between the write and the rename (tests)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        save_file(tmp, lambda handle: handle.write(text.encode("utf-8")))
        if pause:
            crash_point(pause)
        with writing(path):
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def crash_point(name: str) -> None:
    """Test hook at a crash window: with ``PREFIX_RFT_TEST_PAUSE=<name>:<seconds>`` in the
    environment, print a marker line to stderr and sleep there (so a test can SIGKILL the
    process inside the window); a no-op otherwise."""
    spec = os.environ.get("PREFIX_RFT_TEST_PAUSE", "")
    if spec and spec.partition(":")[0] == name:
        import sys
        import time

        print(f"[prefix-rft] test pause at {name}", file=sys.stderr, flush=True)
        time.sleep(float(spec.partition(":")[2] or 60))


def format_error(command: str, err: BaseException) -> str:
    """``prefix-rft train: error: <message>`` on one line (newlines folded)."""
    message = " ".join(str(err).split()) or type(err).__name__
    return f"{command}: error: {message}"


def report_user_errors(command: str, run: Callable[[], int], *, debug: bool = False) -> int:
    """``run()``; a user error (a :class:`UserError`, or an ``OSError`` such as a full disk,
    possibly wrapped) prints one line to stderr and gives exit status 2 (with ``debug``, after
    its traceback). Anything else propagates with its traceback: it is a bug."""
    try:
        return run()
    except Exception as err:  # noqa: BLE001 -- re-raised unless it is the user's to fix
        user = user_error_from(err)
        if user is None:
            raise
        if debug:
            import traceback

            traceback.print_exc()
        import sys

        print(format_error(command, user), file=sys.stderr, flush=True)
        return 2
