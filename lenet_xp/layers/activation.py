"""Elementwise activations (their math in :mod:`lenet_xp.functional.activation`) and
``Flatten``. Each keeps what its backward needs."""

from __future__ import annotations

from typing import Any

from lenet_xp.backend import get_array_module
from lenet_xp.functional import activation as F
from lenet_xp.layers.module import Module


class ReLU(Module):
    """``max(x, 0)``; the gradient passes where the output is positive.

    ``inplace=True`` overwrites the input in forward and the upstream gradient in backward
    (as PyTorch's ``inplace``): for use where nothing else holds them, saving two arrays.
    """

    def __init__(self, inplace: bool = False) -> None:
        self.inplace = inplace

    def forward(self, x: Any) -> Any:
        self._y = F.relu_forward(x, self.inplace)
        return self._y

    def backward(self, grad_y: Any) -> Any:
        return F.relu_backward(grad_y, self._y, self.inplace)


class LeakyReLU(Module):
    """``x`` where ``x > 0``, else ``negative_slope * x`` (PyTorch's ``LeakyReLU``); the
    gradient is 1 where ``x > 0`` and ``negative_slope`` elsewhere (at 0 too, as PyTorch).

    Forward keeps the factor (1 or ``negative_slope``, in ``x``'s dtype and layout) that both
    passes multiply by, so values and gradients are PyTorch's to the bit. ``inplace=True``
    overwrites the input in forward and the upstream gradient in backward, as :class:`ReLU`.
    """

    def __init__(self, negative_slope: float = 0.01, inplace: bool = False) -> None:
        self.negative_slope, self.inplace = float(negative_slope), inplace

    def forward(self, x: Any) -> Any:
        y, self._factor = F.leaky_relu_forward(x, self.negative_slope, self.inplace)
        return y

    def backward(self, grad_y: Any) -> Any:
        return F.leaky_relu_backward(grad_y, self._factor, self.inplace)


class Sigmoid(Module):
    """``1 / (1 + exp(-x))``; ``dy/dx = y (1 - y)``."""

    def forward(self, x: Any) -> Any:
        self._y = F.sigmoid_forward(x)
        return self._y

    def backward(self, grad_y: Any) -> Any:
        return F.sigmoid_backward(grad_y, self._y)


class Tanh(Module):
    """``tanh(x)``; ``dy/dx = 1 - y^2``."""

    def forward(self, x: Any) -> Any:
        self._y = F.tanh_forward(x)
        return self._y

    def backward(self, grad_y: Any) -> Any:
        return F.tanh_backward(grad_y, self._y)


class LeCunTanh(Module):
    """LeCun's scaled tanh ``A tanh(S x)`` with ``A = 1.7159``, ``S = 2/3`` (LeCun et al. 1998)."""

    amplitude = 1.7159
    slope = 2.0 / 3.0

    def forward(self, x: Any) -> Any:
        y, self._t = F.scaled_tanh_forward(x, self.amplitude, self.slope)
        return y

    def backward(self, grad_y: Any) -> Any:
        return F.scaled_tanh_backward(grad_y, self._t, self.amplitude, self.slope)


class Flatten(Module):
    """``(N, ...)`` -> ``(N, prod(...))``; the gradient comes back in the input's memory layout."""

    def forward(self, x: Any) -> Any:
        self._x = x
        return x.reshape(x.shape[0], -1)

    def backward(self, grad_y: Any) -> Any:
        grad_x = get_array_module(grad_y).empty_like(self._x)  # same strides as x
        grad_x[...] = grad_y.reshape(self._x.shape)
        return grad_x
