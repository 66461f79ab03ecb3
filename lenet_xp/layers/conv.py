"""``Conv2d``: owns weight and bias; the math is in :mod:`lenet_xp.functional.conv`."""

from __future__ import annotations

from typing import Any

from lenet_xp.backend import host_rng
from lenet_xp.functional.conv import conv2d_backward, conv2d_forward
from lenet_xp.layers.init import init_bias, init_weight
from lenet_xp.layers.module import Module, Parameter


class Conv2d(Module):
    """2-d convolution over ``(N, C, H, W)`` with a square kernel, any stride and padding.

    ``weight (out_channels, in_channels, k, k)`` and ``bias (out_channels,)``, as PyTorch.
    Set ``needs_input_grad = False`` on a first layer to skip the input gradient.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
        *,
        init: str = "pytorch",
        rng: Any = None,
        dtype: str = "float32",
    ) -> None:
        rng = host_rng(None) if rng is None else rng
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self.weight = Parameter(init_weight(shape, init, rng, dtype))
        self.bias = Parameter(init_bias(shape, init, rng, dtype)) if bias else None
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.padding = stride, padding
        self.needs_input_grad = True
        self._cache: Any = None

    def forward(self, x: Any) -> Any:
        bias = None if self.bias is None else self.bias.data
        y, cache = conv2d_forward(
            x, self.weight.data, bias, self.stride, self.padding, self._kernels(x)
        )
        self._cache = cache if self.training else None
        return y

    def macs(self, x_shape: tuple[int, ...], y_shape: tuple[int, ...]) -> int:
        """Every output value is one dot product of ``C*kh*kw`` terms."""
        oc, c, kh, kw = self.weight.shape
        return oc * y_shape[2] * y_shape[3] * c * kh * kw

    def backward(self, grad_y: Any) -> Any:
        grad_x, grad_w, grad_b = conv2d_backward(
            grad_y,
            self._cache,
            self.weight.data,
            need_grad_x=self.needs_input_grad,
            kernels=self._kernels(grad_y),
        )
        self.weight.grad = grad_w
        if self.bias is not None:
            self.bias.grad = grad_b
        self._cache = None
        return grad_x
