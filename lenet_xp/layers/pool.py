"""Pooling layers; the math is in :mod:`lenet_xp.functional.pool`."""

from __future__ import annotations

from typing import Any

from lenet_xp.functional import pool
from lenet_xp.layers.module import Module


class MaxPool2d(Module):
    """Max over ``kernel x kernel`` windows (stride defaults to the kernel), ``(N, C, H, W)``."""

    def __init__(self, kernel_size: int = 2, stride: int | None = None) -> None:
        self.kernel, self.stride = kernel_size, stride or kernel_size
        self._argmax: Any = None
        self._x: Any = None

    def forward(self, x: Any) -> Any:
        y, argmax = pool.max_pool2d_forward(x, self.kernel, self.stride)
        self._argmax, self._x = argmax, x
        return y

    def backward(self, grad_y: Any) -> Any:
        return pool.max_pool2d_backward(grad_y, self._argmax, self._x, self.kernel, self.stride)


class AvgPool2d(Module):
    """Mean over ``kernel x kernel`` windows (stride defaults to the kernel), ``(N, C, H, W)``."""

    def __init__(self, kernel_size: int = 2, stride: int | None = None) -> None:
        self.kernel, self.stride = kernel_size, stride or kernel_size
        self._x: Any = None

    def forward(self, x: Any) -> Any:
        self._x = x
        return pool.avg_pool2d_forward(x, self.kernel, self.stride)

    def backward(self, grad_y: Any) -> Any:
        return pool.avg_pool2d_backward(grad_y, self._x, self.kernel, self.stride)
