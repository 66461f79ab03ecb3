"""The MPI world of a run: which rank this process is, out of how many.

A process is one of several ranks when a launcher started it (``mpiexec``/``mpirun`` of MPICH
or Open MPI, Slurm's ``srun``): :func:`world` reads the launcher's environment first, so a
plain ``python -m lenet_xp.train`` never imports mpi4py.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

#: Environment variables in which launchers give the number of processes they started.
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_NTASKS")
#: ... and this process's index among those on its own node (which GPU it takes).
LOCAL_RANK_VARIABLES = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")
#: How long a rank that has finished (or failed) waits for the others at the end before it
#: aborts the whole job (a rank that failed alone would otherwise leave them waiting forever).
FINISH_GRACE_S = 20.0
#: How long a step's all-reduce may wait for the other ranks before this rank ends the job
#: (seconds; ``$LENET_XP_COLLECTIVE_TIMEOUT``): a rank that hangs or is stopped, or a node
#: that drops off the network without closing its connections, never answers. PyTorch's
#: default for its collectives is 10 minutes too.
COLLECTIVE_TIMEOUT_S = 600.0
#: Before an abort, how long the launcher gets to forward this rank's last lines.
FORWARD_S = 0.5


class DistributedError(Exception):
    """The ranks cannot train together (mpi4py missing, a mismatched launch); one line."""


def launched_size() -> int:
    """How many processes the launcher says it started (1: not launched by one)."""
    for name in SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 1:
            return int(value)
    return 1


class World:
    """The ranks of one run: ``rank`` of ``size``, ``local_rank`` on this node; collectives
    over mpi4py's ``COMM_WORLD`` (host NumPy buffers)."""

    def __init__(self, comm: Any) -> None:
        from mpi4py import MPI

        self.MPI, self.comm = MPI, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        local = next((os.environ[n] for n in LOCAL_RANK_VARIABLES if n in os.environ), None)
        self.local_rank = int(local) if local is not None else self.rank

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone writes checkpoints, metrics, the report and holds the run lock."""
        return self.rank == 0

    def allreduce_sum(self, buffer: Any) -> None:
        """Sum ``buffer`` (a contiguous host array) over the ranks, in place; if the others do
        not all join within :func:`collective_timeout` seconds, say so in one line and end
        the whole job (exit status 1) rather than wait forever."""
        request = self.comm.Iallreduce(self.MPI.IN_PLACE, buffer, op=self.MPI.SUM)
        if request.Test():
            return
        deadline = time.monotonic() + collective_timeout()
        while not request.Test():  # MPI's own blocking wait polls as well
            if time.monotonic() > deadline:
                print(
                    f"lenet_xp.train: error: rank {self.rank} waited {collective_timeout():g} s "
                    "for the other ranks' step: one of them hangs, is stopped, or lost its "
                    "node; ending the job (the last checkpoint is kept; resume from it; "
                    "LENET_XP_COLLECTIVE_TIMEOUT sets the wait)",
                    file=sys.stderr,
                )
                self.abort(1)

    def allgather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (any picklable object), in rank order."""
        return self.comm.allgather(value)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (picklable), on every rank."""
        return self.comm.bcast(value, root=0)

    def finish(self, status: int) -> None:
        """End this rank's part of the run: wait (at most :data:`FINISH_GRACE_S`) for the
        others to end theirs; if they do not (this rank failed alone while they wait in a
        collective), abort the whole job with ``status`` so that no rank hangs."""
        request = self.comm.Ibarrier()
        deadline = time.monotonic() + FINISH_GRACE_S
        while not request.Test():
            if time.monotonic() > deadline:
                self.abort(status)
            time.sleep(0.01)

    def abort(self, status: int) -> None:
        """End every rank of the job now, with exit status ``status`` (at least 1). MPI's
        abort may return before it has ended this process (MPICH's does while a rank is
        stopped): this process then ends itself, and its launcher ends the rest. First the
        launcher gets :data:`FORWARD_S` to pass on what this rank wrote (MPICH's proxy reads
        its stderr through a pipe; an abort at once could lose the line saying why)."""
        sys.stderr.flush()
        sys.stdout.flush()
        time.sleep(FORWARD_S)
        self.comm.Abort(status or 1)
        os._exit(status or 1)


def collective_timeout() -> float:
    """:data:`COLLECTIVE_TIMEOUT_S`, or ``$LENET_XP_COLLECTIVE_TIMEOUT`` seconds if set."""
    value = os.environ.get("LENET_XP_COLLECTIVE_TIMEOUT", "").strip()
    try:
        return float(value) if value else COLLECTIVE_TIMEOUT_S
    except ValueError:
        raise DistributedError(
            f"LENET_XP_COLLECTIVE_TIMEOUT={value!r} is not a number of seconds"
        ) from None


def world() -> World | None:
    """This process's :class:`World` when a launcher started several ranks, else ``None``;
    :class:`DistributedError` (one line) when mpi4py or an MPI library is missing."""
    if launched_size() == 1:
        return None
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise DistributedError(
            f"started as one of {launched_size()} MPI ranks, but mpi4py cannot be imported "
            f'({exc}): pip install "lenet_xp[mpi]"'
        ) from None
    collective_timeout()  # a bad $LENET_XP_COLLECTIVE_TIMEOUT is one line now, not mid-run
    found = World(MPI.COMM_WORLD)
    return found if found.size > 1 else None
