"""Compiled CPU kernels (Numba) behind the ops that own them: the CPU twin of ``kernels/``.

Where a CPU pass is bound by memory traffic or by the number of NumPy calls (col2im's strided
adds, max-pooling's window passes, Adam's dozen array operations per parameter), the op in
``functional/`` or ``optim/`` runs one compiled loop from here instead, with its ``xp`` code
as the reference and the fallback. Each kernel does the same arithmetic in the same order as
that reference (same dtype, no fused multiply-adds, sums in the reference's order), so a run
gives the same numbers, bit for bit, with or without them.

They are on when Numba imports (``pip install "lenet_xp[native]"``) and ``$LENET_XP_NATIVE``
is not ``0``. Numba compiles each
kernel once per dtype and caches the machine code on disk (``cache=True``: next to this
package, else in Numba's user cache), so only the first run on a machine pays the compiler
(a few seconds); the training loop compiles them before its first timed epoch.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy

_on: bool | None = None  # None: not read yet


def enabled() -> bool:
    """Whether the compiled kernels run (Numba importable, ``$LENET_XP_NATIVE`` not ``0``),
    as read at the first call, or the first after :func:`reread` (a step asks dozens of
    times: a lookup in ``os.environ`` each time would cost 1 % of it)."""
    global _on
    if _on is None:
        _on = os.environ.get("LENET_XP_NATIVE", "1").strip() != "0" and _numba() is not None
    return _on


def reread() -> None:
    """Read ``$LENET_XP_NATIVE`` (and whether Numba imports) again at the next call of
    :func:`enabled`: for a process that changes the setting as it runs (a benchmark, tests)."""
    global _on
    _on = None
    _numba.cache_clear()


#: The dtypes the compiled kernels compute in.
FLOATS = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))


def fits(*arrays: Any, dtypes: tuple = FLOATS) -> bool:
    """Whether the compiled kernels take these arrays: NumPy, C-contiguous, one dtype among
    ``dtypes`` (default float32 or float64), and the kernels on (:func:`enabled`)."""
    first = arrays[0]
    return (
        first.dtype in dtypes
        and all(
            type(a) is numpy.ndarray and a.flags.c_contiguous and a.dtype == first.dtype
            for a in arrays
        )
        and enabled()
    )


@functools.cache
def _numba() -> Any:
    try:
        import numba
    except ImportError:
        return None
    return numba


def jit(function: Any) -> Any:
    """``numba.njit(cache=True)`` of ``function``, compiled on its first call (only called
    where :func:`enabled` is true). NumPy's error model: a division by zero gives inf or NaN
    as NumPy's does, and no check per division keeps the loops vectorisable."""
    compiled = None

    @functools.wraps(function)
    def call(*args: Any) -> Any:
        nonlocal compiled
        if compiled is None:
            compiled = _numba().njit(cache=True, nogil=True, error_model="numpy")(function)
        return compiled(*args)

    call.py_func = function  # the plain-Python loop, for tests
    return call


def warm_up(like: Any) -> None:
    """Compile every kernel for the dtype of ``like`` (a parameter's array) now, or load it
    from the disk cache (milliseconds), so that no timed training step pays for it; nothing
    for a GPU array or when the kernels are off."""
    if type(like) is not numpy.ndarray or not fits(like):
        return
    dtype = like.dtype
    from lenet_xp.native import combine, conv, dense, optim, pool

    def zeros(*shape: int, of: Any = dtype) -> numpy.ndarray:
        return numpy.zeros(shape, of)

    conv.add_cols(zeros(1, 2, 2, 1), zeros(4, 1), 2, 2, 1, 0, 1)
    conv.cols(zeros(1, 2, 2, 1), 2, 2, 1, (0, 1), 1)
    y, argmax = pool.max_pool_forward(zeros(1, 2, 2, 1), 2, 2, 1, 1)
    pool.max_pool_backward(y, argmax, (1, 1, 2, 2), 2, 2)
    y, argmax = pool.max_pool_bias_relu(zeros(1, 2, 2, 1), zeros(1), 2)
    pool.max_pool_relu_backward(y, y, argmax, (1, 2, 2, 1), 2)
    dense.relu_backward(dense.bias_relu(zeros(1, 1), zeros(1)), zeros(1, 1))
    optim.adam(*(zeros(1) for _ in range(4)), (0.9, 0.999), 1.0, 1e-8, 1e-3, 0.0)
    optim.ema(zeros(1), zeros(1), 0.9)
    combine.combine(zeros(2, 1), [0.5, 0.5])
