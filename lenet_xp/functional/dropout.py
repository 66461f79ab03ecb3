"""Dropout's math. Pure functions: the random draws are the layer's."""

from __future__ import annotations

import math
from typing import Any

from lenet_xp.backend import get_array_module


def dropout_forward(x: Any, keep: Any, p: float) -> tuple[Any, Any]:
    """``(y, mask)``: ``x`` where ``keep`` (a boolean array shaped like ``x``), scaled by
    ``1 / (1 - p)`` so the expected value is unchanged; zero elsewhere."""
    mask = keep * x.dtype.type(1.0 / (1.0 - p))
    return x * mask, mask


def dropout_backward(grad_y: Any, mask: Any) -> Any:
    """The gradient of :func:`dropout_forward` (``mask``: what it returned)."""
    return grad_y * mask


_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment
_MIXERS = ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB))
_UNIT_BITS = 24  # each unit's uniform: the hash's top 24 bits


def mix64(*values: int) -> int:
    """A 64-bit key from integers: splitmix64's finaliser folded over them (host side)."""
    mask = (1 << 64) - 1
    key = 0
    for value in values:
        z = (key + (int(value) + 1) * _GOLDEN) & mask
        for shift, mul in _MIXERS:
            z = ((z ^ (z >> shift)) * mul) & mask
        key = z ^ (z >> 31)
    return key


def counter_keep(step: Any, key: int, shape: tuple[int, ...], p: float) -> Any:
    """A boolean keep mask of ``shape`` (probability ``1 - p`` each) with no generator state:
    unit ``u`` of global step ``step`` (a ``(1,)`` int64 device array) is kept when the top
    24 bits of splitmix64's finaliser of ``key + golden * (step * size + u + 1)`` are at
    least ``p * 2**24``. The step is read on the device, so a captured CUDA graph draws new
    masks at every replay; the same on every device."""
    xp = get_array_module(step)
    size = math.prod(shape)
    z = xp.arange(1, size + 1, dtype=xp.uint64)
    z += step.astype(xp.uint64) * xp.uint64(size)
    z *= xp.uint64(_GOLDEN)
    z += xp.uint64(key)
    tmp = xp.empty_like(z)
    for shift, mul in _MIXERS:
        xp.right_shift(z, xp.uint64(shift), out=tmp)
        z ^= tmp
        z *= xp.uint64(mul)
    xp.right_shift(z, xp.uint64(31), out=tmp)
    z ^= tmp
    z >>= xp.uint64(64 - _UNIT_BITS)
    return (z >= xp.uint64(math.ceil(p * 2**_UNIT_BITS))).reshape(shape)
