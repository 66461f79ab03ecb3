"""The GPU ranks' all-reduce: NCCL through CuPy (``cupy.cuda.nccl``), as ChainerMN did.

Rank 0 draws NCCL's unique id and broadcasts it over MPI; each rank then builds its
``NcclCommunicator`` on its own GPU (``cuda:<local rank>``), and :meth:`NcclSum.__call__`
sums a device buffer in place on the current (training) stream, with no host copy and no
synchronisation. The graph engine's ranks call it between their step's two captured halves
(:mod:`~lenet_xp.training.distributed.graph` says why not inside a graph).
"""

from __future__ import annotations

from typing import Any

from lenet_xp.backend import import_cupy, import_nccl
from lenet_xp.training.distributed.comm import DistributedError, World


class NcclSum:
    """``reduce(buffer)`` for :class:`~lenet_xp.training.distributed.engine.RankParallel` on
    GPUs: NCCL's in-place sum over the ranks of ``world`` of a contiguous float32/float64
    device array."""

    def __init__(self, world: World) -> None:
        cupy, nccl = import_cupy(), import_nccl()
        if nccl is None:
            raise DistributedError(
                'CuPy has no NCCL here: pip install "lenet_xp[mpi]" nvidia-nccl-cu12 '
                "(the NCCL wheel), or train the ranks on the CPU (--device cpu)"
            )
        self.cupy, self.nccl = cupy, nccl
        unique_id = world.broadcast(nccl.get_unique_id() if world.is_writer else None)
        self.comm = nccl.NcclCommunicator(world.size, unique_id, world.rank)
        self._types = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64}

    def __call__(self, buffer: Any) -> None:
        pointer = buffer.data.ptr
        stream = self.cupy.cuda.get_current_stream().ptr
        kind = self._types[str(buffer.dtype)]
        self.comm.allReduce(pointer, pointer, buffer.size, kind, self.nccl.NCCL_SUM, stream)
