"""Inverted dropout: zero each unit with probability ``p`` and scale survivors by ``1/(1-p)``
while training; the identity in eval mode."""

from __future__ import annotations

import secrets
from typing import Any

from lenet_xp.backend import default_rng, device_of
from lenet_xp.functional.dropout import counter_keep, dropout_backward, dropout_forward, mix64
from lenet_xp.layers.module import Module


class Dropout(Module):
    """Dropout with probability ``p``; masks come from a generator on the input's device,
    seeded by ``seed`` (``None``: fresh entropy)."""

    #: A device clock (``int64``, entry 0 the global step) set by the graph engine: masks
    #: then come from :func:`~lenet_xp.functional.dropout.counter_keep` of it (no generator
    #: state, so a captured CUDA graph draws new ones at every replay); ``None``: the generator.
    clock: Any = None

    def __init__(self, p: float = 0.5, seed: int | list[int] | None = None) -> None:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p, self.seed = p, seed
        self._rng: Any = None
        self._mask: Any = None

    def fork(self, stream: int) -> None:
        """Draw masks from stream ``stream`` of ``seed`` from now on: an MPI rank's or a worker
        process's own, so the slices of a batch do not all get the same masks (a rank's
        worker forks the rank's stream again; no-op without a seed)."""
        if self.seed is not None:
            seeds = self.seed if isinstance(self.seed, list) else [self.seed]
            self.seed, self._rng, self._counter_key = [*seeds, stream], None, None

    def forward(self, x: Any) -> Any:
        if not self.training or self.p == 0.0:
            self._mask = None
            return x
        if self.clock is not None:
            keep = counter_keep(self.clock[:1], self.counter_key(), x.shape, self.p)
            y, self._mask = dropout_forward(x, keep, self.p)
            return y
        if self._rng is None or device_of(x) != self._rng_device:
            self._rng_device = device_of(x)
            self._rng = default_rng(self.seed, self._rng_device)
        keep = self._rng.random(x.shape, dtype=x.dtype) >= self.p
        y, self._mask = dropout_forward(x, keep, self.p)
        return y

    def use_clock(self, clock: Any, stream: int = 0) -> None:
        """Draw counter-based masks from ``clock`` (see :attr:`clock`; ``None``: the generator
        again), on ``stream`` (each dropout layer of a model its own)."""
        self.clock, self._counter_key = clock, None
        self._counter_stream = stream

    def counter_key(self) -> int:
        """The 64-bit key of this layer's counter-based masks, from its ``seed`` and stream
        (drawn once from fresh entropy when the seed is ``None``)."""
        if getattr(self, "_counter_key", None) is None:
            stream = getattr(self, "_counter_stream", 0)
            if self.seed is None:
                self._counter_key = secrets.randbits(64)
            else:
                seeds = self.seed if isinstance(self.seed, list) else [self.seed]
                self._counter_key = mix64(*seeds, stream)
        return self._counter_key

    def backward(self, grad_y: Any) -> Any:
        return grad_y if self._mask is None else dropout_backward(grad_y, self._mask)
