"""Adjacent layers that run as one kernel on a GPU: what :class:`~lenet_xp.layers.Sequential`
forms when its layers use our CUDA kernels (:meth:`Module.use_cuda_kernels`). ``conv`` is a
``Conv2d`` or a ``PartialConv2d`` (LeCun's C3: its dense, zero-filled weight in one GEMM);
``act`` is ReLU, Sigmoid, Tanh or LeCun's scaled tanh.

- ``conv -> MaxPool2d -> act`` (windows not overlapping): the convolution's GEMM without its
  bias, then ``max_pool_bias_act`` (bias, pool and activation in one launch); backward
  ``max_pool_act_backward`` (one launch), then the convolution's own backward;
- ``conv -> act -> AvgPool2d``: ``bias_act_avg_pool`` and ``act_avg_pool_backward``;
- ``conv -> act -> TrainableSubsampling -> act`` (LeCun's C1-S2, C3-S4):
  ``bias_act_subsample_act``; backward ``subsample_grads`` (the subsampling's coefficient
  and bias gradients) and ``act_subsample_act_backward``;
- ``conv -> act`` otherwise (LeCun's C5): ``bias_act`` and ``act_backward``;
- ``Linear -> act``: the GEMM, then ``bias_act_cols`` (bias and activation); backward
  ``act_backward`` (one launch), then the linear layer's;
- ``BatchNorm1d -> act`` in training: ``batch_norm_act`` (the batch's statistics, the
  running ones, the activation) and ``batch_norm_act_backward``.

Each replaces about ten array operations by one kernel each way. A block's CPU reference is
exactly the composition of its layers (the layers themselves run on the CPU and wherever the
kernels are off), and the kernels compute the layers' operations in the same order (bias
added before the maximum, ties to the first maximum, the activation's formula and backward as
``functional.activation`` writes them, window sums in offset order), so a fused block equals
its layers to the GEMM's rounding.
"""

from __future__ import annotations

from typing import Any

from lenet_xp.backend import get_array_module
from lenet_xp.functional.conv import conv2d_forward
from lenet_xp.kernels import ACTIVATION_CODES
from lenet_xp.kernels.ops import matmul
from lenet_xp.layers.activation import LeCunTanh, ReLU, Sigmoid, Tanh
from lenet_xp.layers.batchnorm import BatchNorm1d
from lenet_xp.layers.conv import Conv2d
from lenet_xp.layers.linear import Linear
from lenet_xp.layers.module import Module
from lenet_xp.layers.partial_conv import PartialConv2d
from lenet_xp.layers.pool import AvgPool2d, MaxPool2d
from lenet_xp.layers.subsample import TrainableSubsampling
from lenet_xp.native.blocks import CpuKernels

_ACTIVATIONS = (ReLU, Sigmoid, Tanh, LeCunTanh)


def _act_code(layer: Module) -> int | None:
    """The kernels' code of activation ``layer`` (``None``: not one they run)."""
    return ACTIVATION_CODES[type(layer).__name__] if type(layer) in _ACTIVATIONS else None


def _is_conv(conv: Module) -> bool:
    """Whether ``conv`` is a convolution (full or partial) with a bias, whose GEMM a block
    runs (:func:`_conv_gemm`)."""
    return type(conv) in (Conv2d, PartialConv2d) and conv.bias is not None


def _conv_fits(conv: Module, pool: Module, pool_type: type) -> bool:
    return _is_conv(conv) and type(pool) is pool_type and pool.stride == pool.kernel


def _conv_gemm(conv: Conv2d | PartialConv2d, x: Any, kernels: Any) -> Any:
    """The convolution's output without its bias, as its GEMM stores it: ``(C, H, W, N)``
    (contiguous); its cache kept as the layer's own ``backward`` reads it. ``kernels``
    build its ``x_cols`` on a GPU (the CPU's compiled ones run inside ``conv2d_forward``)."""
    partial = isinstance(conv, PartialConv2d)
    weight = conv.dense_weight() if partial else conv.weight.data
    y, cache = conv2d_forward(x, weight, None, conv.stride, conv.padding, _gemm(kernels))
    conv._cache = ((cache, weight) if partial else cache) if conv.training else None
    return y.transpose(1, 2, 3, 0)


def _gemm(kernels: Any) -> Any:
    """The kernels a block's GEMM and im2col take: our CUDA kernels, or ``None`` for the
    CPU's compiled ones (the array namespace's BLAS; ``conv2d_forward`` picks its own)."""
    return None if isinstance(kernels, CpuKernels) else kernels


def _chwn(grad: Any) -> Any:
    """``grad (N, C, H, W)`` as contiguous ``(C, H, W, N)`` (free when stored so)."""
    return get_array_module(grad).ascontiguousarray(grad.transpose(1, 2, 3, 0))


def _layer(position: int) -> property:
    """The block's layer at ``position``, as a named attribute."""
    return property(lambda block: block.layers[position], doc=f"layer {position} of the block")


