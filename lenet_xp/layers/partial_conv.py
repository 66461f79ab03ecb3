"""``PartialConv2d``: a convolution whose output maps each see only some input maps.

LeCun et al. 1998 connect C3's 16 maps to S2's 6 through a table (their Table I) "to keep
the number of connections within reasonable bounds" and to break the symmetry between maps:
each C3 map gets a different set of inputs and so extracts different features.

The math is :mod:`lenet_xp.functional.conv`'s im2col convolution with a dense weight in which
the missing kernels are zeros: forward scatters the compact weight into it; backward gathers
the dense weight gradient back (the zero kernels' gradients are computed and dropped).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lenet_xp.backend import device_of, get_array_module, host_rng, host_zeros, to_device
from lenet_xp.functional.conv import conv2d_backward, conv2d_forward
from lenet_xp.layers.module import Module, Parameter
from lenet_xp.layers.unit_init import init_biases, init_weights

Table = tuple[tuple[int, ...], ...]

#: LeCun et al. 1998, Table I: the S2 maps (0-5) each C3 map (0-15) sees. Maps 0-5: three
#: contiguous maps; 6-11: four contiguous; 12-14: four non-contiguous; 15: all six. 60
#: connections: 60 * 25 + 16 = 1,516 parameters.
LENET5_C3_TABLE: Table = (
    (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (0, 4, 5), (0, 1, 5),
    (0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5), (0, 3, 4, 5), (0, 1, 4, 5), (0, 1, 2, 5),
    (0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5),
    (0, 1, 2, 3, 4, 5),
)  # fmt: skip


def check_table(table: Sequence[Sequence[int]], in_channels: int, out_channels: int) -> Table:
    """``table`` as a tuple of tuples, after checking it: one non-empty entry per output map,
    each a set of distinct input maps in ``0 .. in_channels - 1``."""
    if len(table) != out_channels:
        raise ValueError(
            f"table has {len(table)} entries, expected one per output map ({out_channels})"
        )
    rows = tuple(tuple(int(i) for i in row) for row in table)
    for o, row in enumerate(rows):
        if not row:
            raise ValueError(f"table[{o}] is empty: output map {o} would see no input")
        if len(set(row)) != len(row) or not all(0 <= i < in_channels for i in row):
            raise ValueError(
                f"table[{o}] = {row}: need distinct input maps in 0..{in_channels - 1}"
            )
    return rows


class PartialConv2d(Module):
    """2-d convolution over ``(N, C, H, W)`` in which output map ``o`` sees only the input maps
    ``table[o]``; square kernel, any stride and padding.

    Parameters (``dtype``): ``weight (connections, k, k)``, the kernels of the connections in
    table order (output map by output map, each in its ``table[o]`` order), and ``bias
    (out_channels,)``; :meth:`dense_weight` gives the equivalent ``(out, in, k, k)`` weight
    of a :class:`~lenet_xp.layers.Conv2d`. With :data:`LENET5_C3_TABLE` (6 -> 16 maps, k = 5)
    that is 60 kernels and 1,516 parameters.

    Initialisation (``init``: ``pytorch`` by default, as ``Conv2d``; or ``lecun``, ``he``,
    ``glorot``; see :mod:`lenet_xp.layers.unit_init`): the fan-in of output map ``o`` is
    ``len(table[o]) * k * k``, the fan-out of input map ``i`` is the number of output maps
    that see it times ``k * k``. Set ``needs_input_grad = False`` on a first layer.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        table: Sequence[Sequence[int]],
        *,
        stride: int = 1,
        padding: int = 0,
        init: str = "pytorch",
        rng: Any = None,
        dtype: str = "float32",
    ) -> None:
        rng = host_rng(None) if rng is None else rng
        self.table = check_table(table, in_channels, out_channels)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel, self.stride, self.padding = kernel_size, stride, padding
        area = kernel_size * kernel_size
        pairs = [(o, i) for o, row in enumerate(self.table) for i in row]
        # host index arrays of the connections: output map and input map of each kernel
        self._out_index = host_zeros(len(pairs), "int64")
        self._in_index = host_zeros(len(pairs), "int64")
        fan_in = host_zeros((len(pairs), 1, 1), "float64")  # per kernel, broadcast over k x k
        fan_out = host_zeros((len(pairs), 1, 1), "float64")
        for m, (o, i) in enumerate(pairs):
            self._out_index[m], self._in_index[m] = o, i
            fan_in[m] = len(self.table[o]) * area
            fan_out[m] = sum(i in row for row in self.table) * area
        shape = (len(pairs), kernel_size, kernel_size)
        self.weight = Parameter(init_weights(shape, fan_in, fan_out, init, rng, dtype))
        bias_fan_in = host_zeros(out_channels, "float64")
        bias_fan_in[:] = [len(row) * area for row in self.table]
        self.bias = Parameter(init_biases((out_channels,), bias_fan_in, init, rng, dtype))
        self.needs_input_grad = True
        self._indices: dict[str, tuple[Any, Any]] = {}
        self._cache: Any = None

    @property
    def connections(self) -> int:
        """How many (output map, input map) kernels there are: ``weight.shape[0]``."""
        return int(self._out_index.size)

    def _index_arrays(self) -> tuple[Any, Any]:
        """The connections' output and input map indices on the weight's device (cached)."""
        device = device_of(self.weight.data)
        if device.name not in self._indices:
            self._indices[device.name] = (
                to_device(self._out_index, device),
                to_device(self._in_index, device),
            )
        return self._indices[device.name]

    def dense_weight(self) -> Any:
        """``(out_channels, in_channels, k, k)``: the kernels in place, zeros elsewhere."""
        w = self.weight.data
        k = self.kernel
        dense = get_array_module(w).zeros(
            (self.out_channels, self.in_channels, k, k), dtype=w.dtype
        )
        out_index, in_index = self._index_arrays()
        dense[out_index, in_index] = w
        return dense

    def sparse_weight(self, dense: Any) -> Any:
        """The reverse of :meth:`dense_weight`: the kernels ``(connections, k, k)`` of a dense
        ``(out_channels, in_channels, k, k)`` weight (any device), in this layer's order.
        Raises ``ValueError`` for another shape, or a non-zero kernel outside the table."""
        want = (self.out_channels, self.in_channels, self.kernel, self.kernel)
        if tuple(dense.shape) != want:
            raise ValueError(f"has shape {tuple(dense.shape)}, expected {want}")
        xp, device = get_array_module(dense), device_of(dense)
        out_index, in_index = (to_device(i, device) for i in (self._out_index, self._in_index))
        outside = xp.ones(want[:2], dtype=bool)
        outside[out_index, in_index] = False
        if bool((dense[outside] != 0).any()):
            raise ValueError("has non-zero kernels outside the connection table")
        return dense[out_index, in_index]

    def forward(self, x: Any) -> Any:
        """``x (N, in_channels, H, W)`` -> ``(N, out_channels, OH, OW)`` (batch-innermost)."""
        dense = self.dense_weight()
        y, cache = conv2d_forward(
            x, dense, self.bias.data, self.stride, self.padding, self._kernels(x)
        )
        self._cache = (cache, dense) if self.training else None
        return y

    def backward(self, grad_y: Any) -> Any:
        cache, dense = self._cache
        grad_x, grad_dense, grad_b = conv2d_backward(
            grad_y,
            cache,
            dense,
            need_grad_x=self.needs_input_grad,
            kernels=self._kernels(grad_y),
        )
        out_index, in_index = self._index_arrays()
        self.weight.grad = grad_dense[out_index, in_index]  # (connections, k, k), a copy
        self.bias.grad = grad_b
        self._cache = None
        return grad_x

    def macs(self, x_shape: tuple[int, ...], y_shape: tuple[int, ...]) -> int:
        """Only the real connections: ``connections * k * k`` per output position."""
        return self.connections * self.kernel * self.kernel * y_shape[2] * y_shape[3]
