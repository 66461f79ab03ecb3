"""Batch normalisation for ``(N, F)`` (``BatchNorm1d``) and ``(N, C, H, W)`` (``BatchNorm2d``).

Training normalises with the batch's mean and (biased) variance and updates running
estimates (unbiased variance, ``momentum`` 0.1), exactly as PyTorch; eval uses the
running estimates. Names match PyTorch: ``weight``, ``bias``, ``running_mean``,
``running_var``, ``num_batches_tracked``.
"""

from __future__ import annotations

from typing import Any

from lenet_xp.backend import get_array_module, host_zeros
from lenet_xp.layers.module import Module, Parameter


class _BatchNorm(Module):
    _buffers = ("running_mean", "running_var", "num_batches_tracked")
    ndim = 0  # input rank, set by subclasses

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, dtype: str = "float32"
    ) -> None:
        self.weight = Parameter(host_zeros(num_features, dtype) + 1)
        self.bias = Parameter(host_zeros(num_features, dtype))
        self.running_mean = host_zeros(num_features, dtype)
        self.running_var = host_zeros(num_features, dtype) + 1
        self.num_batches_tracked = host_zeros((), "int64")
        self.eps, self.momentum = eps, momentum

    def _per_feature(self, v: Any) -> Any:
        """Reshape a ``(F,)`` vector to broadcast against the input."""
        return v.reshape((1, -1) + (1,) * (self.ndim - 2))

    def forward(self, x: Any) -> Any:
        if x.ndim != self.ndim or x.shape[1] != self.weight.shape[0]:
            raise ValueError(
                f"{type(self).__name__}({self.weight.shape[0]}) got input of shape {x.shape}"
            )
        xp = get_array_module(x)
        axes = (0,) + tuple(range(2, x.ndim))
        if self.training:
            count = x.size // x.shape[1]
            mean = x.mean(axis=axes)
            var = x.var(axis=axes)
            m = self.momentum
            self.running_mean *= 1 - m
            self.running_mean += m * mean
            self.running_var *= 1 - m
            self.running_var += (m * count / max(count - 1, 1)) * var
            self.num_batches_tracked += 1
        else:
            mean, var = self.running_mean, self.running_var
        self._inv_std = 1 / xp.sqrt(var + self.eps)
        self._x_hat = (x - self._per_feature(mean)) * self._per_feature(self._inv_std)
        self._axes = axes
        return self._x_hat * self._per_feature(self.weight.data) + self._per_feature(self.bias.data)

    def backward(self, grad_y: Any) -> Any:
        axes, x_hat = self._axes, self._x_hat
        self.weight.grad = (grad_y * x_hat).sum(axis=axes)
        self.bias.grad = grad_y.sum(axis=axes)
        grad_x_hat = grad_y * self._per_feature(self.weight.data)
        scale = self._per_feature(self._inv_std)
        if not self.training:
            return grad_x_hat * scale
        mean_grad = grad_x_hat.mean(axis=axes, keepdims=True)
        mean_grad_x_hat = (grad_x_hat * x_hat).mean(axis=axes, keepdims=True)
        return scale * (grad_x_hat - mean_grad - x_hat * mean_grad_x_hat)


class BatchNorm1d(_BatchNorm):
    """Batch norm over ``(N, F)`` inputs."""

    ndim = 2


class BatchNorm2d(_BatchNorm):
    """Batch norm over ``(N, C, H, W)`` inputs, per channel."""

    ndim = 4