class FusedBlock:
    """``size`` adjacent layers run as our kernels: made from the layers and the kernels
    (``block(*layers, kernels)``), it has the layers' ``forward`` and ``backward``.
    ``act_at``: the position of the block's activation, whose kernel code is ``act``."""

    size = 2
    act_at = 1

    def __init__(self, *layers_and_kernels: Any) -> None:
        *layers, self.kernels = layers_and_kernels
        self.layers: tuple[Module, ...] = tuple(layers)
        self.act = _act_code(self.layers[self.act_at])

    @classmethod
    def fits(cls, layers: list[Module]) -> bool:
        """Whether ``layers`` start with a block this class runs."""
        run = layers[: cls.size]
        return len(run) == cls.size and _act_code(run[cls.act_at]) is not None and cls.takes(*run)

    @staticmethod
    def takes(*layers: Module) -> bool:
        """Whether the block's layers other than its activation are ones it runs."""
        raise NotImplementedError


class ConvPoolAct(FusedBlock):
    """``conv -> max-pool -> act`` as two kernels forward and one backward (see the module)."""

    size, act_at = 3, 2
    conv, pool = _layer(0), _layer(1)
    _out = _argmax = _y_shape = None

    @staticmethod
    def takes(conv: Module, pool: Module, act: Module) -> bool:
        return _conv_fits(conv, pool, MaxPool2d)

    def forward(self, x: Any) -> Any:
        y = _conv_gemm(self.conv, x, self.kernels)
        out, argmax = self.kernels.max_pool_bias_act(
            y, self.conv.bias.data, self.pool.kernel, self.act
        )
        self._out, self._argmax, self._y_shape = out, argmax, y.shape
        return out.transpose(3, 0, 1, 2)

    def backward(self, grad_out: Any) -> Any:
        grad_y = self.kernels.max_pool_act_backward(
            _chwn(grad_out), self._out, self._argmax, self._y_shape, self.pool.kernel, self.act
        )
        self._out = self._argmax = None
        return self.conv.backward(grad_y.transpose(3, 0, 1, 2))


class ConvActAvgPool(FusedBlock):
    """``conv -> act -> average pool`` as two kernels forward and one backward."""

    size, act_at = 3, 1
    conv, pool = _layer(0), _layer(2)
    _act_out = None

    @staticmethod
    def takes(conv: Module, act: Module, pool: Module) -> bool:
        return _conv_fits(conv, pool, AvgPool2d)

    def forward(self, x: Any) -> Any:
        y = _conv_gemm(self.conv, x, self.kernels)
        out, self._act_out = self.kernels.bias_act_avg_pool(
            y, self.conv.bias.data, self.pool.kernel, self.act
        )
        return out.transpose(3, 0, 1, 2)

    def backward(self, grad_out: Any) -> Any:
        grad_y = self.kernels.act_avg_pool_backward(
            _chwn(grad_out), self._act_out, self.pool.kernel, self.act
        )
        self._act_out = None
        return self.conv.backward(grad_y.transpose(3, 0, 1, 2))


class ConvActSubsampleAct(FusedBlock):
    """``conv -> act -> trainable subsampling -> act2`` (LeCun's C1-S2 and C3-S4): the
    convolution's GEMM and one kernel forward; two kernels (the input's gradient, the
    subsampling's parameters' gradients) and the convolution's backward."""

    size, act_at = 4, 1
    conv, sub = _layer(0), _layer(2)
    _out = _act_out = _mean = None

    def __init__(self, *layers_and_kernels: Any) -> None:
        super().__init__(*layers_and_kernels)
        self.act2 = _act_code(self.layers[3])

    @staticmethod
    def takes(conv: Module, act: Module, sub: Module, act2: Module) -> bool:
        return (
            _is_conv(conv)
            and type(sub) is TrainableSubsampling
            and sub.channels == conv.out_channels
            and _act_code(act2) is not None
        )

    def forward(self, x: Any) -> Any:
        y = _conv_gemm(self.conv, x, self.kernels)
        sub = self.sub
        self._out, self._act_out, self._mean = self.kernels.bias_act_subsample_act(
            y, self.conv.bias.data, sub.weight.data, sub.bias.data, sub.kernel, self.act,
            self.act2,
        )  # fmt: skip
        return self._out.transpose(3, 0, 1, 2)

    def backward(self, grad_out: Any) -> Any:
        sub, k = self.sub, self.kernels
        grad = _chwn(grad_out)
        sub.weight.grad, sub.bias.grad = k.subsample_grads(
            grad, self._out, self._mean, sub.kernel, self.act2
        )
        grad_y = k.act_subsample_act_backward(
            grad, self._out, self._act_out, sub.weight.data, sub.kernel, self.act, self.act2
        )
        self._out = self._act_out = self._mean = None
        return self.conv.backward(grad_y.transpose(3, 0, 1, 2))


