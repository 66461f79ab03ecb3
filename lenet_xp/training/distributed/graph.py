"""``--engine graph`` (and ``kernels``) over MPI ranks on GPUs: the graph engine's step on
this rank's slice of every batch, cut in two around the one all-reduce of the step.

A rank's step is the single-GPU step (:class:`~lenet_xp.training.graph.GraphStep`) with the
batch sliced as :func:`~lenet_xp.training.distributed.engine.slice_of` slices it, and one flat
device buffer summed over the ranks between its two halves:

- *compute*: the slice's gather (from the epoch's order at the slice's start), forward, loss
  and backward; the gradients, weighted by the slice's share of the batch, written straight
  into the buffer's head, then this step's loss sum, correct count and (zero) stop request;
- the host writes its stop request into the buffer only when a signal asked for one; then
  NCCL sums the buffer in place on the same stream (no host copy, no synchronisation);
- *update*: the epoch's running sums from the buffer's tail, the optimizer's and the weight
  average's step from its head, ``clock += 1``.

With ``--engine graph`` each half is captured once as a CUDA graph and replayed per batch;
the all-reduce runs between the two replays, not inside a graph: NCCL (2.9 and later) can be
captured, but no test here could replay a captured all-reduce (the CuPy stand-in's NCCL is
MPI on the host, which a replay would not run), and one more graph launch a step costs
microseconds. The host reads the summed stop requests every :data:`READ_EVERY` steps (one
synchronisation), at the same steps on every rank, so all ranks stop at the same step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from lenet_xp.backend import asnumpy
from lenet_xp.training.distributed.comm import World
from lenet_xp.training.distributed.engine import (  # the buffer's tail: as the layers'
    _CORRECT,
    _LOSS,
    _SIGNALS,
    _STOPS,
    AgreedStop,
    slice_of,
)
from lenet_xp.training.graph import GraphStep
from lenet_xp.training.resume import GPU_CHECK_EVERY

#: How often (in steps) the host reads the ranks' summed stop requests (a synchronisation).
READ_EVERY = GPU_CHECK_EVERY


class RankGraphStep(GraphStep):
    """:class:`~lenet_xp.training.graph.GraphStep` for rank ``world.rank`` of ``world.size``:
    ``reduce(buffer)`` sums a device array over the ranks in place (NCCL's all-reduce,
    :class:`~lenet_xp.training.distributed.nccl.NcclSum`); ``requested()`` is this process's
    stop request (a signal number, ``None``: none) and ``agreed`` the one all ranks act on.
    The other arguments are :class:`GraphStep`'s."""

    def __init__(
        self, world: World, reduce: Callable[[Any], None], requested: Callable[[], int | None],
        agreed: AgreedStop, *args: Any, **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.world, self.reduce, self.requested, self.agreed = world, reduce, requested, agreed
        xp, size = self.xp, self.flat.grad.size
        self.buffer = xp.zeros(size + 4, self.flat.grad.dtype)
        self.flat.grad = self.buffer[:size]  # the gradients are gathered into the buffer
        self.sums = (xp.zeros((), xp.float64), xp.zeros((), xp.int64))  # this step's own
        self.graphs: tuple[Any, Any] | None = None

    def own(self, rows: int) -> slice:
        """This rank's rows of a batch of ``rows``."""
        return slice_of(rows, self.world.rank, self.world.size)

    def compute(self, rows: int, start: int = 0) -> None:
        """This rank's half before the all-reduce, for a batch of ``rows`` (``start``: unused,
        the rank's slice decides it)."""
        own, (step_loss, step_correct) = self.own(rows), self.sums
        if own.stop == own.start:  # an epoch's short last batch, fewer rows than ranks
            self.buffer.fill(0)
            return
        step_loss.fill(0)
        step_correct.fill(0)
        super().compute(own.stop - own.start, own.start)
        self.flat.grad *= (own.stop - own.start) / rows  # the slice's share of the mean
        self.buffer[_LOSS] = step_loss
        self.buffer[_CORRECT] = step_correct
        self.buffer[_STOPS:] = 0

    def update(self) -> None:
        """The half after the all-reduce: the batch's sums into the epoch's, then the step."""
        self.loss_sum += self.buffer[_LOSS]
        self.correct += self.buffer[_CORRECT].astype(self.xp.int64)
        super().update()

    def _reduce(self) -> None:
        """This rank's stop request into the buffer, the all-reduce, and every
        :data:`READ_EVERY` steps the ranks' summed requests read into ``agreed``."""
        signum = self.requested()
        if signum is not None:
            self.buffer[_STOPS] = 1
            self.buffer[_SIGNALS] = signum
        self.reduce(self.buffer)
        if (self.optimizer.steps + 1) % READ_EVERY == 0:  # the same steps on every rank
            stops, signals = asnumpy(self.buffer[_STOPS:])
            self.agreed.merge(float(stops), float(signals))

    def step(self, rows: int) -> None:
        """One step on a batch of ``rows``, eagerly (or the first of the epoch, compiling)."""
        self.compute(rows)
        self._reduce()
        self.update()

    def capture(self) -> None:
        """Capture the two halves of a full batch's step, each as a CUDA graph (temporaries
        from one pool kept with them); the all-reduce stays between them."""
        cuda = self.xp.cuda
        pool = cuda.MemoryPool()
        stream = cuda.Stream(non_blocking=True)
        graphs = []
        with stream, cuda.using_allocator(pool.malloc):
            for half in (lambda: self.compute(self.batch_size), self.update):
                stream.begin_capture()
                try:
                    half()
                except BaseException:  # leave capture mode; report the half's own error
                    with contextlib.suppress(Exception):
                        stream.end_capture()
                    raise
                graphs.append(stream.end_capture())
        self.graphs, self._pool, self._stream = (graphs[0], graphs[1]), pool, stream
        self.graph = self.graphs[0]  # captured: train_epoch_graph replays through run()

    def run(self, rows: int) -> None:
        """The next batch: replays of the two halves around the all-reduce if it is a full
        one, else eager."""
        if rows == self.batch_size and self.graphs is not None:
            self.graphs[0].launch()
            self._reduce()
            self.graphs[1].launch()
        else:
            self.step(rows)
