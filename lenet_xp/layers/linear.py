"""``Linear``: ``y = x @ weight.T + bias`` with PyTorch's ``weight (out, in)`` layout."""

from __future__ import annotations

from typing import Any

from lenet_xp.backend import host_rng
from lenet_xp.functional.linear import linear_backward, linear_forward
from lenet_xp.layers.init import init_bias, init_weight
from lenet_xp.layers.module import Module, Parameter


class Linear(Module):
    """Fully connected layer on ``x (N, in_features)`` -> ``(N, out_features)``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        init: str = "pytorch",
        rng: Any = None,
        dtype: str = "float32",
    ) -> None:
        rng = host_rng(None) if rng is None else rng
        shape = (out_features, in_features)
        self.weight = Parameter(init_weight(shape, init, rng, dtype))
        self.bias = Parameter(init_bias(shape, init, rng, dtype)) if bias else None
        self._x: Any = None

    def forward(self, x: Any) -> Any:
        if x.ndim != 2 or x.shape[1] != self.weight.shape[1]:
            raise ValueError(f"Linear expects (N, {self.weight.shape[1]}) input, got {x.shape}")
        self._x = x if self.training else None
        bias = None if self.bias is None else self.bias.data
        return linear_forward(x, self.weight.data, bias, self._kernels(x))

    def macs(self, x_shape: tuple[int, ...], y_shape: tuple[int, ...]) -> int:
        return self.weight.shape[0] * self.weight.shape[1]

    def backward(self, grad_y: Any) -> Any:
        has_bias = self.bias is not None
        grad_x, self.weight.grad, grad_b = linear_backward(
            grad_y, self._x, self.weight.data, has_bias, self._kernels(grad_y)
        )
        if has_bias:
            self.bias.grad = grad_b
        return grad_x
