"""Max-pooling as one compiled pass each way over batch-innermost arrays
(:mod:`lenet_xp.functional.pool` reference: one NumPy pass per window offset)."""

from __future__ import annotations

from typing import Any

import numpy

from lenet_xp.native import FLOATS, fits, jit


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
def _backward(
    grad_y: Any, argmax: Any, grad_x: Any, kernel: int, stride: int, zero: Any, one: Any
) -> None:
    """Windows that do not overlap (``stride >= kernel``): each input of a window gets
    ``grad_y (C, OH, OW, N)`` times 1 where it is the window's first maximum, else times 0
    (the reference's products, so the same bits), written into ``grad_x (C, H, W, N)``; inputs
    outside every window are left as they are (zeros)."""
    c, oh, ow, n = grad_y.shape
    for ch in range(c):
        for r in range(oh):
            for q in range(ow):
                at, grads = argmax[ch, r, q], grad_y[ch, r, q]
                for offset in range(kernel * kernel):
                    i, j = offset // kernel, offset % kernel
                    target = grad_x[ch, r * stride + i, q * stride + j]
                    for b in range(n):
                        target[b] = grads[b] * (one if at[b] == offset else zero)


def batch_innermost(a: Any, dtype: Any = None) -> Any:
    """``a (N, C, H, W)`` as its ``(C, H, W, N)`` C-contiguous memory, for these kernels;
    ``None`` where they do not take it (:func:`lenet_xp.native.fits` of that memory, in
    ``dtype``, default float32 or float64: a GPU array, another layout, another dtype, the
    kernels off)."""
    if type(a) is not numpy.ndarray or a.ndim != 4:  # a GPU array is not even transposed
        return None
    chwn = a.transpose(1, 2, 3, 0)
    return chwn if fits(chwn, dtypes=FLOATS if dtype is None else (numpy.dtype(dtype),)) else None


def max_pool_forward(x: Any, kernel: int, stride: int, oh: int, ow: int) -> tuple[Any, Any]:
    """``x (C, H, W, N)`` -> new ``(y, argmax)``, both ``(C, OH, OW, N)``."""
    c, n = x.shape[0], x.shape[3]
    y, argmax = numpy.empty((c, oh, ow, n), x.dtype), numpy.empty((c, oh, ow, n), numpy.uint8)
    _forward(x, y, argmax, kernel, stride)
    return y, argmax


def max_pool_backward(grad_y: Any, argmax: Any, x_shape: tuple, kernel: int, stride: int) -> Any:
    """``grad_y`` and ``argmax (C, OH, OW, N)`` -> a new ``grad_x (C, H, W, N)`` of the forward
    input's ``x_shape (N, C, H, W)``; windows that do not overlap (``stride >= kernel``), and
    not zeroed first where they tile it."""
    n, c, h, w = x_shape
    oh, ow = grad_y.shape[1:3]
    tiled = stride == kernel and (h, w) == (oh * kernel, ow * kernel)  # every input written
    grad_x = (numpy.empty if tiled else numpy.zeros)((c, h, w, n), grad_y.dtype)
    cast = grad_y.dtype.type
    _backward(grad_y, argmax, grad_x, kernel, stride, cast(0), cast(1))
    return grad_x


@jit
def _forward_bias_relu(y: Any, bias: Any, out: Any, argmax: Any, kernel: int, zero: Any) -> None:
    """``y (C, H, W, N)`` (a convolution's output without its bias) -> ``out`` =
    ReLU(max-pool(``y + bias``)) and ``argmax``, both ``(C, OH, OW, N)``, windows of
    ``kernel`` not overlapping: the reference's operations in its order (the bias added to
    each value, a later value taking over only when strictly greater, a NaN making the
    maximum NaN, then NumPy's ``maximum(v, 0)``: ``+0`` for ``-0``, NaN kept)."""
    c, oh, ow, n = out.shape
    for ch in range(c):
        b = bias[ch]
        for r in range(oh):
            for q in range(ow):
                best, at = out[ch, r, q], argmax[ch, r, q]
                first = y[ch, r * kernel, q * kernel]
                for i in range(n):
                    best[i], at[i] = first[i] + b, 0
                for offset in range(1, kernel * kernel):
                    values = y[ch, r * kernel + offset // kernel, q * kernel + offset % kernel]
                    for i in range(n):
                        value = values[i] + b
                        if value > best[i]:
                            best[i], at[i] = value, offset
                        elif value != value:  # NaN
                            best[i] = value
                for i in range(n):
                    if not (best[i] > zero or best[i] != best[i]):
                        best[i] = zero


@jit
def _backward_relu(
    grad_out: Any, out: Any, argmax: Any, grad_y: Any, kernel: int, zero: Any, one: Any
) -> None:
    """The gradient of :func:`_forward_bias_relu` w.r.t. ``y``, written into ``grad_y``:
    ReLU's backward (``grad * (out > 0)``), then max-pooling's (times 1 at the window's first
    maximum, else times 0), the reference's products in its order."""
    c, oh, ow, n = out.shape
    for ch in range(c):
        for r in range(oh):
            for q in range(ow):
                at, grads, kept = argmax[ch, r, q], grad_out[ch, r, q], out[ch, r, q]
                for offset in range(kernel * kernel):
                    i0, j0 = r * kernel + offset // kernel, q * kernel + offset % kernel
                    target = grad_y[ch, i0, j0]
                    for i in range(n):
                        passed = grads[i] * (one if kept[i] > zero else zero)
                        target[i] = passed * (one if at[i] == offset else zero)


def max_pool_bias_relu(y: Any, bias: Any, kernel: int) -> tuple[Any, Any]:
    """``y (C, H, W, N)`` (C-contiguous) and ``bias (C,)`` -> new ``(ReLU(max-pool(y +
    bias)), argmax)``, both ``(C, H // kernel, W // kernel, N)`` (windows not overlapping; a
    last row or column no window covers is left out, as the reference leaves it)."""
    c, h, w, n = y.shape
    shape = (c, h // kernel, w // kernel, n)
    out, argmax = numpy.empty(shape, y.dtype), numpy.empty(shape, numpy.uint8)
    _forward_bias_relu(y, bias, out, argmax, kernel, y.dtype.type(0))
    return out, argmax


def max_pool_relu_backward(
    grad_out: Any, out: Any, argmax: Any, y_shape: tuple, kernel: int
) -> Any:
    """``grad_out``, ``out`` and ``argmax (C, OH, OW, N)`` of :func:`max_pool_bias_relu` ->
    a new gradient w.r.t. its ``y (C, H, W, N)`` (``y_shape``): zeros in the rows and
    columns no window covers (``H`` not a multiple of ``kernel``), as the reference's."""
    c, oh, ow, n = out.shape
    tiled = tuple(y_shape[1:3]) == (oh * kernel, ow * kernel)  # every value written
    grad_y = (numpy.empty if tiled else numpy.zeros)(tuple(y_shape), grad_out.dtype)
    cast = grad_out.dtype.type
    _backward_relu(grad_out, out, argmax, grad_y, kernel, cast(0), cast(1))
    return grad_y
