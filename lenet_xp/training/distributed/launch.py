"""What a run does once per rank: check that the ranks were launched alike, take rank 0's
parameters and optimizer state, and keep the writing to rank 0."""

from __future__ import annotations

import platform
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from importlib import metadata
from typing import Any

from lenet_xp.backend import asnumpy
from lenet_xp.training.distributed.comm import DistributedError, World
from lenet_xp.training.runlock import RunLockError

#: Packages whose versions must match across ranks (they decide the numbers).
_PACKAGES = ("lenet_xp", "numpy", "mpi4py")


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def check_launch(world: World, options: dict[str, Any], batch_size: int) -> None:
    """:class:`DistributedError` (one line, the same on every rank) unless every rank runs
    with rank 0's ``options`` (the parsed flags) and package versions, and the global
    ``batch_size`` gives every rank at least one image."""
    mine = (sorted((k, repr(v)) for k, v in options.items()), _versions())
    launches = world.allgather(mine)
    for rank, (flags, versions) in enumerate(launches):
        for what, theirs, first in (("flags", flags, launches[0][0]),
                                    ("versions", versions, launches[0][1])):  # fmt: skip
            if theirs != first:
                differs = _first_difference(dict(first), dict(theirs))
                raise DistributedError(
                    f"rank {rank} was launched with other {what} than rank 0 ({differs}): "
                    "start every rank with the same command and environment"
                )
    if batch_size < world.size:
        raise DistributedError(
            f"--batch-size {batch_size} is the global batch, split over {world.size} ranks: "
            f"it must be at least {world.size} (or launch fewer ranks)"
        )


def _first_difference(first: dict, theirs: dict) -> str:
    for key in sorted(set(first) | set(theirs)):
        if first.get(key) != theirs.get(key):
            return f"{key}: {first.get(key)} on rank 0, {theirs.get(key)} there"
    return "?"


@contextmanager
def held_together(world: World, lock: AbstractContextManager) -> Iterator[None]:
    """Hold ``lock`` (rank 0's run lock; nothing on the other ranks) for the run, or fail on
    every rank with rank 0's line (:class:`DistributedError`), not on rank 0 alone while the
    others wait for it."""
    try:
        lock.__enter__()
        failure = None
    except RunLockError as exc:
        failure = str(exc)
    failures = world.allgather(failure)
    if failures[0] is not None:
        raise DistributedError(failures[0])
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def broadcast_state(world: World, model: Any, optimizer: Any) -> None:
    """Every rank takes rank 0's parameters and optimizer state (at the start, and after a
    resume), so the ranks start as one model whatever each one built or read."""
    state = world.broadcast(
        (_on_host(model.state_dict()), _on_host(optimizer.state_dict()))
    )  # host copies: a rank's GPU arrays would unpickle onto rank 0's device
    if not world.is_writer:
        model.load_state_dict(state[0])
        optimizer.load_state_dict(state[1])


def _on_host(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with its device arrays copied to the host (NumPy)."""
    return {k: asnumpy(v) if hasattr(v, "shape") else v for k, v in state.items()}


class SilentLog:
    """The :class:`~lenet_xp.training.logs.RunLog` of a rank that does not write (ranks above 0)."""

    def after_step(self) -> None:
        pass

    def end_epoch(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def reader_base(meta: dict) -> dict:
    """As :func:`~lenet_xp.training.resume.resume_base`, for a rank that writes no metrics file."""
    base = {key: value for key, value in meta.items() if key != "mid_epoch"}
    base["history"] = list(meta.get("history") or [])
    return base
