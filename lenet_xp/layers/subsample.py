"""``TrainableSubsampling``: LeCun et al. 1998's S2 and S4 layers.

Each unit adds the ``k x k`` values of its window (windows do not overlap: stride ``k``),
multiplies the sum by a trainable coefficient of its map and adds a trainable bias of its
map. In the paper the result then goes through the squashing function: put an activation
layer (e.g. ``LeCunTanh``) after this one.
"""

from __future__ import annotations

from typing import Any

from lenet_xp.backend import get_array_module, host_rng
from lenet_xp.functional import pool
from lenet_xp.layers.module import Module, Parameter
from lenet_xp.layers.unit_init import init_biases, init_weights


class TrainableSubsampling(Module):
    """``y[n, c] = weight[c] * (sum of each k x k window of x[n, c]) + bias[c]``.

    ``x (N, C, H, W)`` -> ``y (N, C, H // k, W // k)`` (rows and columns that do not fill a
    window are dropped, as in pooling), any float dtype and memory layout (batch-innermost
    views stay batch-innermost). Parameters: ``weight (C,)`` and ``bias (C,)`` in ``dtype``:
    two per map, so S2 (6 maps) has 12 and S4 (16 maps) 32.

    ``init="lecun"`` (the default): weight and bias U(-2.4/F, 2.4/F) with ``F = k*k`` the
    fan-in of a unit, LeCun's rule; ``"pytorch"``, ``"he"`` and ``"glorot"`` as in
    :mod:`lenet_xp.layers.unit_init` (fan-in ``k*k``, fan-out 1: each input feeds one unit).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 2,
        *,
        init: str = "lecun",
        rng: Any = None,
        dtype: str = "float32",
    ) -> None:
        rng = host_rng(None) if rng is None else rng
        self.channels, self.kernel = channels, kernel_size
        fan_in = kernel_size * kernel_size
        self.weight = Parameter(init_weights((channels,), fan_in, 1, init, rng, dtype))
        self.bias = Parameter(init_biases((channels,), fan_in, init, rng, dtype))
        self._x: Any = None
        self._mean: Any = None

    def _scale(self) -> Any:
        """``weight * k*k`` as ``(C, 1, 1)``: window mean * it = weight * window sum (exact for
        k = 2, a power of two)."""
        return (self.weight.data * (self.kernel * self.kernel))[:, None, None]

    def forward(self, x: Any) -> Any:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"TrainableSubsampling expects (N, {self.channels}, H, W) input, got {x.shape}"
            )
        xp = get_array_module(x)
        k = self.kernel
        mean = pool.avg_pool2d_forward(x, k, k)  # (N, C, OH, OW) in x's layout
        y = xp.multiply(mean, self._scale(), out=xp.empty_like(mean))
        y += self.bias.data[:, None, None]
        self._x, self._mean = (x, mean) if self.training else (None, None)
        return y

    def backward(self, grad_y: Any) -> Any:
        """``grad_y (N, C, OH, OW)`` -> ``grad_x`` shaped and laid out like the input."""
        xp = get_array_module(grad_y)
        k = self.kernel
        self.weight.grad = (grad_y * self._mean).sum(axis=(0, 2, 3)) * (k * k)
        self.bias.grad = grad_y.sum(axis=(0, 2, 3))
        grad_mean = xp.multiply(grad_y, self._scale(), out=xp.empty_like(grad_y))
        grad_x = pool.avg_pool2d_backward(grad_mean, self._x, k, k)
        self._x = self._mean = None
        return grad_x

    def macs(self, x_shape: tuple[int, ...], y_shape: tuple[int, ...]) -> int:
        """One multiplication per output value (the window sum is additions only)."""
        return y_shape[1] * y_shape[2] * y_shape[3]
