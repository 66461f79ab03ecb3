"""Any preset's network as an ONNX graph of plain ONNX operators (built with the ``onnx``
package; ``pip install "lenet_xp[onnx]"``).

The graph takes what :func:`lenet_xp.predict.predict` takes, MNIST-style pixels, and does the
rest itself, so a consumer (onnxruntime, a browser) needs no knowledge of this package:

* input ``pixels``: ``(N, 1, 28, 28)`` float32 in [0, 1], white digit on black (MNIST's
  bytes / 255; ``N`` is free);
* outputs ``logits`` ``(N, 10)`` float32 and ``probabilities`` ``(N, 10)`` (their softmax).

Inside: ``(pixels - MEAN) / STD``, a ``Pad`` to 32x32 for 32x32 models (``lenet5 --pad32``,
``lenet5-classic``), then one or a few operators per layer, in eval mode: ``Conv``
(:class:`PartialConv2d` as a ``Conv`` whose weight is zero outside its connection table),
``MaxPool``, ``AveragePool`` (:class:`TrainableSubsampling`: ``AveragePool``, ``Mul``, ``Add``
per channel), ``Relu``, ``LeakyRelu``, ``Sigmoid``, ``Tanh`` (:class:`LeCunTanh`: ``Mul``,
``Tanh``, ``Mul``), ``BatchNormalization`` (running statistics), ``Flatten``, ``Gemm``
(:class:`RBFOutput`: ``2 x.c - |x|^2 - |c|^2`` as ``Gemm`` and ``ReduceSumSquare``);
``Dropout`` is left out. Weights are float32 whatever the model's dtype.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lenet_xp.backend import asnumpy
from lenet_xp.data.mnist import BACKGROUND, MEAN, STD
from lenet_xp.layers import (
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Dropout,
    Flatten,
    LeakyReLU,
    LeCunTanh,
    Linear,
    MaxPool2d,
    Module,
    PartialConv2d,
    RBFOutput,
    ReLU,
    Sequential,
    Sigmoid,
    Tanh,
    TrainableSubsampling,
)
from lenet_xp.storage.checkpoint import atomic_write

#: The ONNX operator set the graphs use, and the IR version that goes with it (opset 17 is
#: IR 8: read by onnxruntime >= 1.13 and every current ONNX tool).
OPSET = 17
IR_VERSION = 8


class ExportError(Exception):
    """The model cannot be exported (a layer with no ONNX form, onnx missing); one line."""


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ExportError('exporting to ONNX needs onnx: pip install "lenet_xp[onnx]"') from None
    return onnx


class _Graph:
    """Nodes and float32 initializers, each output named after its layer."""

    def __init__(self, helper: Any, numpy_helper: Any) -> None:
        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []

    def const(self, name: str, value: Any, dtype: Any = np.float32) -> str:
        self.inits.append(self.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: Any) -> str:
        self.nodes.append(self.helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name


def _layer(g: _Graph, name: str, layer: Module, x: str) -> str:
    """Add ``layer`` (named ``name``) applied to tensor ``x``; returns its output's name."""
    w = getattr(layer, "weight", None)
    if isinstance(layer, (Conv2d, PartialConv2d)):
        weight = layer.dense_weight() if isinstance(layer, PartialConv2d) else w.data
        k, s, p = weight.shape[-1], layer.stride, layer.padding
        inputs = [x, g.const(f"{name}.weight", asnumpy(weight))]
        if layer.bias is not None:
            inputs.append(g.const(f"{name}.bias", asnumpy(layer.bias.data)))
        return g.op("Conv", inputs, name, kernel_shape=[k, k], strides=[s, s], pads=[p] * 4)
    if isinstance(layer, (MaxPool2d, AvgPool2d)):
        op = "MaxPool" if isinstance(layer, MaxPool2d) else "AveragePool"
        k, s = layer.kernel, layer.stride
        return g.op(op, [x], name, kernel_shape=[k, k], strides=[s, s])
    if isinstance(layer, TrainableSubsampling):  # weight * (window sum) + bias, per channel
        k = layer.kernel
        mean = g.op("AveragePool", [x], f"{name}.mean", kernel_shape=[k, k], strides=[k, k])
        scale = asnumpy(w.data).reshape(-1, 1, 1) * (k * k)
        y = g.op("Mul", [mean, g.const(f"{name}.scale", scale)], f"{name}.scaled")
        return g.op(
            "Add", [y, g.const(f"{name}.bias", asnumpy(layer.bias.data)[:, None, None])], name
        )
    if isinstance(layer, (BatchNorm1d, BatchNorm2d)):  # eval mode: the running statistics
        state = layer.state_dict()
        keys = ("weight", "bias", "running_mean", "running_var")
        inputs = [x] + [g.const(f"{name}.{key}", asnumpy(state[key])) for key in keys]
        return g.op("BatchNormalization", inputs, name, epsilon=float(layer.eps))
    if isinstance(layer, Linear):
        inputs = [x, g.const(f"{name}.weight", asnumpy(w.data))]
        if layer.bias is not None:
            inputs.append(g.const(f"{name}.bias", asnumpy(layer.bias.data)))
        return g.op("Gemm", inputs, name, transB=1)
    if isinstance(layer, RBFOutput):  # -|x - c|^2 = 2 x.c - |x|^2 - |c|^2, as the layer does
        c = asnumpy(layer.centres.data).astype(np.float64)
        minus_c2 = g.const(f"{name}.minus_c2", -(c * c).sum(axis=1))
        xc = g.op("Gemm", [x, g.const(f"{name}.centres", c), minus_c2], f"{name}.xc",
                  alpha=2.0, transB=1)  # fmt: skip
        x2 = g.op("ReduceSumSquare", [x], f"{name}.x2", axes=[1], keepdims=1)
        return g.op("Sub", [xc, x2], name)
    if isinstance(layer, LeCunTanh):
        t = g.op("Mul", [x, g.const(f"{name}.slope", layer.slope)], f"{name}.in")
        t = g.op("Tanh", [t], f"{name}.tanh")
        return g.op("Mul", [t, g.const(f"{name}.amplitude", layer.amplitude)], name)
    if isinstance(layer, LeakyReLU):
        return g.op("LeakyRelu", [x], name, alpha=layer.negative_slope)
    simple = {ReLU: "Relu", Sigmoid: "Sigmoid", Tanh: "Tanh", Flatten: "Flatten"}
    if type(layer) in simple:
        return g.op(simple[type(layer)], [x], name)
    if isinstance(layer, Dropout):  # the identity in eval mode
        return x
    if isinstance(layer, Sequential):
        for child_name, child in layer.named_children():
            x = _layer(g, f"{name}.{child_name}" if name else child_name, child, x)
        return x
    raise ExportError(f"layer {name} ({type(layer).__name__}) has no ONNX form")


