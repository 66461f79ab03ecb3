"""Central finite differences for gradient tests (float64)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def numerical_grad(f: Callable[[], float], array: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """d f / d array by central differences, perturbing ``array`` in place."""
    grad = np.zeros_like(array)
    flat, grad_flat = array.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        original = flat[i]
        flat[i] = original + eps
        f_plus = f()
        flat[i] = original - eps
        f_minus = f()
        flat[i] = original
        grad_flat[i] = (f_plus - f_minus) / (2 * eps)
    return grad


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """``|a - b| / max(|a|, |b|)`` in the 2-norm (0 when both are 0)."""
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    return 0.0 if scale == 0 else float(np.linalg.norm(a - b) / scale)


def check_layer(layer, x: np.ndarray, seed: int = 0, tol: float = 1e-6) -> None:
    """Assert ``layer.backward`` matches finite differences for the input and every parameter.

    Uses the scalar ``f(x) = sum(forward(x) * g)`` for a fixed random ``g``.
    """
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(layer.forward(x).shape)

    def f() -> float:
        return float(np.sum(layer.forward(x) * g))

    layer.forward(x)
    grad_x = layer.backward(g)
    analytic = {name: p.grad.copy() for name, p in layer.named_parameters()}
    if grad_x is not None:
        err = rel_error(grad_x, numerical_grad(f, x))
        assert err <= tol, f"input gradient rel error {err:.2e}"
    for name, param in layer.named_parameters():
        err = rel_error(analytic[name], numerical_grad(f, param.data))
        assert err <= tol, f"{name} gradient rel error {err:.2e}"
