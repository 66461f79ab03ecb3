"""How a training step runs: an *engine*, chosen by ``train --engine NAME``.

- ``layers``: the array-op layers (:mod:`lenet_xp.layers`), in this process, or on the CPU
  split over ``workers`` processes (:class:`~lenet_xp.training.parallel.DataParallel`);
- ``kernels`` (CUDA): the same layers with our CUDA kernels behind their ops (im2col,
  col2im, the loss with its running sums, the batch gather, one launch for the optimizer
  and one for the weight average) and adjacent layers fused (:mod:`lenet_xp.layers.fusion`),
  every host value on the device (:mod:`.graph`), run eagerly;
- ``graph`` (CUDA): that step captured once as a CUDA graph and replayed per batch.

Any network, optimizer (SGD, Nesterov, Adam, AdamW) and dtype runs on each; on the CPU every
engine is the layers.

Every engine trains an epoch with the same call (:meth:`Engine.train_epoch`) and evaluates
with the layers; :func:`make_engine` builds the one a run asks for, or says in one line why
the layers train instead. Which GPU kernels run is decided here, per model and optimizer, and
passed down: no process-wide switch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lenet_xp.data.augment import Augment, Distortion
from lenet_xp.data.device_split import DeviceSplit, permutation, random_shifts
from lenet_xp.data.mnist import BACKGROUND
from lenet_xp.kernels import record_fallback
from lenet_xp.kernels.ops import gpu_kernels
from lenet_xp.optim.optimizers import Optimizer
from lenet_xp.training.evaluation import evaluate
from lenet_xp.training.flat import supports as flat_supports
from lenet_xp.training.graph import GraphStep, train_epoch_graph
from lenet_xp.training.parallel import DataParallel
from lenet_xp.training.resume import EpochPosition, Keeper

ENGINES = ("layers", "kernels", "graph")


def train_epoch(
    runner: DataParallel,
    optimizer: Optimizer,
    schedule: Any,
    split: DeviceSplit,
    batch_size: int,
    rng: Any,
    step: int,
    bar: Any,
    max_shift: int = 0,
    augment: Any = None,
    epoch: int = 0,
    on_step: Any = None,
    position: EpochPosition | None = None,
    keeper: Keeper | None = None,
) -> tuple[float, float, int]:
    """One pass in a fresh random order, images randomly translated by up to ``max_shift``
    pixels and distorted as ``augment`` (an :class:`~lenet_xp.data.augment.Augment`; its draws
    depend on the run's seed, the ``epoch`` and each image, not on the device); ``on_step()``
    after each optimizer step, if given. ``position``: resume this epoch there (``rng`` as
    at the epoch's start); ``keeper.on_step`` after each step (mid-epoch checkpoints, stop
    requests, divergence). Returns ``(mean loss, accuracy, global step)``."""
    xp = split.device.xp
    runner.train()
    loss_sum = xp.zeros((), dtype=xp.float64)
    correct = xp.zeros((), dtype=xp.int64)
    done = position.batch if position is not None else 0
    if position is not None:  # the sums of the batches done before the run stopped
        loss_sum += position.loss_sum
        correct += position.correct
        if bar is not None:
            bar.update(min(done * batch_size, len(split)))
    order = permutation(len(split), rng, split.device)
    shifts = random_shifts(len(split), max_shift, rng, split.device) if max_shift else None
    distortion, ids, next_ids = None, None, None
    if augment is not None and not augment.is_identity:
        seed = int(rng.integers(2**62))  # from the run's generator: resumable, device-free
        distortion = Distortion(augment, seed, epoch, BACKGROUND)
    batches = split.batches(batch_size, order, shifts, max_shift, done, runner.batch_buffer)
    for batch, (x, y) in enumerate(batches, done + 1):
        optimizer.lr = schedule(step)
        if distortion is not None:  # the images' indices: what their random draws depend on
            ids = order[(batch - 1) * batch_size : batch * batch_size]
            next_ids = order[batch * batch_size : (batch + 1) * batch_size]
        loss, n_correct = runner.forward_backward(x, y, distortion, ids, next_ids)
        optimizer.step()
        if on_step is not None:
            on_step()
        step += 1
        loss_sum += loss * y.shape[0]
        correct += n_correct
        if bar is not None:
            bar.update(int(y.shape[0]))
            if split.device.kind == "cpu" and step % 20 == 0:  # free on the CPU; a sync on a GPU
                bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
        if keeper is not None:
            keeper.on_step(step, batch, loss_sum, correct)
    n = len(split)
    return float(loss_sum) / n, int(correct) / n, step


class Engine:
    """A way of running training steps for one run: :meth:`train_epoch` trains one pass,
    :meth:`evaluate` tests with the layers, :meth:`close` frees what it holds (worker
    processes). ``name`` is what the run's metrics record as ``"engine"``."""

    name = "layers"

    def __init__(self, runner: DataParallel) -> None:
        self.runner = runner

    def train_epoch(
        self, rng: Any, step: int, bar: Any, epoch: int = 0,
        position: EpochPosition | None = None, keeper: Keeper | None = None,
        on_step: Callable[[], Any] | None = None,
    ) -> tuple[float, float, int]:  # fmt: skip
        """One pass over the training split in a fresh random order drawn from ``rng`` (from
        global step ``step``; ``bar``: a progress bar or ``None``): ``(mean loss, accuracy,
        global step)``. ``position``, ``keeper``, ``on_step``: as :func:`train_epoch`'s."""
        raise NotImplementedError

    def evaluate(self, split: DeviceSplit, batch_size: int) -> tuple[float, float, Any]:
        """``(mean loss, accuracy, confusion)`` of the model on ``split``
        (:func:`~lenet_xp.training.evaluation.evaluate`)."""
        return evaluate(self.runner, split, batch_size)

    def close(self) -> None:
        self.runner.close()


class LayersEngine(Engine):
    """The array-op layers (in worker processes on the CPU if the runner has them)."""

    def __init__(
        self, runner: DataParallel, optimizer: Optimizer, schedule: Any, split: DeviceSplit,
        batch_size: int, shift: int = 0, augment: Augment | None = None,
    ) -> None:  # fmt: skip
        super().__init__(runner)
        self.optimizer, self.schedule, self.split = optimizer, schedule, split
        self.batch_size, self.shift, self.augment = batch_size, shift, augment

    def train_epoch(
        self, rng: Any, step: int, bar: Any, epoch: int = 0,
        position: EpochPosition | None = None, keeper: Keeper | None = None,
        on_step: Callable[[], Any] | None = None,
    ) -> tuple[float, float, int]:  # fmt: skip
        return train_epoch(
            self.runner, self.optimizer, self.schedule, self.split, self.batch_size, rng, step,
            bar, self.shift, self.augment, epoch, on_step=on_step, position=position,
            keeper=keeper,
        )  # fmt: skip


class GraphEngine(Engine):
    """The layers' step with every host value on the device (:mod:`.graph`): captured once
    as a CUDA graph and replayed per batch (``graph``), or run eagerly (``kernels``); it
    resumes and saves inside an epoch as the layers do."""

    def __init__(self, runner: DataParallel, step: GraphStep) -> None:
        super().__init__(runner)
        self.step = step
        self.name = "graph" if step.captured else "kernels"

    def train_epoch(
        self, rng: Any, step: int, bar: Any, epoch: int = 0,
        position: EpochPosition | None = None, keeper: Keeper | None = None,
        on_step: Callable[[], Any] | None = None,
    ) -> tuple[float, float, int]:  # fmt: skip
        self.runner.train()
        return train_epoch_graph(self.step, rng, step, bar, epoch, position, keeper, on_step)


def make_engine(
    name: str, model: Any, optimizer: Optimizer, split: DeviceSplit, batch_size: int,
    schedule: Any, *, total_steps: int, shift: int = 0, augment: Augment | None = None,
    workers: int = 1, max_batch: int = 2048, position: EpochPosition | None = None,
    stop_requested: Callable[[], int | None] | None = None, tune_allocator: bool = True,
    note: Callable[[str], Any] = lambda line: None,
) -> Engine:  # fmt: skip
    """The engine ``name`` (one of :data:`ENGINES`) for training ``model`` with ``optimizer``
    on ``split`` (on its device) as far as it can run here, else the layers, with one
    ``note(line)`` saying why. ``total_steps``: the run's steps (the GPU step's learning
    rates are planned on the device for all of them); ``shift``, ``augment``: as
    :func:`train_epoch`'s; ``workers``: CPU processes for the layers (1 on a GPU);
    ``position``: unused (every engine resumes inside an epoch through ``train_epoch``)."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; one of {', '.join(ENGINES)}")
    on_gpu = split.device.kind == "cuda"
    ours = name != "layers" and on_gpu  # which GPU kernels run: the engine's and device's call
    model.use_cuda_kernels(ours)
    optimizer.cuda_kernels = ours
    runner = DataParallel(
        model, workers if not on_gpu else 1, max_batch, tune_allocator=tune_allocator,
        stop_requested=stop_requested,
    )  # fmt: skip
    optimizer.flat = runner.flat  # the CPU's shared flat buffers, if any: one update for all
    layers = LayersEngine(runner, optimizer, schedule, split, batch_size, shift, augment)
    if name == "layers":
        return layers
    if not on_gpu:
        if name == "graph":
            note(f"--engine graph applies to CUDA devices; training on {split.device}")
        return layers
    why = flat_supports(optimizer)
    if why is None:
        try:
            lr_of_step = [schedule(s) for s in range(total_steps)]
            graph_step = GraphStep(
                model, optimizer, split, batch_size, lr_of_step, gpu_kernels(split.device.xp),
                shift, augment, captured=name == "graph",
            )  # fmt: skip
            return GraphEngine(runner, graph_step)
        except Exception as exc:  # a kernel that does not compile or load: the layers train
            record_fallback("graph step", " ".join(str(exc).split())[:300])
            why = f"our kernels failed here ({type(exc).__name__}); see the line above"
    note(f"training with the array-op layers: {why}")
    return layers
