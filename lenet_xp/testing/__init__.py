"""Testing aids that ship with the package (as ``numpy.testing`` ships with NumPy): the strict
CuPy stand-in (:mod:`lenet_xp.testing.fake_cupy`, switched on by ``LENET_XP_FAKE_CUDA``), the
CUDA kernel emulator (:mod:`lenet_xp.testing.cuda_emulator`) and the snapshot of CuPy's names
the stand-in is held to (:mod:`lenet_xp.testing.cupy_names`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import ModuleType

#: The environment variable that switches the stand-in on: ``1`` (one device), ``2`` (two).
FAKE_CUDA = "LENET_XP_FAKE_CUDA"


def fake_cuda_enabled() -> bool:
    """Whether ``$LENET_XP_FAKE_CUDA`` asks for the stand-in (any value but empty or ``0``)."""
    return os.environ.get(FAKE_CUDA, "").strip() not in ("", "0")


def cupyx() -> ModuleType:
    """``cupyx`` of the CuPy in use: the stand-in's when it is on, else the real one."""
    if fake_cuda_enabled():
        from lenet_xp.testing.fake_cupy import cupyx as fake

        return fake
    import cupyx as real

    return real


class SyncCount:
    """How many host synchronisations happened inside a ``with`` block (``.count``)."""

    count = 0


@contextlib.contextmanager
def count_synchronizations() -> Iterator[SyncCount]:
    """Count the stand-in's synchronisations in the block: ``with count_synchronizations() as
    syncs: ...; assert syncs.count == 1``. Needs the stand-in (a real GPU has no counter)."""
    if not fake_cuda_enabled():
        raise RuntimeError(f"counting synchronisations needs the CuPy stand-in ({FAKE_CUDA}=1)")
    from lenet_xp.testing.fake_cupy import runtime

    counter = SyncCount()
    before = runtime.synchronizations()
    try:
        yield counter
    finally:
        counter.count = runtime.synchronizations() - before
