"""The compiled CPU kernels that fused blocks of layers call (:mod:`lenet_xp.layers.fusion`,
the CPU twin of the GPU's :class:`~lenet_xp.kernels.ops.Kernels`): ``conv -> max-pool ->
ReLU`` runs as the convolution's GEMM and one pass each way, instead of a bias pass, a pool
pass and a ReLU pass forward and two passes backward; ``linear -> ReLU`` as the GEMM and one
pass each way (bias and ReLU; ReLU's gradient). The same operations in the same order
as those layers, so the same bits (:mod:`lenet_xp.native.pool`)."""

from __future__ import annotations

from typing import Any

import numpy

from lenet_xp.native import FLOATS, dense, enabled, pool


class CpuKernels:
    """The launchers that :class:`~lenet_xp.layers.fusion.ConvPoolAct` and
    :class:`~lenet_xp.layers.fusion.LinearAct` blocks call, with the GPU's signatures, for
    ReLU (the activation ``act`` is the GPU's code; only ReLU's blocks are formed on the
    CPU: the other activations' ``exp`` and ``tanh`` are NumPy's vectorised ones, whose bits
    a compiled loop's would not match)."""

    def bias_act_cols(self, y: Any, bias: Any, act: int) -> Any:
        """``y (N, C)`` contiguous, in place: ``relu(y + bias)``."""
        return dense.bias_relu(y, bias)

    def act_backward(self, grad: Any, out: Any, act: int) -> Any:
        """In place: ``grad`` through ReLU's backward, from its output ``out``."""
        return dense.relu_backward(grad, out)

    def max_pool_bias_act(self, y: Any, bias: Any, k: int, act: int) -> tuple[Any, Any]:
        """``y (C, H, W, N)`` -> ``(relu(maxpool(y + bias)) (C, OH, OW, N), argmax uint8)``."""
        return pool.max_pool_bias_relu(y, bias, k)

    def max_pool_act_backward(
        self, grad_out: Any, out: Any, argmax: Any, y_shape: tuple, k: int, act: int
    ) -> Any:
        """Gradient of :meth:`max_pool_bias_act` w.r.t. ``y``: ``(C, H, W, N)``."""
        return pool.max_pool_relu_backward(grad_out, out, argmax, y_shape, k)


_KERNELS = CpuKernels()


def cpu_kernels(x: Any) -> CpuKernels | None:
    """The compiled CPU kernels for a network's input ``x``, if they run on it (a NumPy
    float32 or float64 array in any layout, the kernels on: :func:`lenet_xp.native.enabled`;
    the arrays they take are ones the blocks make contiguous), else ``None``."""
    return _KERNELS if type(x) is numpy.ndarray and x.dtype in FLOATS and enabled() else None
