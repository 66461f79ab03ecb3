"""The trained state as flat device buffers, updated by one kernel launch each: parameters,
gradients, the optimizer's state and the weight average (``--ema``).

The model's parameters, the optimizer's state arrays and the average's arrays become *views*
of these buffers, so checkpoints, evaluation and the array-op layers see the same numbers.
The update reads nothing from the host: the learning rate comes from a device table indexed
by a device clock (:class:`FlatUpdate`), so it can be captured in a CUDA graph and replayed.
The host keeps its own bookkeeping (step counts, ``optimizer.lr``) in step with
:meth:`FlatUpdate.count_on_host`, without reading the device.
"""

from __future__ import annotations

from typing import Any

from lenet_xp.kernels.ops import Kernels
from lenet_xp.layers.module import Parameter, flat_copy, flat_views
from lenet_xp.optim.optimizers import SGD, Adam, Optimizer

#: The device clock's entries (an ``int64`` array): global steps done (the learning rate's
#: index), batches done this epoch, the optimizer's updates done, the average's updates done.
STEP, BATCH, UPDATES, AVERAGED = 0, 1, 2, 3


def supports(optimizer: Optimizer) -> str | None:
    """Why :class:`FlatUpdate` cannot run ``optimizer`` (``None``: it can)."""
    if not isinstance(optimizer, SGD | Adam):
        return f"no flat-buffer kernel for {type(optimizer).__name__}"
    counts = {state.get("step", 0) for state in optimizer.state if state}
    if isinstance(optimizer, Adam) and len(counts) > 1:
        return "its parameters have different Adam step counts"
    return None


class FlatUpdate:
    """One optimizer step (and weight-average update) over flat buffers for the
    ``trainable`` parameters (those the model gives gradients) of ``optimizer``, by
    ``kernels``; ``xp``: the device's namespace. ``clock`` (``int64 (4,)``, device) and
    ``lr_of_step`` (``float64``, device): see :data:`STEP` and :meth:`step`."""

    def __init__(
        self, optimizer: Optimizer, trainable: list[Parameter], kernels: Kernels, xp: Any,
        clock: Any, lr_of_step: Any,
    ) -> None:  # fmt: skip
        reason = supports(optimizer)
        if reason:
            raise ValueError(reason)
        self.optimizer, self.kernels, self.xp = optimizer, kernels, xp
        self.clock, self.lr_of_step = clock, lr_of_step
        self.trainable = trainable
        indices = [optimizer.params.index(p) for p in trainable]
        self.indices = indices
        dtype = trainable[0].data.dtype
        size = sum(int(p.data.size) for p in trainable)
        self.param = xp.empty(size, dtype)
        data = flat_copy(trainable, [p.data for p in trainable], self.param)
        for param, view in zip(trainable, data, strict=True):
            param.data = view
        self.grad = xp.zeros(size, dtype)
        self.state = {name: self._state(name, size, dtype) for name in self._names()}
        self.first = -1  # SGD: the update at which the momentum buffer starts
        if isinstance(optimizer, SGD) and not optimizer.state[indices[0]]:
            self.first = optimizer.steps
        self.average = None
        if optimizer.average is not None:
            averages = optimizer.average.averages
            self.average = xp.empty(size, dtype)
            views = flat_copy(trainable, [averages[i] for i in indices], self.average)
            for i, view in zip(indices, views, strict=True):
                averages[i] = view

    def _names(self) -> tuple[str, ...]:
        if isinstance(self.optimizer, Adam):
            return ("exp_avg", "exp_avg_sq")
        return ("momentum_buffer",) if self.optimizer.momentum else ()

    def _state(self, name: str, size: int, dtype: Any) -> Any:
        """The flat buffer of state ``name``; each trainable parameter's entry a view of it
        (zeros where the optimizer had none yet: Adam's moments start at 0, SGD's buffer is
        set from the gradient at its first update)."""
        flat = self.xp.zeros(size, dtype)
        views = flat_views(self.trainable, flat)
        for i, view in zip(self.indices, views, strict=True):
            state = self.optimizer.state[i]
            if name in state:
                view[...] = state[name]
            state[name] = view
            if isinstance(self.optimizer, Adam):
                state.setdefault("step", 0)
        return flat

    def step(self) -> None:
        """:meth:`gather` the gradients, then :meth:`update`."""
        self.gather()
        self.update()

    def gather(self) -> None:
        """The parameters' gradients into the flat buffer ``grad`` (one launch)."""
        self.xp.concatenate([p.grad.reshape(-1) for p in self.trainable], out=self.grad)

    def update(self) -> None:
        """The optimizer's step from ``grad`` (one launch) and the weight average's (one
        more), at learning rate ``lr_of_step[clock[STEP]]``. Does not advance the clock."""
        k, opt = self.kernels, self.optimizer
        if isinstance(opt, Adam):
            m, v = self.state["exp_avg"], self.state["exp_avg_sq"]
            k.adam_flat(
                self.param, self.grad, m, v, self.lr_of_step, self.clock, opt.betas, opt.eps,
                opt.weight_decay, opt._decoupled,
            )  # fmt: skip
        else:
            k.sgd_flat(
                self.param, self.grad, self.state.get("momentum_buffer"), self.lr_of_step,
                self.clock, opt.momentum, opt.dampening, opt.weight_decay, opt.nesterov,
                self.first,
            )  # fmt: skip
        if self.average is not None:
            k.ema_flat(self.average, self.param, self.clock, opt.average.decay)

    def count_on_host(self, lr: float) -> None:
        """What :meth:`Optimizer.step` counts on the host, for one device step at ``lr``:
        the step, Adam's per-parameter steps, the average's updates (no device read)."""
        opt = self.optimizer
        opt.lr = lr
        opt.steps += 1
        if isinstance(opt, Adam):
            for i in self.indices:
                opt.state[i]["step"] += 1
        if opt.average is not None:
            opt.average.updates += 1

    def clock_values(self) -> list[int]:
        """The clock's values for the host's counts now (batch 0): what :data:`STEP` says."""
        opt = self.optimizer
        updates = opt.state[self.indices[0]].get("step", opt.steps)
        if isinstance(opt, SGD):
            updates = opt.steps
        averaged = opt.average.updates if opt.average is not None else 0
        return [opt.steps, 0, updates, averaged]
