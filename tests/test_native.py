"""The compiled CPU kernels (:mod:`lenet_xp.native`, Numba) against their NumPy references:
the same bits (each kernel does the reference's operations in its order), in float32 and
float64, with strides, padding, overlapping windows and NaNs; off with ``LENET_XP_NATIVE=0``
or for arrays they do not take; a training step's parameters the same bits either way."""

from __future__ import annotations

import numpy as np
import pytest

from lenet_xp import native
from lenet_xp.functional import conv, pool
from lenet_xp.layers import Conv2d, Linear, MaxPool2d, ReLU, Sequential
from lenet_xp.models import presets
from lenet_xp.native import pool as native_pool
from lenet_xp.optim.averaging import ParameterEMA
from lenet_xp.optim.optimizers import make_optimizer
from lenet_xp.training.workers import forward_backward

pytest.importorskip("numba")
DTYPES = [np.float32, np.float64]
#: ``(stride, padding)`` of the convolution tests: none, padding, both.
CONV_CASES = [(1, 0), (1, 2), (2, 1)]


@pytest.fixture(autouse=True)
def _reread_the_setting():
    """The setting each test leaves (monkeypatch restores the variable) is read afresh."""
    yield
    native.reread()


def both_ways(monkeypatch, fn):
    """``fn()`` with the compiled kernels off, then on: ``(reference, compiled)``."""
    monkeypatch.setenv("LENET_XP_NATIVE", "0")
    native.reread()
    assert not native.enabled()
    reference = fn()
    monkeypatch.setenv("LENET_XP_NATIVE", "1")
    native.reread()
    assert native.enabled()
    return reference, fn()


def chwn(rng, shape, dtype):
    """Random ``(N, C, H, W)`` values stored batch-innermost, as the layers hand them on."""
    n, c, h, w = shape
    return rng.standard_normal((c, h, w, n)).astype(dtype).transpose(3, 0, 1, 2)


