"""im2col's copy and col2im's scatter-add as compiled loops over batch-innermost arrays
(:mod:`lenet_xp.functional.conv` references: ``_cols``, one copy of a strided view, and
``_add_cols``, one strided NumPy add per kernel offset)."""

from __future__ import annotations

from typing import Any

import numpy

from lenet_xp.native import jit


@jit
def add_cols(grad_pad: Any, cols: Any, kh: int, kw: int, stride: int, r0: int, ow: int) -> None:
    """Add ``cols (C*kh*kw, R*OW*N)`` (C-contiguous) of output rows ``r0..r0+R`` into
    ``grad_pad (C, H, W, N)`` (C-contiguous) in place: each element gets its terms in the
    reference's order (kernel row ``i``, then column ``j``), so the sums are the same bits."""
    c, n = grad_pad.shape[0], grad_pad.shape[3]
    rows = cols.shape[1] // (ow * n)
    for ch in range(c):
        for i in range(kh):
            for j in range(kw):
                row = (ch * kh + i) * kw + j
                for r in range(rows):
                    y = (r0 + r) * stride + i
                    for q in range(ow):
                        x = q * stride + j
                        base = (r * ow + q) * n
                        for b in range(n):
                            grad_pad[ch, y, x, b] += cols[row, base + b]


@jit
def _cols(x_pad: Any, kh: int, kw: int, stride: int, r0: int, r1: int, ow: int, out: Any) -> None:
    """``out (C*kh*kw, (r1-r0)*OW*N)`` = the windows of output rows ``r0..r1`` of ``x_pad
    (C, H, W, N)`` (both C-contiguous): row ``(c, i, j)``, column ``(r, q, n)``."""
    c, n = x_pad.shape[0], x_pad.shape[3]
    for ch in range(c):
        for i in range(kh):
            for j in range(kw):
                row = (ch * kh + i) * kw + j
                for r in range(r1 - r0):
                    y = (r0 + r) * stride + i
                    for q in range(ow):
                        source = x_pad[ch, y, q * stride + j]
                        base = (r * ow + q) * n
                        for b in range(n):
                            out[row, base + b] = source[b]


def cols(x_pad: Any, kh: int, kw: int, stride: int, rows: tuple[int, int], ow: int) -> Any:
    """``x_cols (C*kh*kw, R*OW*N)`` of output rows ``rows = (r0, r1)`` of ``x_pad (C, H, W, N)``
    (C-contiguous), in a new array."""
    (r0, r1), (c, n) = rows, (x_pad.shape[0], x_pad.shape[3])
    out = numpy.empty((c * kh * kw, (r1 - r0) * ow * n), x_pad.dtype)
    _cols(x_pad, kh, kw, stride, r0, r1, ow, out)
    return out
