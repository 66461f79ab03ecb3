"""Bias and ReLU over a linear layer's ``(N, out)`` output as compiled loops, each way one pass
(references: :func:`lenet_xp.functional.linear.linear_forward`'s ``y += bias``, then
:func:`lenet_xp.functional.activation.relu_forward` and ``relu_backward``: the same
operations in the same order, so the same bits)."""

from __future__ import annotations

from typing import Any

from lenet_xp.native import jit


@jit
def _bias_relu(y: Any, bias: Any, zero: Any) -> None:
    for r in range(y.shape[0]):
        row = y[r]
        for c in range(row.shape[0]):
            value = row[c] + bias[c]
            row[c] = value if (value > zero or value != value) else zero  # NumPy's maximum


@jit
def _relu_backward(grad: Any, out: Any, zero: Any, one: Any) -> None:
    for k in range(grad.shape[0]):
        grad[k] = grad[k] * (one if out[k] > zero else zero)


def bias_relu(y: Any, bias: Any) -> Any:
    """``y (N, C)`` (C-contiguous) in place: ``ReLU(y + bias)``; returns ``y``."""
    _bias_relu(y, bias, y.dtype.type(0))
    return y


def relu_backward(grad: Any, out: Any) -> Any:
    """``grad`` in place: times 1 where ReLU's output ``out`` is positive, else times 0
    (both C-contiguous, one shape); returns ``grad``."""
    cast = grad.dtype.type
    _relu_backward(grad.reshape(-1), out.reshape(-1), cast(0), cast(1))
    return grad