def same_bits(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


@pytest.fixture(
    params=[(dtype, stride, padding) for dtype in DTYPES for stride, padding in CONV_CASES],
    ids=lambda case: f"{case[0].__name__}-stride{case[1]}-pad{case[2]}",
)
def conv_case(request):
    """A convolution's inputs: ``(rng, x (8, 3, 13, 13) batch-innermost, weight (4, 3, 5, 5),
    stride, padding)``, random in ``dtype``; ``rng`` goes on from where they were drawn."""
    dtype, stride, padding = request.param
    rng = np.random.default_rng(stride * 10 + padding)
    x = chwn(rng, (8, 3, 13, 13), dtype)
    weight = rng.standard_normal((4, 3, 5, 5)).astype(dtype)
    return rng, x, weight, stride, padding


def test_conv_backward_col2im(monkeypatch, conv_case):
    rng, x, weight, stride, padding = conv_case
    dtype = x.dtype
    y, cache = conv.conv2d_forward(x, weight, None, stride, padding)
    grad_y = chwn(rng, y.shape, dtype)
    reference, compiled = both_ways(
        monkeypatch, lambda: conv.conv2d_backward(grad_y, cache, weight)
    )
    assert all(same_bits(a, b) for a, b in zip(reference, compiled, strict=True))
    # and the reference is right: col2im is im2col's adjoint, <im2col(x), c> = <x, col2im(c)>
    cols = rng.standard_normal(conv.im2col(x, 5, 5, stride, padding).shape).astype(dtype)
    left = float((conv.im2col(x, 5, 5, stride, padding) * cols).sum(dtype=np.float64))
    right = float((x * conv.col2im(cols, x.shape, 5, 5, stride, padding)).sum(dtype=np.float64))
    assert left == pytest.approx(right, rel=1e-4 if dtype == np.float32 else 1e-12)


def test_im2col_and_conv_forward(monkeypatch, conv_case):
    _, x, weight, stride, padding = conv_case
    assert native_pool.batch_innermost(x) is not None  # the kernels take it
    cols = both_ways(monkeypatch, lambda: conv.im2col(x, 5, 5, stride, padding))
    assert same_bits(*cols)
    outputs = both_ways(monkeypatch, lambda: conv.conv2d_forward(x, weight, None, stride, padding))
    assert same_bits(outputs[0][0], outputs[1][0])
    # the reference against its definition: column (oh, ow, n) of row (c, i, j)
    x_pad = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    oh = (13 + 2 * padding - 5) // stride + 1
    row, (r, q, n) = (2 * 5 + 3) * 5 + 4, (oh - 1, 1, 5)
    assert cols[1][row, (r * oh + q) * 8 + n] == x_pad[n, 2, r * stride + 3, q * stride + 4]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel, stride", [(2, 2), (3, 2), (3, 3)])
def test_max_pool_forward_and_backward(monkeypatch, dtype, kernel, stride):
    rng = np.random.default_rng(kernel * 10 + stride)
    x = chwn(rng, (16, 3, 12, 12), dtype)
    x[0, 0, 0, :2] = np.nan  # a NaN makes its window's maximum NaN, in both
    x[1, 1, :2, :2] = 0.5  # ties: the first maximum takes the gradient
    (y0, at0), (y1, at1) = both_ways(
        monkeypatch, lambda: pool.max_pool2d_forward(x, kernel, stride)
    )
    assert same_bits(y0, y1) and same_bits(at0, at1) and np.isnan(y1[0, 0, 0, 0])
    assert y1.transpose(1, 2, 3, 0).flags.c_contiguous  # batch-innermost, as the reference
    grad_y = chwn(rng, y0.shape, dtype)
    grads = both_ways(monkeypatch, lambda: pool.max_pool2d_backward(grad_y, at0, x, kernel, stride))
    assert same_bits(*grads)
    assert float(grads[1].sum(dtype=np.float64)) == pytest.approx(
        float(grad_y.sum(dtype=np.float64)), rel=1e-5
    )  # every window's gradient lands somewhere, once


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, decay", [("adam", 0.0), ("adam", 0.01), ("adamw", 0.01)])
def test_adam_steps(monkeypatch, dtype, name, decay):
    def steps():
        rng = np.random.default_rng(0)
        model = presets.build_from_config({"arch": "lenet5", "seed": 1, "dtype": dtype.__name__})
        optimizer = make_optimizer(name, model.parameters(), 1e-2, decay, 0.9, None)
        for _ in range(5):
            for param in model.parameters():
                param.grad = rng.standard_normal(param.data.shape).astype(dtype)
            optimizer.step()
        return [p.data.copy() for p in model.parameters()]

    reference, compiled = both_ways(monkeypatch, steps)
    assert all(same_bits(a, b) for a, b in zip(reference, compiled, strict=True))


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_average_updates(monkeypatch, dtype):
    def updates():
        rng = np.random.default_rng(1)
        model = presets.build_from_config({"arch": "lenet5", "seed": 2, "dtype": dtype.__name__})
        average = ParameterEMA(model.parameters(), 0.99)
        for _ in range(4):
            for param in model.parameters():
                param.data += rng.standard_normal(param.data.shape).astype(dtype)
            average.update()
        return average.averages

    reference, compiled = both_ways(monkeypatch, updates)
    assert all(same_bits(a, b) for a, b in zip(reference, compiled, strict=True))


def test_training_steps_are_the_same_bits(monkeypatch):
    """Forward, backward and Adam over a few LeNet-5 batches: the parameters after them."""

    def train():
        rng = np.random.default_rng(3)
        model = presets.build_from_config({"arch": "lenet5", "seed": 0})
        optimizer = make_optimizer("adam", model.parameters(), 1e-3, 0.0, 0.9, None)
        for _ in range(3):
            x = rng.standard_normal((32, 1, 28, 28)).astype(np.float32)
            forward_backward(model, x, rng.integers(0, 10, 32))
            optimizer.step()
        return [p.data.copy() for p in model.parameters()]

    reference, compiled = both_ways(monkeypatch, train)
    assert all(same_bits(a, b) for a, b in zip(reference, compiled, strict=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("side", [6, 7])
def test_conv_pool_relu_block_gives_its_layers_bits(monkeypatch, dtype, side):
    """``conv -> max-pool -> ReLU`` as the fused block (the convolution's GEMM, then one
    compiled pass each way) against the three layers: outputs and every gradient, with a
    NaN, ties, negative zeros and windows whose maximum is negative; ``side`` 7: a last row
    and column that no window covers (their gradient is 0)."""

    def run():
        conv = Conv2d(2, 3, 1)
        model = Sequential(conv, MaxPool2d(2), ReLU()).astype(np.dtype(dtype).name)
        conv.weight.data = np.zeros((3, 2, 1, 1), dtype)
        conv.weight.data[:, 0] = [[[1.0]], [[-1.0]], [[0.5]]]  # the input itself, negated, halved
        conv.bias.data = np.array([0.0, -0.0, 0.25], dtype)
        rng = np.random.default_rng(7)
        x = chwn(rng, (5, 2, side, side), dtype)
        x[0, 0, 0, 0] = np.nan  # a NaN window
        x[1, 0, :2, :2] = 0.5  # ties
        x[2, 0, :2, :2] = -0.0  # negative zeros: ReLU gives +0 (NumPy's maximum)
        x[3, 0, 2:4, 2:4] = -1.0  # a negative maximum: ReLU zeroes it, no gradient passes
        out = model.forward(x)
        steps = [type(step).__name__ for step in model._steps]
        grad_x = model.backward(chwn(rng, out.shape, dtype))
        grads = [p.grad.copy() for p in model.parameters()]
        return steps, [out.copy(), grad_x.copy(), *grads]

    (steps0, reference), (steps1, fused) = both_ways(monkeypatch, run)
    assert steps0 == ["Conv2d", "MaxPool2d", "ReLU"] and steps1 == ["ConvPoolAct"]
    assert all(same_bits(a, b) for a, b in zip(reference, fused, strict=True))
    assert np.isnan(fused[0][0, 0, 0, 0]) and not np.signbit(fused[0][2, 0]).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_relu_block_gives_its_layers_bits(monkeypatch, dtype):
    """``linear -> ReLU`` as the fused block (the GEMM, then bias and ReLU in one compiled
    pass; ReLU's gradient in one) against the two layers, with a NaN and negative zeros."""

    def run():
        linear = Linear(4, 3)
        model = Sequential(linear, ReLU()).astype(np.dtype(dtype).name)
        linear.weight.data = np.array([[1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 1, 1]], dtype)
        linear.bias.data = np.array([0.0, -0.0, -0.5], dtype)
        x = np.random.default_rng(8).standard_normal((6, 4)).astype(dtype)
        x[0, 0], x[1, 1], x[2, 0] = np.nan, 0.0, -0.0  # NaN; -0 from -1 * 0; -0 + 0
        out = model.forward(x)
        steps = [type(step).__name__ for step in model._steps]
        grad_x = model.backward(np.random.default_rng(9).standard_normal(out.shape).astype(dtype))
        return steps, [out.copy(), grad_x.copy(), *(p.grad.copy() for p in model.parameters())]

    (steps0, reference), (steps1, fused) = both_ways(monkeypatch, run)
    assert steps0 == ["Linear", "ReLU"] and steps1 == ["LinearAct"]
    assert all(same_bits(a, b) for a, b in zip(reference, fused, strict=True))


@pytest.mark.parametrize("arch", list(presets.PRESETS))
def test_every_preset_steps_to_the_same_bits(monkeypatch, arch):
    """Forward and backward of every preset (the blocks the CPU fuses, and those it does
    not), with the compiled kernels and without: the loss and every gradient."""

    def step():
        model = presets.build_from_config({"arch": arch, "seed": 0})
        side = model.input_size
        rng = np.random.default_rng(4)
        x = rng.standard_normal((8, 1, side, side)).astype(np.float32)
        loss, _ = forward_backward(model, x, rng.integers(0, 10, 8))
        return [np.asarray(loss)] + [p.grad for p in model.parameters() if p.grad is not None]

    reference, compiled = both_ways(monkeypatch, step)
    assert all(same_bits(a, b) for a, b in zip(reference, compiled, strict=True))


def test_a_wrapped_layer_runs_as_itself(monkeypatch):
    """A layer whose ``forward`` is wrapped (``LayerStats`` sampling its output) is not
    fused away: the wrapper sees the output; the other blocks still fuse."""
    monkeypatch.setenv("LENET_XP_NATIVE", "1")
    native.reread()
    model = presets.build_from_config({"arch": "lenet5", "seed": 0})
    seen = []
    forward = model.relu1.forward
    model.relu1.forward = lambda x: seen.append(forward(x)) or seen[-1]
    model.forward(np.zeros((4, 1, 28, 28), np.float32))
    assert [type(s).__name__ for s in model._steps[:4]] == [
        "Conv2d",
        "MaxPool2d",
        "ReLU",
        "ConvPoolAct",
    ]
    assert len(seen) == 1 and seen[0].shape == (4, 6, 14, 14)


def test_what_the_kernels_take(monkeypatch):
    monkeypatch.setenv("LENET_XP_NATIVE", "1")
    native.reread()
    a = np.zeros((4, 4), np.float32)
    assert native.fits(a, np.ones((2,), np.float32))
    assert not native.fits(a, np.zeros((4, 4), np.float64))  # one dtype
    assert not native.fits(a.T[::2])  # not C-contiguous
    assert not native.fits(np.zeros(3, np.int64))  # not a float
    assert native.fits(np.zeros(3, np.uint8), dtypes=(np.dtype(np.uint8),))  # asked for
    # batch-innermost (N, C, H, W) views: the same checks, on their (C, H, W, N) memory
    stored = np.zeros((3, 4, 4, 2), np.float32).transpose(3, 0, 1, 2)  # N innermost
    assert native_pool.batch_innermost(stored).base is stored.base
    assert native_pool.batch_innermost(stored.astype(np.uint8), "uint8") is not None
    assert native_pool.batch_innermost(stored.astype(np.uint8)) is None  # not a float
    assert native_pool.batch_innermost(stored.astype(np.float64), "float32") is None
    assert native_pool.batch_innermost(np.ascontiguousarray(stored)) is None  # N outermost
    assert native_pool.batch_innermost(a) is None  # not 4-D
    monkeypatch.setenv("LENET_XP_NATIVE", "0")
    native.reread()
    assert not native.fits(a)
    assert native_pool.batch_innermost(stored) is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_warm_up_compiles_every_kernel(monkeypatch, dtype):
    """Training calls it in each process before the first step; for a GPU array or with the
    kernels off it does nothing."""
    monkeypatch.setenv("LENET_XP_NATIVE", "1")
    native.reread()
    native.warm_up(np.zeros(3, dtype))
    native.warm_up(None)
    monkeypatch.setenv("LENET_XP_NATIVE", "0")
    native.reread()
    native.warm_up(np.zeros(3, dtype))


def test_without_numba_the_numpy_code_runs(monkeypatch):
    """An install without Numba (``sys.modules`` refuses the import): the kernels are off
    and a training step runs NumPy alone, the same bits as with them."""
    import sys

    def step():
        rng = np.random.default_rng(5)
        model = presets.build_from_config({"arch": "lenet5", "seed": 4})
        optimizer = make_optimizer("adam", model.parameters(), 1e-3, 0.0, 0.9, 0.9)
        forward_backward(
            model, rng.standard_normal((16, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 16)
        )
        optimizer.step()
        return [p.data.copy() for p in model.parameters()] + optimizer.average.averages

    monkeypatch.setenv("LENET_XP_NATIVE", "1")
    native.reread()
    compiled = step()
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba -> ImportError
    native.reread()
    try:
        assert not native.enabled()
        native.warm_up(np.zeros(3, np.float32))  # nothing to compile, no error
        plain = step()
    finally:
        native.reread()
    assert all(same_bits(a, b) for a, b in zip(plain, compiled, strict=True))


def test_the_alternating_benchmark_times_both_paths(monkeypatch, capsys):
    from lenet_xp.benchmarks import native_ab

    monkeypatch.setenv("LENET_XP_NATIVE", "1")
    native.reread()
    native_ab.main(["--workers", "2", "--rounds", "2", "--limit-train", "2560"])
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:3]}
    assert set(rows) == {"native", "numpy"} and all(len(v) == 3 for v in rows.values())
    assert all(float(t) > 0 for v in rows.values() for t in v)
    assert lines[3].startswith("the compiled kernels take ")
    assert native.enabled()  # the setting it found is back
