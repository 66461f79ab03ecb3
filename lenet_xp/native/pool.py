"""Max-pooling as one compiled pass each way over batch-innermost arrays
(:mod:`lenet_xp.functional.pool` reference: one NumPy pass per window offset)."""

from __future__ import annotations

from typing import Any

import numpy

from lenet_xp.native import jit


@jit
def _forward(x: Any, y: Any, argmax: Any, kernel: int, stride: int) -> None:
    """``x (C, H, W, N)`` -> ``y (C, OH, OW, N)`` and ``argmax`` (uint8, the window offset
    ``i*kernel + j`` of the first maximum), written in place. As the reference: a later value
    takes over only when strictly greater, and a NaN in a window makes its maximum NaN."""
    c, oh, ow, n = y.shape
    for ch in range(c):
        for r in range(oh):
            for q in range(ow):
                best, at = y[ch, r, q], argmax[ch, r, q]  # (N,) rows, the batch innermost
                first = x[ch, r * stride, q * stride]
                for b in range(n):
                    best[b], at[b] = first[b], 0
                for offset in range(1, kernel * kernel):
                    i, j = offset // kernel, offset % kernel
                    values = x[ch, r * stride + i, q * stride + j]
                    for b in range(n):
                        value = values[b]
                        if value > best[b]:
                            best[b], at[b] = value, offset
                        elif value != value:  # NaN
                            best[b] = value


@jit
def _backward(grad_y: Any, argmax: Any, grad_x: Any, kernel: int, stride: int) -> None:
    """Add each window's gradient ``grad_y (C, OH, OW, N)`` to its first maximum in
    ``grad_x (C, H, W, N)`` (zeros on entry), in window order."""
    c, oh, ow, n = grad_y.shape
    for ch in range(c):
        for r in range(oh):
            for q in range(ow):
                for offset in range(kernel * kernel):
                    i, j = offset // kernel, offset % kernel
                    at, grads = argmax[ch, r, q], grad_y[ch, r, q]
                    target = grad_x[ch, r * stride + i, q * stride + j]
                    for b in range(n):
                        if at[b] == offset:
                            target[b] += grads[b]


def batch_innermost(a: Any, dtype: Any = None) -> Any:
    """``a (N, C, H, W)`` as its ``(C, H, W, N)`` C-contiguous memory, for these kernels;
    ``None`` where they do not apply (a GPU array, another layout, a dtype other than
    ``dtype``, default float32 or float64)."""
    if type(a) is not numpy.ndarray or a.ndim != 4:
        return None
    if a.dtype not in ((numpy.float32, numpy.float64) if dtype is None else (dtype,)):
        return None
    chwn = a.transpose(1, 2, 3, 0)
    return chwn if chwn.flags.c_contiguous else None


def max_pool_forward(x: Any, kernel: int, stride: int, oh: int, ow: int) -> tuple[Any, Any]:
    """``x (C, H, W, N)`` -> new ``(y, argmax)``, both ``(C, OH, OW, N)``."""
    c, n = x.shape[0], x.shape[3]
    y, argmax = numpy.empty((c, oh, ow, n), x.dtype), numpy.empty((c, oh, ow, n), numpy.uint8)
    _forward(x, y, argmax, kernel, stride)
    return y, argmax


def max_pool_backward(grad_y: Any, argmax: Any, x_shape: tuple, kernel: int, stride: int) -> Any:
    """``grad_y`` and ``argmax (C, OH, OW, N)`` -> a new ``grad_x (C, H, W, N)`` of the forward
    input's ``x_shape (N, C, H, W)``."""
    n, c, h, w = x_shape
    grad_x = numpy.zeros((c, h, w, n), grad_y.dtype)
    _backward(grad_y, argmax, grad_x, kernel, stride)
    return grad_x
