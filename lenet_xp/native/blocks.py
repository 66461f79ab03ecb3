"""The compiled CPU kernels that fused blocks of layers call (:mod:`lenet_xp.layers.fusion`,
the CPU twin of the GPU's :class:`~lenet_xp.kernels.ops.Kernels`): ``conv -> max-pool ->
ReLU`` runs as the convolution's GEMM and one pass each way, instead of a bias pass, a pool
pass and a ReLU pass forward and two passes backward. The same operations in the same order
as those layers, so the same bits (:mod:`lenet_xp.native.pool`)."""

from __future__ import annotations

from typing import Any

import numpy

from lenet_xp.native import FLOATS, enabled, pool


class CpuKernels:
    """The launchers a :class:`~lenet_xp.layers.fusion.ConvPoolAct` block calls, with the
    GPU's signatures, for ReLU (the activation ``act`` is the GPU's code; only ReLU's
    blocks are formed on the CPU)."""

    def max_pool_bias_act(self, y: Any, bias: Any, k: int, act: int) -> tuple[Any, Any]:
        """``y (C, H, W, N)`` -> ``(relu(maxpool(y + bias)) (C, OH, OW, N), argmax uint8)``."""
        return pool.max_pool_bias_relu(y, bias, k)

    def max_pool_act_backward(
        self, grad_out: Any, out: Any, argmax: Any, y_shape: tuple, k: int, act: int
    ) -> Any:
        """Gradient of :meth:`max_pool_bias_act` w.r.t. ``y``: ``(C, H, W, N)``."""
        return pool.max_pool_relu_backward(grad_out, out, argmax, k)


_KERNELS = CpuKernels()


def cpu_kernels(x: Any) -> CpuKernels | None:
    """The compiled CPU kernels for a network's input ``x``, if they run on it (a NumPy
    float32 or float64 array in any layout, the kernels on: :func:`lenet_xp.native.enabled`;
    the arrays they take are ones the blocks make contiguous), else ``None``."""
    return _KERNELS if type(x) is numpy.ndarray and x.dtype in FLOATS and enabled() else None
