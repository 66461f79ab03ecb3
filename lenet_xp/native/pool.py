"""Max-pooling as one compiled pass each way over batch-innermost arrays
(:mod:`lenet_xp.functional.pool` reference: one NumPy pass per window offset)."""

from __future__ import annotations

from typing import Any

from lenet_xp.native import jit


@jit
def max_pool_forward(x: Any, y: Any, argmax: Any, kernel: int, stride: int) -> None:
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
def max_pool_backward(
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
