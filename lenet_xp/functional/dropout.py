"""Dropout's math. Pure functions: the random draws are the layer's."""

from __future__ import annotations

from typing import Any


def dropout_forward(x: Any, keep: Any, p: float) -> tuple[Any, Any]:
    """``(y, mask)``: ``x`` where ``keep`` (a boolean array shaped like ``x``), scaled by
    ``1 / (1 - p)`` so the expected value is unchanged; zero elsewhere."""
    mask = keep * x.dtype.type(1.0 / (1.0 - p))
    return x * mask, mask


def dropout_backward(grad_y: Any, mask: Any) -> Any:
    """The gradient of :func:`dropout_forward` (``mask``: what it returned)."""
    return grad_y * mask
