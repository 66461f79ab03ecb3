"""Max and average pooling from strided slices. Pure functions.

A window of ``kh x kw`` is visited offset by offset: offset ``(i, j)`` of every window is the
strided slice ``x[:, :, i::s, j::s]`` (cut to ``OH x OW``), so each step is one vectorised
pass over ``(N, C, OH, OW)`` rather than a reduction over tiny non-contiguous axes.
"""

from __future__ import annotations

from typing import Any

from lenet_xp.backend import get_array_module
from lenet_xp.functional.conv import output_size


def _window_slices(kh: int, kw: int, stride: int, oh: int, ow: int) -> list[tuple[slice, ...]]:
    """Index tuples selecting offset ``(i, j)`` of every window, in row-major window order."""
    return [
        (
            slice(None),
            slice(None),
            slice(i, i + stride * (oh - 1) + 1, stride),
            slice(j, j + stride * (ow - 1) + 1, stride),
        )
        for i in range(kh)
        for j in range(kw)
    ]


def max_pool2d_forward(x: Any, kernel: int, stride: int) -> tuple[Any, Any]:
    """``x (N, C, H, W)`` -> ``(y (N, C, OH, OW), argmax (N, C, OH, OW) uint8)``.

    ``argmax`` holds the window offset ``i*kw + j`` of the *first* maximum (as PyTorch),
    so ties send the gradient to exactly one input.
    """
    xp = get_array_module(x)
    n, c, h, w = x.shape
    oh, ow = output_size(h, kernel, stride, 0), output_size(w, kernel, stride, 0)
    slices = _window_slices(kernel, kernel, stride, oh, ow)
    y = x[slices[0]].copy()
    argmax = xp.zeros(y.shape, dtype=xp.uint8)
    for offset, window in enumerate(slices[1:], start=1):
        candidate = x[window]
        is_greater = candidate > y  # strict: an equal later value never takes over
        xp.copyto(y, candidate, where=is_greater)
        argmax[is_greater] = offset
    return y, argmax


def max_pool2d_backward(
    grad_y: Any, argmax: Any, x_shape: tuple[int, ...], kernel: int, stride: int
) -> Any:
    """Route each window's gradient to its first maximum: returns ``grad_x (N, C, H, W)``."""
    xp = get_array_module(grad_y)
    oh, ow = grad_y.shape[2:]
    grad_x = xp.zeros(x_shape, dtype=grad_y.dtype)
    for offset, window in enumerate(_window_slices(kernel, kernel, stride, oh, ow)):
        grad_x[window] += grad_y * (argmax == offset)
    return grad_x


def avg_pool2d_forward(x: Any, kernel: int, stride: int) -> Any:
    """``x (N, C, H, W)`` -> window means ``(N, C, OH, OW)``."""
    n, c, h, w = x.shape
    oh, ow = output_size(h, kernel, stride, 0), output_size(w, kernel, stride, 0)
    slices = _window_slices(kernel, kernel, stride, oh, ow)
    y = x[slices[0]].copy()
    for window in slices[1:]:
        y += x[window]
    y *= 1.0 / (kernel * kernel)
    return y


def avg_pool2d_backward(grad_y: Any, x_shape: tuple[int, ...], kernel: int, stride: int) -> Any:
    """Spread each window's gradient evenly: returns ``grad_x (N, C, H, W)``."""
    xp = get_array_module(grad_y)
    oh, ow = grad_y.shape[2:]
    grad_share = grad_y * (1.0 / (kernel * kernel))
    grad_x = xp.zeros(x_shape, dtype=grad_y.dtype)
    for window in _window_slices(kernel, kernel, stride, oh, ow):
        grad_x[window] += grad_share
    return grad_x
