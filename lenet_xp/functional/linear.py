"""A fully connected layer's math: ``y = x @ weight.T + bias`` (PyTorch's ``weight (out, in)``
layout) and its gradients. Pure functions."""

from __future__ import annotations

from typing import Any

from lenet_xp.kernels.ops import Kernels, matmul


def linear_forward(x: Any, weight: Any, bias: Any | None, kernels: Kernels | None = None) -> Any:
    """``x (N, in)`` -> ``y (N, out)`` for ``weight (out, in)`` and ``bias (out,)`` or ``None``.
    ``kernels``: our CUDA kernels, whose GEMM runs inside a CUDA graph capture
    (:func:`~lenet_xp.kernels.ops.matmul`); ``None``: the array namespace's."""
    y = matmul(x, weight.T, kernels)
    if bias is not None:
        y += bias
    return y


def linear_backward(
    grad_y: Any, x: Any, weight: Any, has_bias: bool = True, kernels: Kernels | None = None
) -> tuple[Any, Any, Any | None]:
    """Gradients of :func:`linear_forward` from ``grad_y (N, out)`` and its input ``x``:
    ``(grad_x (N, in), grad_weight (out, in), grad_bias (out,) or None)``."""
    grad_w = matmul(grad_y.T, x, kernels)
    grad_b = grad_y.sum(axis=0) if has_bias else None
    return matmul(grad_y, weight, kernels), grad_w, grad_b
