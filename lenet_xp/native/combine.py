"""The slices' gradients combined as one compiled loop (reference:
:meth:`lenet_xp.training.parallel.DataParallel._combine`'s array operations, ``row 0 *= w0``,
then ``row 0 += w_i * row i`` for each further slice, each a pass over the whole buffer with
a temporary). Each element takes the reference's operations in its order, in the rows'
dtype, so the sums are the same bits."""

from __future__ import annotations

from typing import Any

import numpy

from lenet_xp.native import jit


@jit
def _combine(rows: Any, weights: Any) -> None:
    combined = rows[0]
    for k in range(combined.shape[0]):
        combined[k] = combined[k] * weights[0]
    for i in range(1, rows.shape[0]):  # a pass per row, as the reference's: it vectorises
        row, weight = rows[i], weights[i]
        for k in range(combined.shape[0]):
            combined[k] = combined[k] + weight * row[k]


def combine(rows: Any, weights: list[float]) -> None:
    """``rows[0] = sum_i weights[i] * rows[i]`` in place (``rows (S, P)``, C-contiguous;
    the weights cast to its dtype, as NumPy casts Python floats)."""
    _combine(rows, numpy.asarray(weights, dtype=rows.dtype))
