"""Adjacent layers that run as one kernel on a GPU: what :class:`~lenet_xp.layers.Sequential`
forms when its layers use our CUDA kernels (:meth:`Module.use_cuda_kernels`).

- ``Conv2d -> MaxPool2d -> ReLU`` (windows not overlapping): the convolution's GEMM without
  its bias, then ``max_pool_bias_relu`` (bias, pool, ReLU: one launch instead of about 14);
  backward ``max_pool_relu_backward`` (one launch instead of about 11), then the
  convolution's own backward.
- ``Linear -> ReLU``: the ReLU as our GEMM's epilogue while capturing (bias and ReLU in the
  GEMM's last pass), and its backward as the next GEMM's mask, else ``bias_act`` and
  ``relu_mask`` (one launch each instead of two or three).

Each block's CPU reference is exactly the composition of its layers (the layers themselves,
on the CPU and wherever the kernels are off), and the kernels compute the same operations in
the same order (bias added before the maximum; ties to the first maximum; the gradient where
the output is positive), so a fused block equals its layers to the GEMM's rounding.
"""

from __future__ import annotations

from typing import Any

from lenet_xp.backend import get_array_module
from lenet_xp.functional.conv import conv2d_forward
from lenet_xp.layers.activation import ReLU
from lenet_xp.layers.conv import Conv2d
from lenet_xp.layers.linear import Linear
from lenet_xp.layers.module import Module
from lenet_xp.layers.pool import MaxPool2d


class ConvPoolReLU:
    """``conv -> pool -> relu`` as two kernels forward and one backward (see the module)."""

    size = 3

    def __init__(self, conv: Conv2d, pool: MaxPool2d, relu: ReLU, kernels: Any) -> None:
        self.conv, self.pool, self.relu, self.kernels = conv, pool, relu, kernels
        self._out = self._argmax = self._y_shape = None

    @staticmethod
    def fits(layers: list[Module], kernels: Any) -> bool:
        """Whether ``layers`` start with a block this class runs (``kernels``: ours, or
        ``None`` where they are off)."""
        if kernels is None or len(layers) < 3:
            return False
        conv, pool, relu = layers[:3]
        return (
            type(conv) is Conv2d
            and conv.bias is not None
            and type(pool) is MaxPool2d
            and pool.stride == pool.kernel
            and type(relu) is ReLU
        )

    def forward(self, x: Any) -> Any:
        conv = self.conv
        y, cache = conv2d_forward(
            x, conv.weight.data, None, conv.stride, conv.padding, self.kernels
        )  # fmt: skip
        conv._cache = cache if conv.training else None
        y_chwn = y.transpose(1, 2, 3, 0)  # the GEMM's (C, H, W, N) memory
        out, argmax = self.kernels.max_pool_bias_relu(y_chwn, conv.bias.data, self.pool.kernel)
        self._out, self._argmax, self._y_shape = out, argmax, y_chwn.shape
        return out.transpose(3, 0, 1, 2)

    def backward(self, grad_out: Any) -> Any:
        xp = get_array_module(grad_out)
        grad_chwn = xp.ascontiguousarray(grad_out.transpose(1, 2, 3, 0))  # free if stored so
        grad_y = self.kernels.max_pool_relu_backward(
            grad_chwn, self._out, self._argmax, self._y_shape, self.pool.kernel
        )
        self._out = self._argmax = None
        return self.conv.backward(grad_y.transpose(3, 0, 1, 2))


class LinearReLU:
    """``linear -> relu`` with the ReLU in our kernels (see the module)."""

    size = 2

    def __init__(self, linear: Linear, relu: ReLU, kernels: Any) -> None:
        self.linear, self.relu, self.kernels = linear, relu, kernels
        self._y: Any = None
        self._transposed = False

    @staticmethod
    def fits(layers: list[Module], kernels: Any) -> bool:
        if kernels is None or len(layers) < 2:
            return False
        linear, relu = layers[:2]
        return type(linear) is Linear and linear.bias is not None and type(relu) is ReLU

    def forward(self, x: Any) -> Any:
        k = self.kernels
        self._transposed = k.own_gemm or k.capturing()
        linear = self.linear
        linear._x = x if linear.training else None
        w = linear.weight.data
        if not self._transposed:  # cuBLAS, then bias and ReLU in one launch
            self._y = k.bias_act_cols(x @ w.T, linear.bias.data, True)
            return self._y
        y_t = get_array_module(x).empty((w.shape[0], x.shape[0]), x.dtype)
        k.gemm(w, x.T, y_t, bias=linear.bias.data, relu=True)  # relu(W x^T + b): one launch
        self._y = y_t.T
        return self._y

    def backward(self, grad_y: Any) -> Any:
        y, self._y = self._y, None
        if self._transposed:  # the mask's layout is not the gradient's: ReLU's own backward
            self.relu._y = y
            return self.linear.backward(self.relu.backward(grad_y))
        xp = get_array_module(grad_y)
        grad = grad_y if grad_y.flags.c_contiguous else xp.ascontiguousarray(grad_y)
        if not y.flags.c_contiguous:
            self.relu._y = y
            return self.linear.backward(self.relu.backward(grad_y))
        if grad is grad_y and not self.relu.inplace:
            grad = grad.copy()
        self.kernels.relu_mask(grad, y)
        return self.linear.backward(grad)


#: The blocks :func:`plan` tries at each layer, in order.
BLOCKS = (ConvPoolReLU, LinearReLU)


def plan(layers: list[Module], kernels: Any) -> list[Any]:
    """What runs, in order: ``layers`` with each run of adjacent layers that a block of
    :data:`BLOCKS` fuses replaced by that block (``kernels``: ours, or ``None``: no fusion)."""
    steps, i = [], 0
    while i < len(layers):
        for block in BLOCKS:
            if block.fits(layers[i:], kernels) and all(
                layer.cuda_kernels for layer in layers[i : i + block.size]
            ):
                steps.append(block(*layers[i : i + block.size], kernels))
                i += block.size
                break
        else:
            steps.append(layers[i])
            i += 1
    return steps