class ConvAct(FusedBlock):
    """``conv -> act`` with no pooling after it (LeCun's C5): the GEMM and one kernel
    forward (bias and activation), one kernel and the convolution's backward."""

    conv = _layer(0)
    _y: Any = None

    @staticmethod
    def takes(conv: Module, act: Module) -> bool:
        return _is_conv(conv)

    def forward(self, x: Any) -> Any:
        y = _conv_gemm(self.conv, x, self.kernels)
        self.kernels.bias_act(y.reshape(y.shape[0], -1), self.conv.bias.data, self.act)
        self._y = y
        return y.transpose(3, 0, 1, 2)

    def backward(self, grad_out: Any) -> Any:
        grad = _chwn(grad_out)  # in place: the gradient handed back is not held elsewhere
        self.kernels.act_backward(grad, self._y, self.act)
        self._y = None
        return self.conv.backward(grad.transpose(3, 0, 1, 2))


class LinearAct(FusedBlock):
    """``linear -> act``: the GEMM and one kernel forward, one kernel and the linear layer's
    backward (see the module)."""

    linear = _layer(0)
    _y: Any = None

    @staticmethod
    def takes(linear: Module, act: Module) -> bool:
        return type(linear) is Linear and linear.bias is not None

    def forward(self, x: Any) -> Any:
        linear = self.linear
        linear._x = x if linear.training else None
        y = matmul(x, linear.weight.data.T, _gemm(self.kernels))  # (N, out), contiguous
        self._y = self.kernels.bias_act_cols(y, linear.bias.data, self.act)
        return self._y

    def backward(self, grad_y: Any) -> Any:
        xp = get_array_module(grad_y)
        # in place: the gradient the next layer handed back is not held elsewhere
        grad = grad_y if grad_y.flags.c_contiguous else xp.ascontiguousarray(grad_y)
        self.kernels.act_backward(grad, self._y, self.act)
        self._y = None
        return self.linear.backward(grad)


class BatchNormAct(FusedBlock):
    """``BatchNorm1d -> act`` in training: one kernel each way (the batch's statistics, the
    running ones and the activation; in evaluation the layers run)."""

    norm = _layer(0)
    _y: Any = None

    @staticmethod
    def takes(norm: Module, act: Module) -> bool:
        return type(norm) is BatchNorm1d and norm.training

    def forward(self, x: Any) -> Any:
        bn = self.norm
        if x.ndim != 2 or x.shape[1] != bn.weight.shape[0]:
            return bn.forward(x)  # the layer's own one-line error
        x = get_array_module(x).ascontiguousarray(x)
        self._y, bn._x_hat, bn._inv_std = self.kernels.batch_norm_act(
            x, bn.weight.data, bn.bias.data, bn.running_mean, bn.running_var,
            bn.num_batches_tracked, bn.eps, bn.momentum, self.act,
        )  # fmt: skip
        return self._y

    def backward(self, grad_y: Any) -> Any:
        bn = self.norm
        grad_y = get_array_module(grad_y).ascontiguousarray(grad_y)
        grad_x, bn.weight.grad, bn.bias.grad = self.kernels.batch_norm_act_backward(
            grad_y, self._y, bn._x_hat, bn._inv_std, bn.weight.data, self.act
        )
        self._y = None
        return grad_x


#: The blocks :func:`plan` tries at each layer, in order.
BLOCKS = (ConvPoolAct, ConvActAvgPool, ConvActSubsampleAct, ConvAct, LinearAct, BatchNormAct)


#: The blocks the compiled CPU kernels run (:class:`~lenet_xp.native.blocks.CpuKernels`),
#: with ReLU as their activation.
CPU_BLOCKS = (ConvPoolAct, LinearAct)


def _runs(kernels: Any, block: type[FusedBlock], run: list[Module]) -> bool:
    """Whether ``kernels`` run ``block`` over the layers ``run`` (which it fits): our CUDA
    kernels where every layer uses them; the CPU's where the block is one of
    :data:`CPU_BLOCKS` with ReLU and no layer's ``forward`` is wrapped (``LayerStats``
    sampling its output: on the CPU a block gives its layers' bits, so running them instead
    for that step changes no number; on a GPU it would, by the GEMM's rounding)."""
    if isinstance(kernels, CpuKernels):
        return (
            block in CPU_BLOCKS
            and type(run[block.act_at]) is ReLU
            and not any("forward" in vars(layer) for layer in run)
        )
    return all(layer.cuda_kernels for layer in run)


def plan(layers: list[Module], kernels: Any) -> list[Any]:
    """What runs, in order: ``layers`` with each run of adjacent layers that a block of
    :data:`BLOCKS` fuses replaced by that block (``kernels``: our CUDA kernels or the CPU's
    compiled ones, or ``None``: no fusion)."""
    steps, i = [], 0
    while i < len(layers):
        for block in BLOCKS if kernels is not None else ():
            run = layers[i : i + block.size]
            if block.fits(run) and _runs(kernels, block, run):
                steps.append(block(*run, kernels))
                i += block.size
                break
        else:
            steps.append(layers[i])
            i += 1
    return steps
