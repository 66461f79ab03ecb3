"""Weight initialisers. They draw on the host from a seeded NumPy generator (see
``backend.host_rng``), so one seed gives the same initial weights on every device.

``fan_in`` of a weight ``(OC, C, kh, kw)`` is ``C*kh*kw``; of ``(out, in)`` it is ``in``.
"""

from __future__ import annotations

import math
from typing import Any

from lenet_xp.backend import host_zeros

INITS = ("pytorch", "he", "glorot")


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a Linear ``(out, in)`` or Conv ``(OC, C, kh, kw)`` weight."""
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def init_weight(shape: tuple[int, ...], scheme: str, rng: Any, dtype: str = "float32") -> Any:
    """A weight array of ``shape`` drawn by ``scheme``:

    - ``pytorch``: PyTorch's default, ``kaiming_uniform(a=sqrt(5))`` = U(-1/sqrt(fan_in), +).
    - ``he``: N(0, 2/fan_in), for ReLU nets.
    - ``glorot``: U(-b, b), b = sqrt(6/(fan_in+fan_out)).
    """
    fan_in, fan_out = fans(shape)
    if scheme == "pytorch":
        bound = 1.0 / math.sqrt(fan_in)
        return rng.uniform(-bound, bound, size=shape).astype(dtype)
    if scheme == "he":
        return rng.normal(0.0, math.sqrt(2.0 / fan_in), size=shape).astype(dtype)
    if scheme == "glorot":
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-bound, bound, size=shape).astype(dtype)
    raise ValueError(f"unknown init {scheme!r}; choose one of {', '.join(INITS)}")


def init_bias(weight_shape: tuple[int, ...], scheme: str, rng: Any, dtype: str = "float32") -> Any:
    """Bias for a weight of ``weight_shape``: PyTorch's U(-1/sqrt(fan_in), +), else zeros."""
    fan_in, _ = fans(weight_shape)
    if scheme == "pytorch":
        bound = 1.0 / math.sqrt(fan_in)
        return rng.uniform(-bound, bound, size=weight_shape[0]).astype(dtype)
    if scheme not in INITS:
        raise ValueError(f"unknown init {scheme!r}; choose one of {', '.join(INITS)}")
    return host_zeros(weight_shape[0], dtype)
