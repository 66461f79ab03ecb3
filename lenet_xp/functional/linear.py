"""A fully connected layer's math: ``y = x @ weight.T + bias`` (PyTorch's ``weight (out, in)``
layout) and its gradients. Pure functions."""

from __future__ import annotations

from typing import Any


def linear_forward(x: Any, weight: Any, bias: Any | None) -> Any:
    """``x (N, in)`` -> ``y (N, out)`` for ``weight (out, in)`` and ``bias (out,)`` or ``None``."""
    y = x @ weight.T
    if bias is not None:
        y += bias
    return y


def linear_backward(
    grad_y: Any, x: Any, weight: Any, has_bias: bool = True
) -> tuple[Any, Any, Any | None]:
    """Gradients of :func:`linear_forward` from ``grad_y (N, out)`` and its input ``x``:
    ``(grad_x (N, in), grad_weight (out, in), grad_bias (out,) or None)``."""
    grad_w = grad_y.T @ x
    grad_b = grad_y.sum(axis=0) if has_bias else None
    return grad_y @ weight, grad_w, grad_b
