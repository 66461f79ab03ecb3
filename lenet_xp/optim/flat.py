"""An optimizer's update over flat buffers: one update for all the parameters instead of one
per parameter, where their arrays already are views of one flat buffer each (the CPU's
``--workers`` processes share the parameters and the combined gradient that way:
:class:`~lenet_xp.training.parallel.DataParallel`).

The update is the optimizer's own per-parameter one (:meth:`Optimizer._update`), called once
on the flat arrays: every update is elementwise, so it gives the same bits as one call per
parameter, in a tenth of the calls (Adam: one compiled loop, :mod:`lenet_xp.native.optim`).
The optimizer's state becomes flat too: each parameter's state arrays are views of it, so
checkpoints see the same numbers, and a state loaded from a checkpoint is copied into it; and
so does the weight average (``--ema``), updated in one go as well.
"""

from __future__ import annotations

from typing import Any

from lenet_xp.backend import get_array_module
from lenet_xp.layers.module import flat_copy, flat_views
from lenet_xp.optim.averaging import ema_update


class FlatBuffers:
    """The flat ``data`` and ``grad`` (1-D, one dtype) that an optimizer's parameters and
    gradients are views of: ``data_views[i]``, ``grad_views[i]`` for ``optimizer.params[i]``
    (the view objects themselves: a parameter whose ``data`` or ``grad`` is another array is
    updated on its own)."""

    def __init__(self, data: Any, grad: Any, data_views: list[Any], grad_views: list[Any]) -> None:
        self.data, self.grad = data, grad
        self.data_views, self.grad_views = data_views, grad_views
        self.state: dict[str, Any] = {}  # the optimizer's state of the flat "parameter"
        self.state_views: list[dict[str, Any]] = []  # per parameter: name -> view of it
        self.average_flat: Any = None  # the weight average's, if any (:meth:`average`)
        self.average_views: list[Any] = []

    def step(self, optimizer: Any) -> bool:
        """``optimizer``'s update of every parameter as one update of the flat buffers, if
        every parameter is a view of them with its gradient set and the state allows (its
        parameters all had as many updates): whether it ran (else nothing changed)."""
        if not self._views(optimizer.params, grads=True):
            return False
        if not self._state_is_flat(optimizer) and not self._flatten_state(optimizer):
            return False
        optimizer._update(self.data, self.grad, self.state)
        if not self.state_views:  # its first update: each parameter's state is a view of it
            self._share_state(optimizer)
        for state in optimizer.state:
            for name in optimizer._count_state:
                state[name] = self.state[name]
        return True

    def average(self, ema: Any, decay: float) -> bool:
        """The weight average ``ema``'s update (:class:`~lenet_xp.optim.averaging.ParameterEMA`,
        at ``decay``) as one update of a flat average, if its parameters are views of
        :attr:`data`: whether it ran. The averages become views of the flat one (copied in
        first, and again after a checkpoint's load replaced them)."""
        if not self._views(ema.params, grads=False):
            return False
        views = self.average_views
        if len(views) != len(ema.averages) or any(
            a is not v for a, v in zip(ema.averages, views, strict=True)
        ):
            self.average_flat = get_array_module(self.data).empty_like(self.data)
            ema.averages = self.average_views = flat_copy(
                ema.params, ema.averages, self.average_flat
            )
        ema_update(self.average_flat, self.data, decay)
        return True

    def release(self) -> None:
        """Forget the buffers (shared memory about to be freed): no more flat updates. The
        state stays (the parameters' state arrays are views of it)."""
        self.data = self.grad = None
        self.data_views, self.grad_views = [], []

    def _views(self, params: list, grads: bool) -> bool:
        """Whether ``params``' ``data`` (and, with ``grads``, their ``grad``) are our views."""
        if len(params) != len(self.data_views):
            return False
        for param, data, grad in zip(params, self.data_views, self.grad_views, strict=True):
            if param.data is not data or (grads and param.grad is not grad):
                return False
        return True

    def _state_is_flat(self, optimizer: Any) -> bool:
        """Whether each parameter's state arrays are still our views (a checkpoint's load
        replaces them) and its counts ours."""
        if not self.state_views:
            return not any(optimizer.state)
        counts = [(name, self.state[name]) for name in optimizer._count_state]
        for state, views in zip(optimizer.state, self.state_views, strict=True):
            for name, view in views.items():  # plain loops: this runs every step
                if state.get(name) is not view:
                    return False
            for name, count in counts:
                if state.get(name) != count:
                    return False
        return True

    def _flatten_state(self, optimizer: Any) -> bool:
        """Take over per-parameter state (a loaded checkpoint's) into the flat buffers, when
        every parameter has it with the same counts: whether it could."""
        states = optimizer.state
        if not all(states) or any(
            state[name] != states[0][name] for state in states for name in optimizer._count_state
        ):
            return False
        xp = get_array_module(self.data)
        names = [name for name in optimizer._array_state if name in states[0]]
        flat = {name: xp.empty_like(self.data) for name in names}
        for name, array in flat.items():
            flat_copy(optimizer.params, [state[name] for state in states], array)
        self.state = {**flat, **{name: states[0][name] for name in optimizer._count_state}}
        self._share_state(optimizer)
        return True

    def _share_state(self, optimizer: Any) -> None:
        """Make each parameter's state arrays views of the flat ones (its counts copied)."""
        names = [name for name in optimizer._array_state if name in self.state]
        per_name = {name: flat_views(optimizer.params, self.state[name]) for name in names}
        self.state_views = []
        for i, state in enumerate(optimizer.state):
            views = {name: per_name[name][i] for name in per_name}
            state.update(views)
            state.update({name: self.state[name] for name in optimizer._count_state})
            self.state_views.append(views)
