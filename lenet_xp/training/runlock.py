"""One training run per ``--out`` folder: an advisory ``flock`` on ``OUT/.train.lock``.

The kernel drops the lock when the holder exits, however it exits (``kill -9`` included), so a
crashed run never leaves the folder locked; the file itself stays (removing it would race).
Holding the lock also makes it safe to delete the temp files an interrupted write left there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".train.lock"


class RunLockError(Exception):
    """The ``--out`` folder is held by a live run (or cannot be created); one line."""


class RunLock:
    """Context manager holding ``folder``'s lock (the folder is created if needed);
    ``name``: the lock file's, ``what``: what holds it, for the error message."""

    def __init__(
        self, folder: str | os.PathLike[str], name: str = LOCK_NAME, what: str = "training run"
    ) -> None:
        self.folder, self.name, self.what = Path(folder), name, what
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        path = self.folder / self.name
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunLockError(
                f"cannot use --out {self.folder}: {exc.strerror or exc}; choose another --out"
            ) from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunLockError(
                    f"--out {self.folder} is in use by another {self.what} (pid {holder}); "
                    "wait for it to finish, stop it, or choose another --out"
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None
