"""The stand-in's ``cupy.cuda.nccl``: a communicator whose all-reduce sums the device arrays'
host copies over MPI (mpi4py's ``COMM_WORLD``, one rank per process, as NCCL's ranks).

As strict as NCCL where it can be: the buffers must be device arrays of the current device,
``count`` elements of the named type. Unlike NCCL, it cannot be captured in a CUDA graph (a
replay would not run MPI again): an all-reduce during a stream capture is refused.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy

from lenet_xp.testing.fake_cupy import runtime

NCCL_SUM = 0
NCCL_FLOAT32 = 7
NCCL_FLOAT64 = 8
_TYPES = {NCCL_FLOAT32: numpy.float32, NCCL_FLOAT64: numpy.float64}
available = True
#: The arrays whose ``.data.ptr`` was taken, by that pointer (what NCCL's calls receive).
_BY_POINTER: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def register(pointer: int, array: Any) -> None:
    """``array``'s data starts at ``pointer`` (called by ``ndarray.data``)."""
    _BY_POINTER[pointer] = array


def get_unique_id() -> tuple[int, ...]:
    return tuple(int(b) for b in numpy.random.default_rng().integers(0, 256, 128))


class NcclCommunicator:
    """``NcclCommunicator(ndev, commId, rank)``: this process is ``rank`` of ``ndev``."""

    def __init__(self, ndev: int, commId: tuple, rank: int) -> None:  # noqa: N803
        from mpi4py import MPI

        self._comm, self._mpi = MPI.COMM_WORLD, MPI
        if (self._comm.Get_size(), self._comm.Get_rank()) != (ndev, rank):
            raise RuntimeError(f"NCCL rank {rank} of {ndev} is not this MPI process's")
        self.device = runtime.current_device()

    def allReduce(  # noqa: N802 - CuPy's name
        self, sendbuf: int, recvbuf: int, count: int, datatype: int, op: int, stream: int
    ) -> None:
        if runtime.capturing():
            raise runtime.capture_error()
        if op != NCCL_SUM or datatype not in _TYPES:
            raise ValueError(f"the stand-in's NCCL sums float32/float64 only, not {datatype}")
        source, target = _BY_POINTER.get(sendbuf), _BY_POINTER.get(recvbuf)
        for array in (source, target):
            if array is None or array.device.id != self.device:
                raise RuntimeError("NCCL buffers must be device arrays of the communicator's GPU")
            if array.dtype != _TYPES[datatype] or array.size < count:
                raise RuntimeError("NCCL buffer of another type, or shorter than count")
        host = numpy.ascontiguousarray(source._data.reshape(-1)[:count])
        self._comm.Allreduce(self._mpi.IN_PLACE, host, op=self._mpi.SUM)
        target._data.reshape(-1)[:count] = host
