"""The fused blocks of ``lenet_xp.layers.fusion`` against the composition of their layers:
the same ``Sequential`` run with our kernels (the blocks, on the GPU or the CuPy stand-in,
where the kernels run in the CUDA emulator) and without them (the layers' array code), on the
same device: outputs, the input's gradient and every parameter's gradient, float64 to 1e-12
and float32 to its rounding."""

import numpy as np
import pytest
from conftest import needs_cuda

from lenet_xp.backend import asnumpy, get_device, host_rng, to_device
from lenet_xp.layers import (
    LENET5_C3_TABLE,
    Conv2d,
    Flatten,
    LeCunTanh,
    Linear,
    MaxPool2d,
    PartialConv2d,
    RBFOutput,
    ReLU,
    Sequential,
    Sigmoid,
    Tanh,
    TrainableSubsampling,
)
from lenet_xp.layers.fusion import ConvAct, ConvActSubsampleAct, ConvPoolAct, LinearAct

pytestmark = needs_cuda
RTOL = {"float64": 1e-12, "float32": 2e-5}


def _c1_s2(kw):  # LeCun's C1 -> S2, squashed before and after the subsampling
    return [Conv2d(2, 3, 5, **kw), LeCunTanh(), TrainableSubsampling(3, 2, **kw), LeCunTanh()]


def _c3_s4(kw):  # the partial C3 (Table I) -> S4
    conv = PartialConv2d(6, 16, 5, LENET5_C3_TABLE, **kw)
    return [conv, LeCunTanh(), TrainableSubsampling(16, 2, **kw), LeCunTanh()]


def _c5_f6(kw):  # C5 (1 x 1 maps) -> F6
    return [Conv2d(16, 120, 5, **kw), LeCunTanh(), Flatten(), Linear(120, 84, **kw), LeCunTanh()]


def _mixed(kw):  # other activations each side; 9 x 9 maps: a row and column left out
    return [Conv2d(1, 4, 5, padding=0, **kw), ReLU(), TrainableSubsampling(4, 2, **kw), Sigmoid()]


def _f6_rbf(kw):  # F6 -> LeCun's RBF output: one kernel each way
    return [Linear(120, 84, **kw), LeCunTanh(), RBFOutput(84, dtype=kw["dtype"])]


def _partial_max(kw):
    return [PartialConv2d(6, 16, 5, LENET5_C3_TABLE, **kw), MaxPool2d(2), Tanh()]


#: name -> (layers, input shape (N, C, H, W), the blocks the plan must form)
CASES = {
    "c1-s2": (_c1_s2, (4, 2, 12, 12), [ConvActSubsampleAct]),
    "c3-s4": (_c3_s4, (3, 6, 14, 14), [ConvActSubsampleAct]),
    "c5-f6": (_c5_f6, (5, 16, 5, 5), [ConvAct, Flatten, LinearAct]),
    "mixed": (_mixed, (3, 1, 13, 13), [ConvActSubsampleAct]),
    "partial-max": (_partial_max, (2, 6, 14, 14), [ConvPoolAct]),
    "f6-rbf": (_f6_rbf, (6, 120), [LinearAct, RBFOutput]),
}


def _run(model, x, grad_y, kernels: bool):
    """Forward and backward with or without our kernels: host copies of the output, the
    input's gradient and each parameter's gradient, and what ran."""
    model.use_cuda_kernels(kernels)
    y = model.forward(x)
    steps = [type(step) for step in model._steps]
    grad_x = model.backward(grad_y.copy())  # a block may take the gradient over, in place
    grads = {
        name: p.grad if p.grad is None else asnumpy(p.grad) for name, p in model.named_parameters()
    }
    for p in model.parameters():
        p.grad = None
    return asnumpy(y), asnumpy(grad_x), grads, steps


def _close(actual, expected, dtype):
    rtol = RTOL[dtype]
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_fused_block_equals_its_layers(case, dtype):
    build, shape, blocks = CASES[case]
    device = get_device("cuda")
    rng = host_rng(7)
    model = Sequential(build({"rng": rng, "dtype": dtype})).to(device)
    x = to_device(rng.standard_normal(shape).astype(dtype), device)
    model.use_cuda_kernels(False)
    y_shape = model.forward(x).shape
    grad_y = to_device(rng.standard_normal(y_shape).astype(dtype), device)
    fused = _run(model, x, grad_y, True)
    layers = _run(model, x, grad_y, False)
    assert fused[3] == blocks, fused[3]
    assert layers[3] == [type(layer) for layer in model.layers()]
    for got, want in zip(fused[:2], layers[:2], strict=True):
        _close(got, want, dtype)
    assert fused[2].keys() == layers[2].keys()
    for name, want in layers[2].items():
        if want is not None:
            _close(fused[2][name], want, dtype)
        else:
            assert fused[2][name] is None, name
