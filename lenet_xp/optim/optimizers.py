"""Optimizers with ``torch.optim`` semantics: SGD (momentum, Nesterov), Adam and AdamW, and
:func:`make_optimizer`, which builds one by name. What they share (the parameters, the
learning rate, the step, the state for checkpoints) is their base,
:class:`lenet_xp.optim.optimizer.Optimizer`, importable from here too.

Every update is done in place on ``param.data`` with the array namespace of that array
(NumPy or CuPy), so parameters keep their identity, device and dtype: float32 stays
float32 because only Python floats ever meet the arrays.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

from lenet_xp import kernels, native
from lenet_xp.backend import cuda_elementwise, get_array_module, is_gpu
from lenet_xp.kernels import record_fallback
from lenet_xp.layers.module import Parameter
from lenet_xp.native import optim as native_optim
from lenet_xp.optim.averaging import ParameterEMA
from lenet_xp.optim.optimizer import Optimizer, check_non_negative

__all__ = ["OPTIMIZERS", "SGD", "Adam", "AdamW", "Optimizer", "make_optimizer"]


class SGD(Optimizer):
    """``torch.optim.SGD``: with ``g = grad + weight_decay * p``,

    ``buf = g`` at the first step, then ``buf = momentum * buf + (1 - dampening) * g``;
    the direction is ``g + momentum * buf`` (Nesterov) or ``buf`` (or ``g`` without
    momentum), and ``p -= lr * direction``. State: ``momentum_buffer`` (like ``p``).
    """

    _array_state = ("momentum_buffer",)

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        dampening: float = 0.0,
    ) -> None:
        super().__init__(params, lr)
        check_non_negative(momentum=momentum, weight_decay=weight_decay, dampening=dampening)
        if nesterov and (momentum <= 0.0 or dampening != 0.0):
            raise ValueError("Nesterov momentum requires momentum > 0 and dampening = 0")
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.weight_decay = float(weight_decay)
        self.dampening = float(dampening)

    def hyperparameters(self) -> dict[str, float | int]:
        return {
            "momentum": self.momentum,
            "nesterov": int(self.nesterov),
            "weight_decay": self.weight_decay,
            "dampening": self.dampening,
        }

    def _update(self, data: Any, grad: Any, state: dict[str, Any]) -> None:
        xp = get_array_module(data)
        if self.weight_decay:
            grad = grad + self.weight_decay * data  # a new array: p.grad is left as it was
        if self.momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = xp.empty_like(data)
                buf[...] = grad
            else:
                buf *= self.momentum
                buf += grad if self.dampening == 0.0 else (1.0 - self.dampening) * grad
            grad = grad + self.momentum * buf if self.nesterov else buf
        data -= self.lr * grad


class Adam(Optimizer):
    """``torch.optim.Adam`` (no amsgrad): with ``g = grad + weight_decay * p`` and ``t``
    the parameter's step count (from 1),

    ``m = beta1 * m + (1 - beta1) * g``, ``v = beta2 * v + (1 - beta2) * g * g``,
    ``p -= lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)``.
    State: ``exp_avg`` (m) and ``exp_avg_sq`` (v), like ``p``, and ``step`` (t, an int).
    """

    _array_state = ("exp_avg", "exp_avg_sq")
    _count_state = ("step",)
    _decoupled = False

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, lr)
        beta1, beta2 = (float(beta) for beta in betas)
        for index, beta in enumerate((beta1, beta2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"invalid beta parameter at index {index}: {beta} not in [0, 1)")
        check_non_negative(eps=eps, weight_decay=weight_decay)
        self.betas = (beta1, beta2)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)

    def hyperparameters(self) -> dict[str, float | int]:
        beta1, beta2 = self.betas
        return {"beta1": beta1, "beta2": beta2, "eps": self.eps, "weight_decay": self.weight_decay}

    def _update(self, data: Any, grad: Any, state: dict[str, Any]) -> None:
        xp = get_array_module(data)
        beta1, beta2 = self.betas
        if not state:
            state["step"] = 0
            state["exp_avg"] = xp.zeros_like(data)
            state["exp_avg_sq"] = xp.zeros_like(data)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        compiled = native.fits(data, grad, exp_avg, exp_avg_sq)
        l2 = 0.0 if self._decoupled else self.weight_decay  # added to the gradient
        if self.weight_decay:
            if self._decoupled:
                data *= 1.0 - self.lr * self.weight_decay
            elif not compiled:
                grad = grad + self.weight_decay * data
        state["step"] += 1
        step = state["step"]

        step_size = self.lr / (1.0 - beta1**step)
        bias2_sqrt = math.sqrt(1.0 - beta2**step)
        if compiled:  # one compiled loop: the same operations, the same bits
            native_optim.adam(
                data, grad, exp_avg, exp_avg_sq, self.betas, bias2_sqrt, self.eps, step_size, l2
            )
            return
        if (
            is_gpu(xp)
            and self.cuda_kernels
            and _fused_adam_on_gpu(
                grad, beta1, beta2, step_size, bias2_sqrt, self.eps, data, exp_avg, exp_avg_sq
            )
        ):
            return
        exp_avg *= beta1
        exp_avg += (1.0 - beta1) * grad
        exp_avg_sq *= beta2
        exp_avg_sq += (1.0 - beta2) * grad * grad
        denom = xp.sqrt(exp_avg_sq)  # the one scratch array of the update
        denom /= bias2_sqrt
        denom += self.eps
        xp.divide(exp_avg, denom, out=denom)
        denom *= step_size
        data -= denom


@functools.cache
def _adam_kernel() -> Any:
    """The whole Adam update of one parameter as one CUDA kernel (the same formulas as the
    array code in :meth:`Adam._update`, which needs a dozen launches)."""
    return cuda_elementwise(
        "T grad, T beta1, T beta2, T step_size, T bias2_sqrt, T eps",
        "T param, T m, T v",
        """
        m = beta1 * m + (1 - beta1) * grad;
        v = beta2 * v + (1 - beta2) * grad * grad;
        param -= step_size * m / (sqrt(v) / bias2_sqrt + eps);
        """,
        "lenet_xp_adam",
    )


def _fused_adam_on_gpu(*args: Any) -> bool:
    """Run :func:`_adam_kernel`; ``False`` if it cannot be compiled or launched here, so the
    caller falls back to the array code. The failure is recorded (one line on stderr, and in
    :func:`lenet_xp.kernels.fallbacks`, which the tests check) and not retried."""
    if kernels.fell_back("adam"):
        return False
    try:
        _adam_kernel()(*args)
    except Exception as exc:  # a compiler or driver problem: keep training, say so once
        record_fallback("adam", " ".join(f"{type(exc).__name__}: {exc}".split()))
        return False
    return True


class AdamW(Adam):
    """``torch.optim.AdamW``: decoupled weight decay ``p *= 1 - lr * weight_decay``, then
    the :class:`Adam` step with the raw gradient."""

    _decoupled = True

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params, lr, betas=betas, eps=eps, weight_decay=weight_decay)


OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")


def make_optimizer(
    name: str,
    params: Iterable[Parameter],
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    ema: float | None = None,
) -> Optimizer:
    """Build an optimizer by name: ``sgd`` (SGD with ``momentum``; 0 gives plain SGD),
    ``nesterov`` (SGD with Nesterov ``momentum``), ``adam`` (L2 ``weight_decay``) or
    ``adamw`` (decoupled ``weight_decay``, used as given here, 0 included); with ``ema`` (a
    decay in (0, 1)) it also keeps a :class:`~lenet_xp.optim.averaging.ParameterEMA` of the
    weights as ``optimizer.average``."""
    key = name.strip().lower()
    if key == "sgd":
        optimizer = SGD(params, lr, momentum=momentum, weight_decay=weight_decay)
    elif key == "nesterov":
        optimizer = SGD(params, lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    elif key == "adam":
        optimizer = Adam(params, lr, weight_decay=weight_decay)
    elif key == "adamw":
        optimizer = AdamW(params, lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if ema:
        optimizer.average = ParameterEMA(optimizer.params, ema)
    return optimizer
