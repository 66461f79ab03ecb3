"""Look inside a trained network: the output of every layer for one input.

Shared by the HTML report (:mod:`lenet_xp.report`) and the drawing page (:mod:`lenet_xp.serve`).
"""

from __future__ import annotations

from typing import Any

from lenet_xp.backend import asnumpy
from lenet_xp.layers import Module


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
