"""One model trained by several MPI ranks (CPU): each computes its slice of the global batch.

Every rank holds the whole data set and draws the same order, shifts and augmentation seeds
from the run's seed, so its slice of a step is a function of (seed, epoch, step, rank, N)
alone. Rank ``r`` of ``N`` takes images ``[n*r//N, n*(r+1)//N)`` of a batch of ``n`` (as
``--workers`` slices a batch), runs them (through its own :class:`~lenet_xp.training.parallel.
DataParallel`: ``--workers`` within a rank), and writes into one flat float64 buffer its
slice-size-weighted gradients, loss and correct count, and its stop request; one all-reduce
of that buffer per step (``MPI.Allreduce`` of a host buffer on the CPU, NCCL's on the device
on a GPU: :mod:`~lenet_xp.training.distributed.nccl`) gives every rank the same sums, so every rank
takes the same optimizer step and the same decision to stop (:class:`AgreedStop`).
"""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Callable
from typing import Any

from lenet_xp.backend import asnumpy, get_array_module
from lenet_xp.layers import Dropout
from lenet_xp.training.distributed.comm import DistributedError, World
from lenet_xp.training.interrupt import StopSignals
from lenet_xp.training.parallel import DataParallel

#: The buffer's tail after the gradients: loss, correct, ranks asking to stop, their signals.
_LOSS, _CORRECT, _STOPS, _SIGNALS = range(-4, 0)
#: Rank ``r > 0`` draws its dropout masks from stream ``RANK_STREAMS + r`` of the seed (worker
#: processes take streams 1, 2, ... of theirs: the two never meet).
RANK_STREAMS = 1 << 32


class AgreedStop:
    """The stop request the ranks agreed on (``requested``: a signal number, ``None``: none),
    updated only at collectives, so all ranks stop at the same step; the training loop's
    :class:`~lenet_xp.training.resume.Keeper` reads this one instead of the local signals."""

    def __init__(self) -> None:
        self.requested: int | None = None

    def merge(self, stops: float, signals_sum: float) -> None:
        """Take the sums of the ranks' stop slots: any rank asking stops all of them."""
        if stops and self.requested is None:
            mean = signals_sum / stops  # the ranks' common signal, else SIGTERM
            self.requested = int(mean) if mean.is_integer() else int(signal.SIGTERM)


