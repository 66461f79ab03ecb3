"""Batch normalisation's math, forward and backward, over every axis but the features' (axis 1:
``(N, F)`` or ``(N, C, H, W)``). Pure functions: the running statistics are the layer's."""

from __future__ import annotations

from typing import Any

from lenet_xp.backend import get_array_module


def _per_feature(v: Any, ndim: int) -> Any:
    """Reshape a ``(F,)`` vector to broadcast against an ``ndim``-D input."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def feature_axes(x: Any) -> tuple[int, ...]:
    """The axes a feature's statistics run over: all but axis 1."""
    return (0,) + tuple(range(2, x.ndim))


def batch_norm_forward(
    x: Any, mean: Any, var: Any, weight: Any, bias: Any, eps: float
) -> tuple[Any, Any, Any]:
    """``(y, x_hat, inv_std)``: ``x`` normalised by ``mean`` and ``var`` (``(F,)`` each: the
    batch's in training, the running ones in evaluation), then scaled and shifted."""
    inv_std = 1 / get_array_module(x).sqrt(var + eps)
    x_hat = (x - _per_feature(mean, x.ndim)) * _per_feature(inv_std, x.ndim)
    return x_hat * _per_feature(weight, x.ndim) + _per_feature(bias, x.ndim), x_hat, inv_std


def batch_norm_backward(
    grad_y: Any, x_hat: Any, inv_std: Any, weight: Any, batch_statistics: bool
) -> tuple[Any, Any, Any]:
    """``(grad_x, grad_weight, grad_bias)`` of :func:`batch_norm_forward`;
    ``batch_statistics``: the forward pass normalised by the batch's own mean and variance
    (training), whose gradients then flow too."""
    axes = feature_axes(grad_y)
    grad_w = (grad_y * x_hat).sum(axis=axes)
    grad_b = grad_y.sum(axis=axes)
    grad_x_hat = grad_y * _per_feature(weight, grad_y.ndim)
    scale = _per_feature(inv_std, grad_y.ndim)
    if not batch_statistics:
        return grad_x_hat * scale, grad_w, grad_b
    mean_grad = grad_x_hat.mean(axis=axes, keepdims=True)
    mean_grad_x_hat = (grad_x_hat * x_hat).mean(axis=axes, keepdims=True)
    return scale * (grad_x_hat - mean_grad - x_hat * mean_grad_x_hat), grad_w, grad_b
