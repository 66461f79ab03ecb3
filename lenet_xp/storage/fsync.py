"""Durable renames: after ``os.replace`` of a fsynced temp file, fsync the folder too."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Flush ``folder``'s entry list to disk, so a rename in it survives a crash (best effort:
    some file systems cannot open or fsync a folder)."""
    try:
        fd = os.open(Path(folder), os.O_RDONLY)
    except OSError:
        return
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)
