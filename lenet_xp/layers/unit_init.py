"""Initialisers for layers whose weights do not have a dense ``(out, in, ...)`` shape.

:mod:`lenet_xp.layers.init` reads the fans off a dense weight's shape. LeCun et al. 1998's trainable
subsampling (one coefficient per map) and partially connected convolution (only some input
maps per output map) have no such shape, so they pass each weight's fan-in and fan-out
explicitly: numbers, or host arrays that broadcast against the weight's shape.

Schemes:

- ``lecun``: LeCun et al. 1998 (section II-B): U(-2.4/F, 2.4/F), ``F`` the fan-in of the unit
  the weight belongs to; biases alike (a bias is a weight on a constant input).
- ``pytorch``, ``he``, ``glorot``: the formulas of :func:`lenet_xp.layers.init.init_weight` and
  :func:`lenet_xp.layers.init.init_bias` with the fans given here (``he``, ``glorot``: zero biases).

Draws come from a host NumPy generator (``backend.host_rng``), as in :mod:`lenet_xp.layers.init`.
"""

from __future__ import annotations

from typing import Any

from lenet_xp.backend import host_zeros
from lenet_xp.layers.init import INITS

#: Every scheme the layers of this module family accept.
UNIT_INITS = ("lecun", *INITS)


def _check(scheme: str) -> None:
    if scheme not in UNIT_INITS:
        raise ValueError(f"unknown init {scheme!r}; choose one of {', '.join(UNIT_INITS)}")


def init_weights(
    shape: tuple[int, ...], fan_in: Any, fan_out: Any, scheme: str, rng: Any, dtype: str
) -> Any:
    """A host weight array of ``shape`` (``dtype``) drawn by ``scheme``; ``fan_in`` and
    ``fan_out`` are numbers or host arrays broadcasting against ``shape`` (one per weight)."""
    _check(scheme)
    if scheme == "lecun":
        bound = 2.4 / (fan_in + 0.0)
        return rng.uniform(-bound, bound, size=shape).astype(dtype)
    if scheme == "pytorch":
        bound = 1.0 / (fan_in + 0.0) ** 0.5
        return rng.uniform(-bound, bound, size=shape).astype(dtype)
    if scheme == "he":
        return rng.normal(0.0, (2.0 / (fan_in + 0.0)) ** 0.5, size=shape).astype(dtype)
    bound = (6.0 / (fan_in + fan_out + 0.0)) ** 0.5  # glorot
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def init_biases(shape: tuple[int, ...], fan_in: Any, scheme: str, rng: Any, dtype: str) -> Any:
    """A host bias array of ``shape`` (``dtype``): U(-2.4/F, +) for ``lecun``,
    U(-1/sqrt(F), +) for ``pytorch``, zeros for ``he`` and ``glorot``."""
    _check(scheme)
    if scheme in ("lecun", "pytorch"):
        return init_weights(shape, fan_in, fan_in, scheme, rng, dtype)
    return host_zeros(shape, dtype)
