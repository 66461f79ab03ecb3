"""Look inside a trained network: the output of every layer for one input, and its conv
filters as pictures.

Shared by the HTML report (:mod:`lenet_xp.report`) and the drawing page (:mod:`lenet_xp.serve`).
"""

from __future__ import annotations

from typing import Any

from lenet_xp.backend import CPU, asnumpy
from lenet_xp.layers import Conv2d, Module, PartialConv2d

np = CPU.xp  # filter pictures are host arrays


def layer_outputs(model: Module, x: Any) -> list[tuple[str, Any]]:
    """``[(layer name, output)]`` of each top-level layer of ``model`` (a ``Sequential``) for
    ``x (N, C, H, W)``, in order; outputs are host NumPy arrays. The model should be in
    ``eval()`` mode (the pass is an ordinary forward pass; no gradient is kept)."""
    outputs = []
    for name, layer in model.named_children():
        x = layer.forward(x)
        outputs.append((name, asnumpy(x).copy()))  # copy: in-place ReLUs reuse the buffer
    return outputs


def feature_maps(model: Module, x: Any) -> list[tuple[str, Any]]:
    """``[(layer name, maps (N, C, H, W))]``: the 4-D outputs of ``model``'s layers for ``x``
    (convolutions, pools, their activations), the pictures a person looks at."""
    return [(name, out) for name, out in layer_outputs(model, x) if out.ndim == 4]


MAX_TILES = 16  # filters drawn per row and per column of a layer's mosaic


def conv_filters(model: Module) -> list[tuple[str, Any]]:
    """``[(layer name, weight (out, in, k, k) host float)]`` of every convolution in
    ``model``, nested ones too (a :class:`PartialConv2d` as its dense equivalent)."""
    found = []

    def walk(module: Module, prefix: str) -> None:
        for name, child in module.named_children():
            if isinstance(child, PartialConv2d):
                found.append((prefix + name, asnumpy(child.dense_weight())))
            elif isinstance(child, Conv2d):
                found.append((prefix + name, asnumpy(child.weight.data)))
            walk(child, prefix + name + ".")

    walk(model, "")
    return found


def mosaic(tiles: Any, cols: int) -> Any:
    """``tiles (n, h, w)`` laid out ``cols`` to a row with one-pixel NaN gaps (drawn blank):
    a ``(rows * (h + 1) - 1, cols * (w + 1) - 1)`` float array."""
    n, h, w = tiles.shape
    rows = -(-n // cols)
    grid = np.full((rows * (h + 1), cols * (w + 1)), np.nan)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = tile
    return grid[:-1, :-1]


def filter_mosaic(weight: Any) -> Any:
    """A conv ``weight (out, in, k, k)`` as one picture: a row per input channel, a column per
    output channel (at most :data:`MAX_TILES` of each)."""
    w = weight[:MAX_TILES, :MAX_TILES]
    return mosaic(w.transpose(1, 0, 2, 3).reshape(-1, *w.shape[2:]), w.shape[0])
