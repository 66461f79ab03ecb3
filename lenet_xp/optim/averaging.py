"""Weight averaging: an exponential moving average of the parameters (Polyak averaging).

The averaged weights change slowly, so the network they make is steadier from epoch to epoch
than the trained one (whose last steps jitter with the batches); evaluating and keeping the
average is what ``torch.optim.swa_utils.AveragedModel`` with an EMA rule and Keras's
``use_ema`` do. The average lives next to the parameters (same device, dtype and shapes) and
is updated in place after every optimizer step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from lenet_xp import native
from lenet_xp.backend import device_of, get_array_module, to_device
from lenet_xp.layers.module import Module, Parameter
from lenet_xp.native import optim as native_optim

#: Where an optimizer's state dict keeps its weight average: ``"ema.<key>"`` for each key of
#: :meth:`ParameterEMA.state_dict` (``"ema.<i>"``: the average of the i-th parameter).
STATE_PREFIX = "ema."


def ema_update(average: Any, data: Any, decay: float) -> None:
    """``average += (1 - decay) * (data - average)`` in place (one compiled loop on the CPU:
    the same bits)."""
    if native.fits(average, data):
        native_optim.ema(average, data, decay)
    else:
        average += (1.0 - decay) * (data - average)  # a Python float keeps float32


class ParameterEMA:
    """``average = d * average + (1 - d) * param`` after each step, with
    ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates (a short memory at first, so the
    random initial weights are soon forgotten)."""

    def __init__(self, params: Iterable[Parameter], decay: float = 0.999) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"invalid EMA decay {decay}: must be between 0 and 1")
        self.params = list(params)
        self.decay = float(decay)
        self.updates = 0
        self.averages = [p.data.copy() for p in self.params]

    def update(self, flat: Any = None) -> None:
        """Move each average towards its parameter (in place, on the parameter's device);
        ``flat``: the :class:`~lenet_xp.optim.flat.FlatBuffers` the parameters may be views
        of, to move all the averages in one go (:meth:`FlatBuffers.average`)."""
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        if flat is None or not flat.average(self, d):
            for average, param in zip(self.averages, self.params, strict=True):
                ema_update(average, param.data, d)
        self.updates += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside, the parameters hold the averages (in place, so views such as the worker
        processes' shared buffers see them); the trained values come back on exit."""
        trained = [p.data.copy() for p in self.params]
        try:
            for average, param in zip(self.averages, self.params, strict=True):
                param.data[...] = average
            yield
        finally:
            for kept, param in zip(trained, self.params, strict=True):
                param.data[...] = kept

    def state_dict(self) -> dict[str, Any]:
        """``{"decay", "updates", "<i>": average of params[i]}`` (copies)."""
        state: dict[str, Any] = {"decay": self.decay, "updates": self.updates}
        state.update({str(i): a.copy() for i, a in enumerate(self.averages)})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; ``ValueError`` if it does not fit."""
        if float(state.get("decay", -1)) != self.decay:
            raise ValueError(f"EMA state has decay {state.get('decay')}, not {self.decay}")
        averages = []
        for i, param in enumerate(self.params):
            value = state.get(str(i))
            if value is None or tuple(value.shape) != tuple(param.data.shape):
                raise ValueError(f"EMA state for parameter {i} is missing or mis-shaped")
            copy = get_array_module(param.data).empty_like(param.data)
            copy[...] = to_device(value, device_of(param.data))
            averages.append(copy)
        self.averages, self.updates = averages, int(state["updates"])


def averaged_state(model: Module, model_state: dict, optim_state: dict) -> dict:
    """``model_state`` with ``model``'s parameters replaced by the weight average a checkpoint's
    optimizer state holds (``"ema.<i>"`` for the i-th of ``model.parameters()``), if it holds
    one: a run trained with ``--ema`` tested, and chose ``best.npz`` by, the averaged network,
    so that is the network to evaluate, predict with and export."""
    if f"{STATE_PREFIX}0" not in optim_state:
        return model_state
    names = [name for name, _ in model.named_parameters()]
    averages = {name: optim_state.get(f"{STATE_PREFIX}{i}") for i, name in enumerate(names)}
    missing = [name for name, value in averages.items() if value is None]
    if missing:
        raise ValueError(f"its weight average lacks {', '.join(missing)}")
    return model_state | averages
