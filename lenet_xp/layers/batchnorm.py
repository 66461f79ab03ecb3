"""Batch normalisation for ``(N, F)`` (``BatchNorm1d``) and ``(N, C, H, W)`` (``BatchNorm2d``).

Training normalises with the batch's mean and (biased) variance and updates running
estimates (unbiased variance, ``momentum`` 0.1), exactly as PyTorch; eval uses the
running estimates. Names match PyTorch: ``weight``, ``bias``, ``running_mean``,
``running_var``, ``num_batches_tracked``.
"""

from __future__ import annotations

from typing import Any

from lenet_xp.backend import host_zeros
from lenet_xp.functional.batchnorm import batch_norm_backward, batch_norm_forward, feature_axes
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

    def forward(self, x: Any) -> Any:
        if x.ndim != self.ndim or x.shape[1] != self.weight.shape[0]:
            raise ValueError(
                f"{type(self).__name__}({self.weight.shape[0]}) got input of shape {x.shape}"
            )
        if self.training:
            axes = feature_axes(x)
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
        y, self._x_hat, self._inv_std = batch_norm_forward(
            x, mean, var, self.weight.data, self.bias.data, self.eps
        )
        return y

    def backward(self, grad_y: Any) -> Any:
        grad_x, self.weight.grad, self.bias.grad = batch_norm_backward(
            grad_y, self._x_hat, self._inv_std, self.weight.data, self.training
        )
        return grad_x


class BatchNorm1d(_BatchNorm):
    """Batch norm over ``(N, F)`` inputs."""

    ndim = 2


class BatchNorm2d(_BatchNorm):
    """Batch norm over ``(N, C, H, W)`` inputs, per channel."""

    ndim = 4
