"""Elementwise activations, forward and backward. Pure functions: each forward returns what its
backward needs. ``inplace=True`` overwrites the input (forward) or the upstream gradient
(backward), as PyTorch's ``inplace``."""

from __future__ import annotations

from typing import Any

from lenet_xp.backend import get_array_module


def relu_forward(x: Any, inplace: bool = False) -> Any:
    """``max(x, 0)``; its backward needs the output."""
    return get_array_module(x).maximum(x, 0, out=x if inplace else None)


def relu_backward(grad_y: Any, y: Any, inplace: bool = False) -> Any:
    """The gradient passes where the output ``y`` is positive."""
    return get_array_module(grad_y).multiply(grad_y, y > 0, out=grad_y if inplace else None)


def leaky_relu_forward(x: Any, negative_slope: float, inplace: bool = False) -> tuple[Any, Any]:
    """``(y, factor)``: ``y = x * factor``, ``factor`` exactly 1 where ``x > 0`` and
    ``negative_slope`` elsewhere (in ``x``'s dtype and layout: PyTorch's values to the bit)."""
    xp = get_array_module(x)
    positive = (x > 0).astype(x.dtype)  # 1 or 0
    factor = 1 - positive
    factor *= negative_slope
    factor += positive  # exactly 1 or negative_slope (xp.where is ~5x slower here)
    return xp.multiply(x, factor, out=x if inplace else None), factor


def leaky_relu_backward(grad_y: Any, factor: Any, inplace: bool = False) -> Any:
    """``grad_y * factor`` (``factor`` from :func:`leaky_relu_forward`)."""
    return get_array_module(grad_y).multiply(grad_y, factor, out=grad_y if inplace else None)


def sigmoid_forward(x: Any) -> Any:
    """``1 / (1 + exp(-x))``, in an overflow-free form."""
    return 0.5 * (get_array_module(x).tanh(0.5 * x) + 1)


def sigmoid_backward(grad_y: Any, y: Any) -> Any:
    """``dy/dx = y (1 - y)``."""
    return grad_y * y * (1 - y)


def tanh_forward(x: Any) -> Any:
    return get_array_module(x).tanh(x)


def tanh_backward(grad_y: Any, y: Any) -> Any:
    """``dy/dx = 1 - y^2``."""
    return grad_y * (1 - y * y)


def scaled_tanh_forward(x: Any, amplitude: float, slope: float) -> tuple[Any, Any]:
    """``(amplitude * t, t)`` with ``t = tanh(slope * x)`` (LeCun's ``A tanh(S x)``)."""
    t = get_array_module(x).tanh(slope * x)
    return amplitude * t, t


def scaled_tanh_backward(grad_y: Any, t: Any, amplitude: float, slope: float) -> Any:
    """``dy/dx = A S (1 - t^2)``."""
    return grad_y * (amplitude * slope) * (1 - t * t)
