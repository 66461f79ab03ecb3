"""Max and average pooling from strided slices. Pure functions.

A window of ``kh x kw`` is visited offset by offset: offset ``(i, j)`` of every window is the
strided slice ``x[:, :, i::s, j::s]`` (cut to ``OH x OW``), so each step is one vectorised
pass over ``(N, C, OH, OW)`` rather than a reduction over tiny non-contiguous axes. Outputs
and gradients keep the memory layout of the input (``order="K"``).
"""

from __future__ import annotations

from typing import Any

from lenet_xp.backend import get_array_module
from lenet_xp.functional.conv import output_size
from lenet_xp.native import pool as native_pool


def _window_slices(x_shape: tuple[int, ...], kernel: int, stride: int) -> list[tuple[slice, ...]]:
    """Index tuples selecting offset ``(i, j)`` of every window, in row-major window order."""
    oh = output_size(x_shape[2], kernel, stride, 0)
    ow = output_size(x_shape[3], kernel, stride, 0)
    return [
        (
            slice(None),
            slice(None),
            slice(i, i + stride * (oh - 1) + 1, stride),
            slice(j, j + stride * (ow - 1) + 1, stride),
        )
        for i in range(kernel)
        for j in range(kernel)
    ]


def max_pool2d_forward(x: Any, kernel: int, stride: int) -> tuple[Any, Any]:
    """``x (N, C, H, W)`` -> ``(y (N, C, OH, OW), argmax (N, C, OH, OW) uint8)``.

    ``argmax`` holds the window offset ``i*kernel + j`` of the *first* maximum (as PyTorch),
    so ties send the gradient to exactly one input.
    """
    if (x_chwn := native_pool.batch_innermost(x)) is not None:
        oh, ow = (output_size(size, kernel, stride, 0) for size in x.shape[2:])
        y, argmax = native_pool.max_pool_forward(x_chwn, kernel, stride, oh, ow)
        return y.transpose(3, 0, 1, 2), argmax.transpose(3, 0, 1, 2)
    xp = get_array_module(x)
    slices = _window_slices(x.shape, kernel, stride)
    y = x[slices[0]].copy(order="K")
    argmax = xp.zeros_like(y, dtype=xp.uint8)
    for offset, window in enumerate(slices[1:], start=1):
        candidate = x[window]
        is_greater = candidate > y  # strict: an equal later value never takes over
        xp.maximum(y, candidate, out=y)
        # argmax < offset so far, so "set to offset where greater" is a maximum (and a fast one)
        xp.maximum(argmax, xp.multiply(is_greater, offset, dtype=xp.uint8), out=argmax)
    return y, argmax


def max_pool2d_backward(grad_y: Any, argmax: Any, x: Any, kernel: int, stride: int) -> Any:
    """Route each window's gradient to its first maximum: ``grad_x`` shaped (and laid out)
    like the forward input ``x (N, C, H, W)``."""
    grad_chwn = native_pool.batch_innermost(grad_y)
    argmax_chwn = native_pool.batch_innermost(argmax, "uint8")
    native_fits = grad_chwn is not None and argmax_chwn is not None and grad_y.dtype == x.dtype
    if native_fits and stride >= kernel:  # windows do not overlap: each input gets one term
        grad_x = native_pool.max_pool_backward(grad_chwn, argmax_chwn, x.shape, kernel, stride)
        return grad_x.transpose(3, 0, 1, 2)
    xp = get_array_module(grad_y)
    grad_x = xp.zeros_like(x)
    for offset, window in enumerate(_window_slices(x.shape, kernel, stride)):
        if stride >= kernel:  # windows do not overlap: write straight into place
            xp.multiply(grad_y, argmax == offset, out=grad_x[window])
        else:
            grad_x[window] += grad_y * (argmax == offset)
    return grad_x


def avg_pool2d_forward(x: Any, kernel: int, stride: int) -> Any:
    """``x (N, C, H, W)`` -> window means ``(N, C, OH, OW)``."""
    slices = _window_slices(x.shape, kernel, stride)
    y = x[slices[0]].copy(order="K")
    for window in slices[1:]:
        y += x[window]
    y *= 1.0 / (kernel * kernel)
    return y


def avg_pool2d_backward(grad_y: Any, x: Any, kernel: int, stride: int) -> Any:
    """Spread each window's gradient evenly over the forward input ``x``'s shape and layout."""
    xp = get_array_module(grad_y)
    grad_share = grad_y * (1.0 / (kernel * kernel))
    grad_x = xp.zeros_like(x)
    for window in _window_slices(x.shape, kernel, stride):
        grad_x[window] += grad_share
    return grad_x
