"""The base of the optimizers (:mod:`lenet_xp.optim.optimizers`), with ``torch.optim``'s
semantics: the parameters, the learning rate, the step over every parameter with a gradient,
and the state as a flat dict for checkpoints.

Every update is done in place on ``param.data`` with the array namespace of that array
(NumPy or CuPy), so parameters keep their identity, device and dtype: float32 stays
float32 because only Python floats ever meet the arrays. Parameters whose ``grad`` is
``None`` are skipped, as in PyTorch.

State is plain arrays and numbers in a flat dict (see :meth:`Optimizer.state_dict`), so a
checkpoint can hold it next to the model's own ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lenet_xp.backend import device_of, get_array_module, to_device
from lenet_xp.layers.module import Parameter
from lenet_xp.optim.averaging import STATE_PREFIX, ParameterEMA
from lenet_xp.optim.flat import FlatBuffers


class Optimizer:
    """Base class: holds the parameters, the learning rate ``lr`` and the step counter.

    Subclasses implement :meth:`_update` for one parameter and name the per-parameter
    state they keep in ``_array_state`` (arrays shaped like the parameter) and
    ``_count_state`` (ints).
    """

    _array_state: tuple[str, ...] = ()
    _count_state: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Parameter], lr: float) -> None:
        self.params: list[Parameter] = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        for index, param in enumerate(self.params):
            if not isinstance(param, Parameter):
                raise TypeError(f"params[{index}] is a {type(param).__name__}, not a Parameter")
        self.lr = lr
        self.steps = 0
        # One dict per parameter: name -> array (or int); empty until its first update.
        self.state: list[dict[str, Any]] = [{} for _ in self.params]
        #: Weight averaging (``train --ema``; Keras's ``use_ema``): updated after every step,
        #: saved and restored with the rest of the state.
        self.average: ParameterEMA | None = None
        #: On a GPU, whether updates run as our fused CUDA kernel (where the optimizer has
        #: one: Adam) rather than array ops; the training engine sets it.
        self.cuda_kernels = False
        #: Where the parameters and their gradients are views of flat buffers (the CPU's
        #: worker processes share them so), :meth:`step` updates them in one go.
        self.flat: FlatBuffers | None = None

    @property
    def lr(self) -> float:
        """Learning rate used by the next :meth:`step` (a schedule may set it every step)."""
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        value = float(value)  # a Python float keeps float32 arrays float32
        if not value >= 0.0:
            raise ValueError(f"invalid learning rate {value}: must be >= 0")
        self._lr = value

    def hyperparameters(self) -> dict[str, float | int]:
        """The settings (other than ``lr``) that give the state its meaning."""
        return {}

    def zero_grad(self) -> None:
        """Forget every gradient (``param.grad = None``); such parameters are not updated."""
        for param in self.params:
            param.grad = None

    def step(self) -> None:
        """Update every parameter that has a gradient, in place; then ``steps += 1``."""
        if self.flat is None or not self.flat.step(self):
            for param, state in zip(self.params, self.state, strict=True):
                if param.grad is None:
                    continue
                if tuple(param.grad.shape) != tuple(param.data.shape):
                    raise ValueError(
                        f"gradient shape {tuple(param.grad.shape)} does not match "
                        f"parameter shape {tuple(param.data.shape)}"
                    )
                self._update(param.data, param.grad, state)
        self.steps += 1
        if self.average is not None:
            self.average.update(self.flat)

    def _update(self, data: Any, grad: Any, state: dict[str, Any]) -> None:
        raise NotImplementedError

    # -- checkpointing -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Flat, NumPy-savable state: ``type``, ``steps``, ``lr``, the hyperparameters and
        ``"<name>.<i>"`` for state ``name`` of ``params[i]`` (copies of the arrays, on the
        parameter's device and dtype; absent before that parameter's first update), and
        ``"ema.<key>"`` for the weight average's state if there is one."""
        flat: dict[str, Any] = {"type": type(self).__name__, "steps": self.steps, "lr": self.lr}
        flat.update(self.hyperparameters())
        for index, state in enumerate(self.state):
            for name, value in state.items():
                flat[f"{name}.{index}"] = value.copy() if name in self._array_state else value
        if self.average is not None:
            average = self.average.state_dict()
            flat.update({f"{STATE_PREFIX}{k}": v for k, v in average.items()})
        return flat

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (also after a NumPy save/load round trip).

        Arrays are copied onto each parameter's device and dtype. Raises ``ValueError``
        (and changes nothing) when the optimizer type, a hyperparameter, a key or a
        shape does not match this optimizer.
        """
        prefix = len(STATE_PREFIX)
        averaged = {k[prefix:]: v for k, v in state.items() if k.startswith(STATE_PREFIX)}
        state = {k: v for k, v in state.items() if not k.startswith(STATE_PREFIX)}
        if bool(averaged) != (self.average is not None):
            saved, this = ("holds one", "keeps none") if averaged else ("holds none", "keeps one")
            raise ValueError(
                f"optimizer state_dict {saved} of a weight average (--ema); this optimizer {this}"
            )
        scalar_keys = self._check_scalars(state)
        per_param = self._per_param_state({k: v for k, v in state.items() if k not in scalar_keys})
        if self.average is not None:
            self.average.load_state_dict(averaged)  # checks before it changes anything
        self.state = per_param
        self.steps = int(state["steps"])
        self.lr = float(state["lr"])

    def _check_scalars(self, state: dict[str, Any]) -> set[str]:
        """Check a state_dict's type and hyperparameters against this optimizer's: the keys
        that are not per-parameter state."""
        saved_type = str(state.get("type"))
        if saved_type != type(self).__name__:
            raise ValueError(f"optimizer state_dict is for {saved_type}, not {type(self).__name__}")
        scalar_keys = {"type", "steps", "lr", *self.hyperparameters()}
        missing = sorted(scalar_keys - set(state))
        if missing:
            raise ValueError(f"optimizer state_dict is missing keys {missing}")
        for name, value in self.hyperparameters().items():
            if float(state[name]) != float(value):
                raise ValueError(
                    f"optimizer state_dict has {name}={float(state[name])}, "
                    f"but this {type(self).__name__} has {name}={value}"
                )
        return scalar_keys

    def _per_param_state(self, arrays: dict[str, Any]) -> list[dict[str, Any]]:
        """``"<name>.<i>"`` entries as one dict per parameter, arrays copied onto each
        parameter's device and dtype; every parameter has all of its state or none."""
        per_param: list[dict[str, Any]] = [{} for _ in self.params]
        for key, value in arrays.items():
            name, _, index_text = key.rpartition(".")
            if name not in self._array_state + self._count_state or not index_text.isdigit():
                raise ValueError(f"unexpected key {key!r} in {type(self).__name__} state_dict")
            index = int(index_text)
            if index >= len(self.params):
                raise ValueError(
                    f"state_dict key {key!r} is for parameter {index}, "
                    f"but this optimizer has {len(self.params)} parameters"
                )
            if name in self._count_state:
                per_param[index][name] = int(value)
                continue
            data = self.params[index].data
            if tuple(value.shape) != tuple(data.shape):
                raise ValueError(
                    f"state_dict[{key!r}] has shape {tuple(value.shape)}, "
                    f"expected {tuple(data.shape)}"
                )
            copy = get_array_module(data).empty_like(data)
            copy[...] = to_device(value, device_of(data))
            per_param[index][name] = copy
        expected = set(self._array_state + self._count_state)
        for index, found in enumerate(per_param):
            if found and set(found) != expected:
                raise ValueError(
                    f"state_dict has {sorted(found)} for parameter {index}, "
                    f"expected all of {sorted(expected)} or none"
                )
        return per_param


def check_non_negative(**values: float) -> None:
    """``ValueError`` naming the first of ``values`` (name -> number) that is negative or NaN."""
    for name, value in values.items():
        if not value >= 0.0:
            raise ValueError(f"invalid {name} {value}: must be >= 0")
