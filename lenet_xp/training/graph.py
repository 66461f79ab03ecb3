"""``--engine graph``: the layers' own training step, captured once as a CUDA graph and
replayed per batch, for any network, optimizer (SGD, Nesterov, Adam, AdamW) and dtype;
``--engine kernels``: the same step, run eagerly.

A step here is the layers' step with every host value moved to the device, so that a
capture records nothing that changes from step to step:

- the batch: ``order[clock[BATCH] * B + arange(B)]`` gathered from the device-resident split
  (then shifted by the epoch's device ``shifts`` and distorted as ``--augment`` asks, with the
  epoch's random key on the device);
- forward, loss and backward: the layers, with our CUDA kernels (:meth:`Module.use_cuda_kernels`;
  their GEMMs are our kernel while capturing, as CuPy refuses cuBLAS there);
- dropout masks: counter-based, from the device clock (:class:`~lenet_xp.layers.Dropout`'s
  ``clock``); batch-norm's running statistics: updated in place on the device;
- the update: :class:`~lenet_xp.training.flat.FlatUpdate` (one launch for the optimizer, one
  for the weight average), learning rate ``lr_of_step[clock[STEP]]``; then ``clock += 1``.

Every buffer a captured operation touches is allocated before the capture or, during it, from
a memory pool reserved for the graph and kept as long as it (a CUDA graph owns no memory).
A first eager step compiles every kernel before the capture; the epoch's short last batch
runs eagerly (the same code, shorter arrays). Nothing is read back during an epoch except
what the :class:`~lenet_xp.training.resume.Keeper` asks for (the loss every
``check_every`` steps, a mid-epoch checkpoint), outside the graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from lenet_xp.backend import asnumpy
from lenet_xp.data.augment import Augment, Distortion
from lenet_xp.data.device_split import DeviceSplit, permutation, random_shifts
from lenet_xp.data.mnist import BACKGROUND
from lenet_xp.functional.loss import softmax_cross_entropy
from lenet_xp.kernels.ops import Kernels
from lenet_xp.layers import Dropout
from lenet_xp.layers.module import Module
from lenet_xp.optim.optimizers import Optimizer
from lenet_xp.training.flat import BATCH, FlatUpdate
from lenet_xp.training.resume import EpochPosition, Keeper
from lenet_xp.training.workers import forward_backward


def trainable_parameters(model: Module, x: Any, y: Any) -> list[Any]:
    """The parameters the model gives gradients (not, say, fixed RBF centres): one forward
    and backward on ``x, y``, with the buffers (batch-norm statistics) restored after."""
    buffers = {name: value.copy() for name, value in model.named_buffers()}
    for param in model.parameters():
        param.grad = None
    forward_backward(model, x, y)
    for name, value in model.named_buffers():
        value[...] = buffers[name]
    trainable = [p for p in model.parameters() if p.grad is not None]
    for param in model.parameters():
        param.grad = None
    return trainable


class GraphStep:
    """The device-driven training step of ``model`` with ``optimizer`` on ``split`` in
    batches of ``batch_size`` (``lr_of_step[s]``: the learning rate of global step ``s``;
    ``shift``, ``augment``: as the layers' ``train_epoch``), captured as a CUDA graph by
    :meth:`capture` (``kernels``: our kernels on the split's device) if ``captured``, else
    run eagerly at every batch."""

    def __init__(
        self, model: Module, optimizer: Optimizer, split: DeviceSplit, batch_size: int,
        lr_of_step: list[float], kernels: Kernels, shift: int = 0,
        augment: Augment | None = None, captured: bool = True,
    ) -> None:  # fmt: skip
        self.xp = xp = split.device.xp
        self.model, self.optimizer, self.split = model, optimizer, split
        self.batch_size, self.shift, self.kernels = batch_size, shift, kernels
        self.captured = captured
        self.augment = augment if augment is not None and not augment.is_identity else None
        self.clock = xp.zeros(4, xp.int64)
        self.lr_host = [float(lr) for lr in lr_of_step]
        self.lr_of_step = xp.asarray(self.lr_host, dtype=xp.float64)
        n = len(split)
        self.order = xp.zeros(n, xp.int64)
        self.shifts = xp.zeros((2, n), xp.int64) if shift else None
        self.epoch_key = xp.zeros(1, xp.uint64)  # --augment's key of this epoch
        self.loss_sum, self.correct = xp.zeros((), xp.float64), xp.zeros((), xp.int64)
        self.sums = (self.loss_sum, self.correct)  # what :meth:`compute` adds a step's to
        self.positions = xp.arange(batch_size, dtype=xp.int64)
        model.use_cuda_kernels(True)
        dropouts = [layer for layer in model.modules() if isinstance(layer, Dropout)]
        for stream, layer in enumerate(dropouts):
            layer.use_clock(self.clock, stream)
        x, y = split.images[:batch_size], split.labels[:batch_size]
        self.flat = FlatUpdate(
            optimizer, trainable_parameters(model, x, y), kernels, xp, self.clock,
            self.lr_of_step,
        )  # fmt: skip
        self.graph: Any = None
        self._pool: Any = None

    # -- an epoch ------------------------------------------------------------------------
    def begin_epoch(self, order: Any, shifts: Any, seed: int, epoch: int, done: int) -> None:
        """This epoch's permutation and shifts into the fixed device buffers, its augment key,
        the clock at ``done`` batches of it (the host's counts: no device read)."""
        self.order[...] = order
        if self.shifts is not None:
            self.shifts[...] = shifts
        if self.augment is not None:
            key = Distortion(self.augment, seed, epoch, BACKGROUND).key()
            self.epoch_key[...] = self.xp.asarray([key], dtype=self.xp.uint64)
        values = self.flat.clock_values()
        values[BATCH] = done
        self.clock[...] = self.xp.asarray(values, dtype=self.xp.int64)

    def batch(self, rows: int, start: int = 0) -> tuple[Any, Any]:
        """Rows ``start`` to ``start + rows`` of batch ``clock[BATCH]`` of the epoch's order,
        shifted and distorted: ``(x (rows, C, H, W), labels (rows,))``, all on the device."""
        xp, images = self.xp, self.split.images
        order = self.order[start:] if start else self.order
        x = xp.empty((rows, *images.shape[1:]), images.dtype)
        y = xp.empty(rows, xp.int64)
        self.kernels.gather_shift(
            images, self.split.labels, order, self.shifts, self.clock[BATCH:], x, y,
            BACKGROUND, self.batch_size,
        )  # fmt: skip
        if self.augment is not None:  # the images' indices: what their draws depend on
            ids = order.take(self.clock[BATCH] * self.batch_size + self.positions[:rows])
            x = Distortion(self.augment, 0, 0, BACKGROUND, self.epoch_key, self.kernels)(x, ids)
        return x, y

    def step(self, rows: int) -> None:
        """One training step on the next ``rows`` images, eagerly or into a capture."""
        self.compute(rows)
        self.update()

    def compute(self, rows: int, start: int = 0) -> None:
        """Forward, loss and backward of rows ``start`` to ``start + rows`` of the next batch,
        the loss and correct count added to :attr:`sums`, the gradients into ``flat.grad``."""
        x, y = self.batch(rows, start)
        model = self.model
        logits = model.forward(x)
        loss_fn = getattr(model, "loss_fn", None) or softmax_cross_entropy
        # one launch, the step's loss and correct count added to the sums
        _, grad = loss_fn(logits, y, kernels=self.kernels, sums=self.sums)
        model.backward(grad)
        self.flat.gather()

    def update(self) -> None:
        """The optimizer's and weight average's step from ``flat.grad``; ``clock += 1``."""
        self.flat.update()
        self.clock += 1

    def capture(self) -> None:
        """Capture :meth:`step` of a full batch as a CUDA graph (after an eager step has
        compiled every kernel); temporaries come from a pool kept with the graph."""
        cuda = self.xp.cuda
        pool = cuda.MemoryPool()
        stream = cuda.Stream(non_blocking=True)
        with stream, cuda.using_allocator(pool.malloc):
            stream.begin_capture()
            try:
                self.step(self.batch_size)
            except BaseException:
                # Leave capture mode but report the step's own error (CUDA's end_capture
                # would only say that the capture was invalidated).
                with contextlib.suppress(Exception):
                    stream.end_capture()
                raise
            graph = stream.end_capture()
        self.graph, self._pool, self._stream = graph, pool, stream

    def run(self, rows: int) -> None:
        """The next batch: a replay of the graph if it is a full one, else eager."""
        if rows == self.batch_size and self.graph is not None:
            self.graph.launch()
        else:
            self.step(rows)


def train_epoch_graph(
    step: GraphStep, rng: Any, global_step: int, bar: Any, epoch: int = 0,
    position: EpochPosition | None = None, keeper: Keeper | None = None,
    on_step: Callable[[], Any] | None = None,
) -> tuple[float, float, int]:  # fmt: skip
    """One epoch as the layers' ``train_epoch`` (the same order, shifts and distortion
    seed drawn from ``rng``, resumable at ``position``): ``(mean loss, accuracy, global
    step)``. The host reads the device only at the end and when ``keeper`` asks."""
    split, b = step.split, step.batch_size
    n = len(split)
    order = permutation(n, rng, split.device)
    shifts = random_shifts(n, step.shift, rng, split.device) if step.shift else None
    seed = int(rng.integers(2**62)) if step.augment is not None else 0
    done = position.batch if position is not None else 0
    step.begin_epoch(order, shifts, seed, epoch, done)
    step.loss_sum.fill(0)
    step.correct.fill(0)
    if position is not None:
        step.loss_sum += position.loss_sum
        step.correct += position.correct
        if bar is not None:
            bar.update(min(done * b, n))
    for batch in range(done + 1, -(-n // b) + 1):
        if global_step >= len(step.lr_host):
            raise ValueError(f"the run planned {len(step.lr_host)} steps; this is one more")
        rows = min(b, n - (batch - 1) * b)
        if step.captured and step.graph is None and rows == b:  # compile, then capture
            step.step(rows)
            step.capture()
        else:
            step.run(rows)
        step.flat.count_on_host(step.lr_host[global_step])
        global_step += 1
        if on_step is not None:
            on_step()
        if bar is not None:
            bar.update(rows)
        if keeper is not None:
            keeper.on_step(global_step, batch, step.loss_sum, step.correct)
    xp = step.xp  # one read of both sums
    loss_sum, correct = asnumpy(xp.stack([step.loss_sum, step.correct.astype(xp.float64)]))
    return float(loss_sum) / n, int(correct) / n, global_step
