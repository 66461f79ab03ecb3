"""Inverted dropout: zero each unit with probability ``p`` and scale survivors by ``1/(1-p)``
while training; the identity in eval mode."""

from __future__ import annotations

from typing import Any

from lenet_xp.backend import default_rng, device_of
from lenet_xp.functional.dropout import dropout_backward, dropout_forward
from lenet_xp.layers.module import Module


class Dropout(Module):
    """Dropout with probability ``p``; masks come from a generator on the input's device,
    seeded by ``seed`` (``None``: fresh entropy)."""

    def __init__(self, p: float = 0.5, seed: int | list[int] | None = None) -> None:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p, self.seed = p, seed
        self._rng: Any = None
        self._mask: Any = None

    def fork(self, stream: int) -> None:
        """Draw masks from stream ``stream`` of ``seed`` from now on: a worker process's own,
        so the slices of a batch do not all get the same masks (no-op without a seed)."""
        if self.seed is not None:
            self.seed, self._rng = [self.seed, stream], None

    def forward(self, x: Any) -> Any:
        if not self.training or self.p == 0.0:
            self._mask = None
            return x
        if self._rng is None or device_of(x) != self._rng_device:
            self._rng_device = device_of(x)
            self._rng = default_rng(self.seed, self._rng_device)
        keep = self._rng.random(x.shape, dtype=x.dtype) >= self.p
        y, self._mask = dropout_forward(x, keep, self.p)
        return y

    def backward(self, grad_y: Any) -> Any:
        return grad_y if self._mask is None else dropout_backward(grad_y, self._mask)
