"""``model.summary()``: a table of a model's layers, like Keras', with multiply-adds.

One row per top-level layer: name, type, output shape ``(N, C, H, W)``, parameters and
multiply-accumulates per image (each layer's ``macs(x_shape, y_shape)``: convolutions and
fully connected layers count their products; pooling, activations and the like count 0).
Totals: parameters, MACs per image and the memory of the activations a training step keeps
for a batch (every layer's output, ``batch`` images, the model's dtype).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from lenet_xp.backend import device_of, host_zeros, to_device

if TYPE_CHECKING:  # the module calls this, not the reverse
    from lenet_xp.layers.module import Module


def summarize(model: Module, batch: int = 128, input_shape: tuple[int, ...] | None = None) -> str:
    """The summary table of ``model`` (a :class:`Sequential`) for images of ``input_shape``
    ``(C, H, W)`` (default: the model's ``input_shape``), as text."""
    shape = input_shape or getattr(model, "input_shape", None) or (1, 28, 28)
    params = model.parameters()
    dtype = str(params[0].data.dtype) if params else "float32"
    device_array = params[0].data if params else host_zeros(1)
    x = to_device(host_zeros((1, *shape), dtype), device_of(device_array))
    was_training = model.training
    model.eval()
    rows = []
    try:
        for name, layer in model.named_children():
            y = layer.forward(x)
            count = sum(int(p.data.size) for p in layer.parameters())
            rows.append((name, type(layer).__name__, tuple(y.shape[1:]), count,
                         layer.macs(tuple(x.shape), tuple(y.shape))))  # fmt: skip
            x = y
    finally:
        model.train(was_training)
    itemsize = host_zeros((), dtype).itemsize
    activation_bytes = sum(math.prod(out) for _, _, out, _, _ in rows) * batch * itemsize
    width = max([len(r[0]) for r in rows] + [5])
    lines = [
        f"{type(model).__name__}" + (f" (--arch {model.arch})" if hasattr(model, "arch") else ""),
        f"{'layer':<{width}}  {'type':<20} {'output shape':<18} {'params':>9} {'MACs/image':>12}",
    ]
    for name, kind, out, count, macs in rows:
        shape_text = "(N, " + ", ".join(map(str, out)) + ")"
        lines.append(f"{name:<{width}}  {kind:<20} {shape_text:<18} {count:>9,} {macs:>12,}")
    total_params = model.num_parameters()
    total_macs = sum(r[4] for r in rows)
    lines.append(
        f"total: {total_params:,} parameters, {total_macs:,} MACs per image, activations "
        f"{activation_bytes / 2**20:.1f} MiB per batch of {batch} ({dtype})"
    )
    return "\n".join(lines)