def slice_of(n: int, rank: int, size: int) -> slice:
    """Rank ``rank``'s images of a batch of ``n`` split over ``size`` ranks."""
    return slice(n * rank // size, n * (rank + 1) // size)


class RankParallel:
    """This rank's part of ``model``'s data-parallel training over ``world``: the interface of
    :class:`~lenet_xp.training.parallel.DataParallel` (``train``, ``eval``, ``forward``,
    ``forward_backward``, ``close``), given whole global batches. ``workers``: processes
    within this rank; ``signals``: this process's SIGINT/SIGTERM; ``agreed``: the stop all
    ranks act on; ``reduce(buffer)``: sums a contiguous array of the model's device over the
    ranks in place (default: ``world.allreduce_sum``, host arrays)."""

    #: Batches are gathered whole (each rank then takes its slice), not into shared memory.
    batch_buffer = None

    def __init__(
        self, world: World, model: Any, workers: int, max_batch: int, signals: StopSignals,
        agreed: AgreedStop, reduce: Callable[[Any], None] | None = None,
    ) -> None:  # fmt: skip
        self.world, self.model, self.signals, self.agreed = world, model, signals, agreed
        from threadpoolctl import threadpool_limits

        # One core per process, as --workers does: ranks sharing a node's cores with
        # several BLAS threads each oversubscribe it (restored by close).
        self._blas_limit = threadpool_limits(limits=1, user_api="blas")
        if world.rank:  # this rank's own dropout masks (rank 0 keeps one process's)
            for layer in model.modules():
                if isinstance(layer, Dropout):
                    layer.fork(RANK_STREAMS + world.rank)
        self.local = DataParallel(
            model, workers, max_batch=max_batch, stop_requested=lambda: signals.requested
        )
        self.reduce = reduce or world.allreduce_sum
        params = model.parameters()
        xp = self.xp = get_array_module(params[0].data)
        self._sizes = [int(p.data.size) for p in params]
        self._buffer = xp.zeros(sum(self._sizes) + 4, dtype=xp.float64)
        self._logits = xp.zeros((max_batch, 10), dtype=params[0].data.dtype)

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def eval(self) -> None:
        self.model.eval()

    def close(self) -> None:
        self.local.close()
        self._blas_limit.restore_original_limits()

    def _own(self, n: int) -> slice:
        return slice_of(n, self.world.rank, self.world.size)

    def _put_stop(self) -> None:
        requested = self.signals.requested
        self._buffer[_STOPS] = requested is not None
        self._buffer[_SIGNALS] = requested or 0

    def forward_backward(
        self, x: Any, labels: Any, distortion: Any = None, ids: Any = None, next_ids: Any = None
    ) -> tuple[Any, Any]:
        """As :meth:`DataParallel.forward_backward` on the whole batch ``x (n, ...)``: this
        rank computes its slice; after one all-reduce every rank holds the batch's mean
        gradient in ``param.grad``, and the returned ``(loss, n_correct)`` are the batch's."""
        n, own = x.shape[0], self._own(x.shape[0])
        buffer, params = self._buffer, self.model.parameters()
        buffer[...] = 0
        if own.stop > own.start:
            ahead = None if next_ids is None else next_ids[self._own(next_ids.shape[0])]
            part_ids = None if ids is None else ids[own]
            loss, correct = self.local.forward_backward(
                x[own], labels[own], distortion, part_ids, ahead
            )
            weight, offset = (own.stop - own.start) / n, 0
            for param, size in zip(params, self._sizes, strict=True):
                if param.grad is not None:  # fixed parameters (RBF centres) have none
                    buffer[offset : offset + size] = param.grad.ravel()
                    buffer[offset : offset + size] *= weight
                offset += size
            buffer[_LOSS] = loss * weight  # 0-d arrays of the device: no host read
            buffer[_CORRECT] = correct
        self._put_stop()
        self.reduce(buffer)
        offset = 0
        for param, size in zip(params, self._sizes, strict=True):
            if param.grad is not None:
                param.grad[...] = buffer[offset : offset + size].reshape(param.grad.shape)
            offset += size
        stops = asnumpy(buffer[_STOPS:])  # the step's one host read (free on the CPU)
        self.agreed.merge(float(stops[0]), float(stops[1]))
        return buffer[_LOSS].copy(), buffer[_CORRECT].astype(self.xp.int64)

    def forward(self, x: Any) -> Any:
        """Logits of ``x (n, ...)``: each rank computes its slice into zeros, and the sum over
        the ranks (the same all-reduce as the gradients; adding zeros is exact) holds them
        all, on every rank."""
        n, own = x.shape[0], self._own(x.shape[0])
        logits = self._logits[:n]
        logits[...] = 0
        if own.stop > own.start:
            logits[own] = self.local.forward(x[own])
        self.reduce(logits)
        return logits.copy()

    def agree_stop(self, epoch: int) -> None:
        """At an epoch's start: agree on a stop requested since the last step (during the
        evaluation), and check that every rank holds the same parameters as rank 0
        (:class:`DistributedError` naming the first that does not)."""
        digest = hashlib.sha256()
        for param in self.model.parameters():
            digest.update(asnumpy(param.data).tobytes())
        requested = self.signals.requested
        stops = self.world.allgather((requested, digest.hexdigest()))
        asked = [signum for signum, _ in stops if signum is not None]
        self.agreed.merge(float(len(asked)), float(sum(asked)))
        for rank, (_, other) in enumerate(stops):
            if other != stops[0][1]:
                raise DistributedError(
                    f"rank {rank}'s parameters differ from rank 0's before epoch {epoch}: "
                    "the ranks no longer train one model (a bug: please report it)"
                )