#: Configuration keys that describe the training machine, not the model: kept out of the
#: exported file (a local path has no business in a model that is shared).
LOCAL_KEYS = frozenset({"data_dir"})


def to_onnx(model: Module, meta: dict | None = None) -> Any:
    """``model`` (a ``Sequential``, any device and dtype) as a checked ``onnx.ModelProto``
    (opset :data:`OPSET`, IR :data:`IR_VERSION`); ``meta`` (a checkpoint's, optional) goes
    into the model's metadata as JSON. See the module docstring for inputs and outputs."""
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    if not isinstance(model, Sequential):
        raise ExportError(f"can only export a Sequential network, not a {type(model).__name__}")
    if model.input_size not in (28, 32):
        raise ExportError(
            f"the network takes {model.input_size}x{model.input_size} images, not 28x28"
        )
    g = _Graph(helper, numpy_helper)
    x = g.op("Sub", ["pixels", g.const("mean", MEAN)], "centred")
    x = g.op("Div", [x, g.const("std", STD)], "normalised")
    pad = (model.input_size - 28) // 2
    if pad:  # the background value, as --pad32 training and predict pad
        pads = g.const("pads", [0, 0, pad, pad, 0, 0, pad, pad], np.int64)
        x = g.op("Pad", [x, pads, g.const("background", BACKGROUND)], "padded")
    logits = _layer(g, "", model, x)
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))
    g.op("Softmax", ["logits"], "probabilities", axis=1)
    batch = ["N"]
    graph = helper.make_graph(
        g.nodes,
        f"lenet_xp {getattr(model, 'arch', type(model).__name__)}",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, batch + [1, 28, 28])],
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, batch + [10])
            for n in ("logits", "probabilities")
        ],  # fmt: skip
        g.inits,
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="lenet_xp",
        doc_string="pixels (N, 1, 28, 28) float32 in [0, 1], white digit on black -> "
        "logits (N, 10), probabilities (N, 10)",
    )
    if meta is not None:
        config = {k: v for k, v in meta.get("config", meta).items() if k not in LOCAL_KEYS}
        helper.set_model_props(proto, {"lenet_xp": json.dumps(config)})
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:  # a bug here, not the user's
        raise ExportError(f"the ONNX graph does not check: {str(exc).splitlines()[0]}") from None
    return proto


def save_onnx(model: Module, path: str | os.PathLike[str], meta: dict | None = None) -> Path:
    """Write :func:`to_onnx` of ``model`` to ``path`` (``.onnx``, atomically); returns the path."""
    proto, path = to_onnx(model, meta), Path(path)
    try:
        atomic_write(path, lambda f: f.write(proto.SerializeToString()), mode=0o644)
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
