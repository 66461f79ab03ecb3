"""Every CUDA kernel of ``lenet_xp/kernels`` run on the CPU (``cuda_emulator``) against the
package's array code, for float32 and float64; and the emulator's own checks.

All kernel launches here run with bounds checking: arrays sit between guard pages, so any
access outside an argument's memory fails the test (see ``cuda_emulator``).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from lenet_xp.data.device_split import shift_images
from lenet_xp.functional import activation as F
from lenet_xp.functional.conv import col2im, im2col, output_size
from lenet_xp.functional.loss import RBF_LOSS_J, log_softmax, rbf_loss, softmax_cross_entropy
from lenet_xp.functional.pool import (
    avg_pool2d_backward,
    avg_pool2d_forward,
    max_pool2d_backward,
    max_pool2d_forward,
)
from lenet_xp.kernels import (
    ACTIVATION_CODES,
    GEMM_TILE,
    LOSS_THREADS,
    SOURCES,
    SUBSAMPLE_THREADS,
    THREADS,
)
from lenet_xp.layers import BatchNorm1d, LeCunTanh, RBFOutput, TrainableSubsampling
from lenet_xp.layers.module import Parameter
from lenet_xp.optim import make_optimizer
from lenet_xp.testing.cuda_emulator import EmulatedModule, KernelFaultError, compiler_available

_NO_CXX = compiler_available()
pytestmark = pytest.mark.skipif(_NO_CXX is not None, reason=_NO_CXX or "")

DTYPES = (np.float32, np.float64)
CTYPE = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
i32, i64 = np.int32, np.int64


@pytest.fixture(scope="module", params=[False, True], ids=["exact", "gpu-math"])
def modules(request) -> dict[str, EmulatedModule]:
    """Every kernel source compiled for the CPU (cached across runs), bounds-checked: once
    with exact IEEE arithmetic and once as NVRTC compiles for CuPy (fused multiply-adds,
    denormals flushed), so a tolerance that holds only without FMA fails here too."""
    gpu_math = request.param
    with ThreadPoolExecutor(max_workers=2) as pool:
        built = pool.map(lambda f: EmulatedModule(f, check_bounds=True, gpu_math=gpu_math), SOURCES)
        return dict(zip(SOURCES, built, strict=True))


def kernel(modules, file: str, name: str, dtype):
    return modules[file].get_function(f"{name}<{CTYPE[np.dtype(dtype)]}>")


def launch_1d(fn, total: int, args: tuple, how: str = "cover") -> None:
    """``cover``: one thread per element (as ``ops``); ``gridstride``: 3 blocks of 64."""
    if how == "cover":
        fn((max(1, -(-total // THREADS)),), (THREADS,), args)
    else:
        fn((3,), (64,), args)


def assert_close(actual, expected, dtype) -> None:
    """Within the dtype's relative tolerance of the reference's scale."""
    rtol = RTOL[np.dtype(dtype)]
    scale = float(np.abs(expected).max()) if np.size(expected) else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def elem_strides(array) -> list:
    return [i64(s // array.itemsize) for s in array.strides]


# -- conv.cu ------------------------------------------------------------------------------
CONV_CASES = [  # n, c, h, w, kh, kw, stride, pad
    (3, 2, 7, 9, 3, 3, 1, 0),
    (2, 3, 8, 7, 5, 5, 1, 2),
    (5, 1, 9, 11, 3, 2, 2, 0),
    (1, 2, 10, 9, 4, 3, 2, 2),
    (4, 6, 14, 14, 5, 5, 1, 0),
]


def _conv_input(rng, n, c, h, w, dtype, layout):
    if layout == "nchw":
        return rng.standard_normal((n, c, h, w)).astype(dtype)
    if layout == "chwn":  # batch innermost, passed as a transposed view
        return rng.standard_normal((c, h, w, n)).astype(dtype).transpose(3, 0, 1, 2)
    base = rng.standard_normal((n, 2 * c, h, w + 3)).astype(dtype)  # a non-dense view
    return base[:, ::2, :, 1 : w + 1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "chwn", "sliced"])
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("how", ["cover", "gridstride"])
def test_im2col(modules, dtype, layout, case, how):
    n, c, h, w, kh, kw, stride, pad = case
    rng = np.random.default_rng(1)
    x = _conv_input(rng, n, c, h, w, dtype, layout)
    oh, ow = output_size(h, kh, stride, pad), output_size(w, kw, stride, pad)
    cols = np.full((c * kh * kw, oh * ow * n), np.nan, dtype)
    args = (x, cols, *map(i32, (n, c, h, w)), *elem_strides(x))
    args += tuple(map(i32, (kh, kw, stride, pad, oh, ow)))
    launch_1d(kernel(modules, "conv.cu", "im2col", dtype), cols.size, args, how)
    np.testing.assert_array_equal(cols, im2col(x, kh, kw, stride, pad))  # a copy: bit-exact


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("how", ["cover", "gridstride"])
def test_col2im(modules, dtype, case, how):
    n, c, h, w, kh, kw, stride, pad = case
    rng = np.random.default_rng(2)
    oh, ow = output_size(h, kh, stride, pad), output_size(w, kw, stride, pad)
    cols = rng.standard_normal((c * kh * kw, oh * ow * n)).astype(dtype)
    grad = np.full((c, h, w, n), np.nan, dtype)
    args = (cols, grad, *map(i32, (n, c, h, w, kh, kw, stride, pad, oh, ow)))
    launch_1d(kernel(modules, "conv.cu", "col2im", dtype), grad.size, args, how)
    expected = col2im(cols, (n, c, h, w), kh, kw, stride, pad).transpose(1, 2, 3, 0)
    # the same adds in the same (i, j) order as the reference: bit-exact
    np.testing.assert_array_equal(grad, expected)


# -- pool.cu ------------------------------------------------------------------------------
POOL_CASES = [  # c, h, w, n, k
    (3, 8, 8, 5, 2),
    (2, 7, 9, 3, 2),  # H and W not multiples of K
    (4, 10, 11, 1, 3),
    (6, 28, 28, 4, 2),
    (2, 11, 10, 7, 5),
]


#: Each activation code of the kernels and the layers' own forward and backward (from the
#: output) it must reproduce.
ACTS = {
    "relu": (ACTIVATION_CODES["ReLU"], F.relu_forward, F.relu_backward),
    "sigmoid": (ACTIVATION_CODES["Sigmoid"], F.sigmoid_forward, F.sigmoid_backward),
    "tanh": (ACTIVATION_CODES["Tanh"], F.tanh_forward, F.tanh_backward),
    "lecun_tanh": (
        ACTIVATION_CODES["LeCunTanh"],
        lambda x: F.scaled_tanh_forward(x, LeCunTanh.amplitude, LeCunTanh.slope)[0],
        lambda g, y: F.scaled_tanh_backward(
            g, y / LeCunTanh.amplitude, LeCunTanh.amplitude, LeCunTanh.slope
        ),
    ),
}


def _pool_forward_reference(y, bias, k, act="relu"):
    z = y if bias is None else y + bias[:, None, None, None]
    x_nchw = z.transpose(3, 0, 1, 2)
    pooled, argmax = max_pool2d_forward(x_nchw, k, k)
    return x_nchw, ACTS[act][1](pooled), argmax


def _same(actual, expected, dtype, act):
    """ReLU's values exactly; tanh's (a library function, FMA) to the dtype's rounding."""
    if act == "relu":
        np.testing.assert_array_equal(actual, expected)
    else:
        assert_close(actual, expected, dtype)


def _has_ties(z, k):
    c, h, w, n = z.shape
    oh, ow = h // k, w // k
    windows = z[:, : oh * k, : ow * k].reshape(c, oh, k, ow, k, n)
    top = windows.max(axis=(2, 4), keepdims=True)
    return bool(((windows == top).sum(axis=(2, 4)) > 1).any())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("act", sorted(ACTS))
def test_max_pool_bias_act(modules, dtype, case, with_bias, act):
    c, h, w, n, k = case
    rng = np.random.default_rng(3)
    # quantised: equal maxima in a window are common, and y + bias is exact
    y = (rng.integers(-3, 4, size=(c, h, w, n)) * 0.5).astype(dtype)
    bias = (rng.integers(-2, 3, size=c) * 0.25).astype(dtype) if with_bias else None
    oh, ow = h // k, w // k
    out = np.full((c, oh, ow, n), np.nan, dtype)
    argmax = np.full((c, oh, ow, n), 255, np.uint8)
    args = (y, bias, out, argmax, *map(i32, (n, c, h, w, k, oh, ow, ACTS[act][0])))
    launch_1d(kernel(modules, "pool.cu", "max_pool_bias_act", dtype), out.size, args)
    x_nchw, ref_out, ref_argmax = _pool_forward_reference(y, bias, k, act)
    assert _has_ties(x_nchw.transpose(1, 2, 3, 0), k)
    _same(out, ref_out.transpose(1, 2, 3, 0), dtype, act)
    np.testing.assert_array_equal(argmax, ref_argmax.transpose(1, 2, 3, 0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("how", ["cover", "gridstride"])
@pytest.mark.parametrize("act", sorted(ACTS))
def test_max_pool_act_backward(modules, dtype, case, how, act):
    c, h, w, n, k = case
    rng = np.random.default_rng(4)
    y = (rng.integers(-3, 4, size=(c, h, w, n)) * 0.5).astype(dtype)
    bias = (rng.integers(-2, 3, size=c) * 0.25).astype(dtype)
    x_nchw, ref_out, ref_argmax = _pool_forward_reference(y, bias, k, act)
    out = np.ascontiguousarray(ref_out.transpose(1, 2, 3, 0))
    argmax = np.ascontiguousarray(ref_argmax.transpose(1, 2, 3, 0))
    grad_out = rng.standard_normal(out.shape).astype(dtype)
    oh, ow = h // k, w // k
    grad_y = np.full((c, h, w, n), np.nan, dtype)
    args = (grad_out, out, argmax, grad_y, *map(i32, (n, c, h, w, k, oh, ow, ACTS[act][0])))
    fn = kernel(modules, "pool.cu", "max_pool_act_backward", dtype)
    launch_1d(fn, grad_y.size, args, how)
    # the activation's backward, then the pool's
    grad_pooled = ACTS[act][2](grad_out, out).transpose(3, 0, 1, 2)
    expected = max_pool2d_backward(grad_pooled, ref_argmax, x_nchw, k, k).transpose(1, 2, 3, 0)
    _same(grad_y, expected, dtype, act)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("act", sorted(ACTS))
def test_bias_act_avg_pool_and_backward(modules, dtype, case, act):
    """conv bias, activation, average pool (the layers' order for --pool avg) and back."""
    c, h, w, n, k = case
    rng = np.random.default_rng(5)
    y = rng.standard_normal((c, h, w, n)).astype(dtype)
    bias = rng.standard_normal(c).astype(dtype)
    code, forward, backward = ACTS[act]
    a_nchw = forward((y + bias[:, None, None, None]).transpose(3, 0, 1, 2))
    ref_out = avg_pool2d_forward(a_nchw, k, k).transpose(1, 2, 3, 0)
    oh, ow = h // k, w // k
    out = np.full((c, oh, ow, n), np.nan, dtype)
    act_out = np.full((c, h, w, n), np.nan, dtype)
    ints = map(i32, (n, c, h, w, k, oh, ow, code))
    fn = kernel(modules, "pool.cu", "bias_act_avg_pool", dtype)
    launch_1d(fn, out.size, (y, bias, act_out, out, *ints))
    _same(out, ref_out, dtype, act)
    inside = np.zeros((c, h, w, n), bool)
    inside[:, : oh * k, : ow * k] = True
    _same(act_out[inside], a_nchw.transpose(1, 2, 3, 0)[inside], dtype, act)
    grad_out = rng.standard_normal(out.shape).astype(dtype)
    grad_a = avg_pool2d_backward(grad_out.transpose(3, 0, 1, 2), a_nchw, k, k)
    expected = backward(grad_a, a_nchw).transpose(1, 2, 3, 0)
    grad_y = np.full((c, h, w, n), np.nan, dtype)
    fn = kernel(modules, "pool.cu", "act_avg_pool_backward", dtype)
    ints = map(i32, (n, c, h, w, k, oh, ow, code))
    launch_1d(fn, grad_y.size, (grad_out, act_out, grad_y, *ints), "gridstride")
    _same(grad_y, expected, dtype, act)


# -- subsample.cu -------------------------------------------------------------------------
def _subsample_reference(y, bias, coeff, sbias, k, act, act2, grad_out):
    """The layers' composition on ``y (C, H, W, N)``: bias, ``act``, TrainableSubsampling,
    ``act2``; and back from ``grad_out (C, OH, OW, N)``: ``(out, act_out, grad_y, grad_coeff,
    grad_sbias)``, batch-innermost."""
    _, forward, backward = ACTS[act]
    _, forward2, backward2 = ACTS[act2]
    sub = TrainableSubsampling(y.shape[0], k, dtype=y.dtype.name)
    sub.weight.data[...], sub.bias.data[...] = coeff, sbias
    a = forward((y + bias[:, None, None, None]).transpose(3, 0, 1, 2))
    out = forward2(sub.forward(a))
    grad_a = sub.backward(backward2(grad_out.transpose(3, 0, 1, 2), out))
    grad_y = backward(grad_a, a)
    chwn = [v.transpose(1, 2, 3, 0) for v in (out, a, grad_y)]
    return (*chwn, sub.weight.grad, sub.bias.grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("acts", [("lecun_tanh", "lecun_tanh"), ("relu", "sigmoid")])
def test_subsample_kernels_against_the_layers(modules, dtype, case, acts):
    """conv bias -> act -> trainable subsampling -> act2 (LeCun's C1-S2) and back, the
    coefficient and bias gradients included, against the layers (windows that H or W does not
    fill get no gradient)."""
    c, h, w, n, k = case
    act, act2 = acts
    rng = np.random.default_rng(15)
    y, grad_out_full = (rng.standard_normal(s).astype(dtype) for s in ((c, h, w, n),) * 2)
    bias, coeff, sbias = (rng.standard_normal(c).astype(dtype) for _ in range(3))
    oh, ow = h // k, w // k
    grad_out = np.ascontiguousarray(grad_out_full[:, :oh, :ow])
    out, act_out, grad_y, grad_coeff, grad_sbias = _subsample_reference(
        y, bias, coeff, sbias, k, act, act2, grad_out
    )
    ints = tuple(map(i32, (n, c, h, w, k, oh, ow, ACTS[act][0], ACTS[act2][0])))
    got = {
        name: np.full(like.shape, np.nan, dtype)
        for name, like in (("out", out), ("act_out", act_out), ("mean", out), ("grad_y", y))
    }
    fn = kernel(modules, "subsample.cu", "bias_act_subsample_act", dtype)
    args = (y, bias, coeff, sbias, got["act_out"], got["mean"], got["out"], *ints)
    launch_1d(fn, out.size, args, "gridstride")
    assert_close(got["out"], out, dtype)
    inside = np.zeros(y.shape, bool)
    inside[:, : oh * k, : ow * k] = True
    assert_close(got["act_out"][inside], act_out[inside], dtype)
    fn = kernel(modules, "subsample.cu", "act_subsample_act_backward", dtype)
    launch_1d(fn, y.size, (grad_out, got["out"], got["act_out"], coeff, got["grad_y"], *ints))
    assert_close(got["grad_y"], grad_y, dtype)
    grads = np.full(c, np.nan, dtype), np.full(c, np.nan, dtype)
    fn = kernel(modules, "subsample.cu", "subsample_grads", dtype)
    ints = map(i32, (n, c, oh, ow, k, ACTS[act2][0]))
    blocks = max(1, c // 2)  # fewer blocks than channels: the grid-stride over channels
    fn((blocks,), (SUBSAMPLE_THREADS,), (grad_out, got["out"], got["mean"], *grads, *ints))
    assert_close(grads[0], grad_coeff, dtype)
    assert_close(grads[1], grad_sbias, dtype)


# -- norm.cu ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["none", *sorted(ACTS)])
@pytest.mark.parametrize("shape", [(16, 7), (3, 300), (1, 5)])
def test_batch_norm_act_and_backward(modules, dtype, act, shape):
    """Against BatchNorm1d in training (its running statistics included) and the
    activation after it, forward and backward."""
    n, f = shape
    rng = np.random.default_rng(11)
    x = (1.5 + 2 * rng.standard_normal(shape)).astype(dtype)
    layer = BatchNorm1d(f, dtype=np.dtype(dtype).name)
    layer.weight.data[...] = rng.standard_normal(f)
    layer.bias.data[...] = rng.standard_normal(f)
    layer.running_var[...] = 1 + rng.random(f)
    weight, bias = layer.weight.data.copy(), layer.bias.data.copy()
    running_mean, running_var = layer.running_mean.copy(), layer.running_var.copy()
    tracked = np.array(4, np.int64)
    code = -1 if act == "none" else ACTS[act][0]
    ref = layer.forward(x)
    ref_y = ref if act == "none" else ACTS[act][1](ref)
    y, x_hat = np.full(shape, np.nan, dtype), np.full(shape, np.nan, dtype)
    inv_std = np.full(f, np.nan, dtype)
    args = (x, weight, bias, running_mean, running_var, tracked, x_hat, inv_std, y)
    args += (i32(n), i32(f), np.float64(layer.eps), np.float64(layer.momentum), i32(code))
    launch_1d(kernel(modules, "norm.cu", "batch_norm_act", dtype), f, args, "gridstride")
    # a column of 3 close values is ill-conditioned: its statistics' rounding (row order
    # here, pairwise in NumPy) shows in float32 at 10x the elementwise tolerance
    tol = 10 * RTOL[np.dtype(dtype)]
    for got, want in ((y, ref_y), (running_mean, layer.running_mean),
                      (running_var, layer.running_var), (x_hat, layer._x_hat)):  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(np.abs(want).max()))
    assert tracked == 5
    grad_y = rng.standard_normal(shape).astype(dtype)
    grad = grad_y if act == "none" else ACTS[act][2](grad_y.copy(), ref_y)
    ref_grad_x = layer.backward(grad)
    grad_x = np.full(shape, np.nan, dtype)
    grad_w, grad_b = np.full(f, np.nan, dtype), np.full(f, np.nan, dtype)
    args = (grad_y, y, x_hat, inv_std, weight, grad_x, grad_w, grad_b, i32(n), i32(f), i32(code))
    launch_1d(kernel(modules, "norm.cu", "batch_norm_act_backward", dtype), f, args)
    scale = float(np.abs(ref_grad_x).max()) + 1.0  # n = 1: a gradient of rounding noise
    np.testing.assert_allclose(grad_x, ref_grad_x, rtol=RTOL[np.dtype(dtype)] * 10,
                               atol=RTOL[np.dtype(dtype)] * 10 * scale)  # fmt: skip
    assert_close(grad_w, layer.weight.grad, dtype)
    assert_close(grad_b, layer.bias.grad, dtype)


# -- loss.cu ------------------------------------------------------------------------------
def _logits(rng, n, k, dtype):
    logits = (3 * rng.standard_normal((n, k))).astype(dtype)
    labels = rng.integers(0, k, size=n).astype(np.int64)
    for i in range(min(n, 10)):  # tied maxima: the first one is the prediction
        top = int(np.argmax(logits[i]))
        later = (top + 1 + i % (k - 1)) % k
        logits[i, later] = logits[i, top]
        labels[i] = min(top, later) if i % 2 else max(top, later)
    return logits, labels


def _store(rows_by_class, layout):
    """``(N, K)`` values stored feature-major ``(K, N)`` or row-major; returns the stored
    array and the (row, class) element strides the kernel takes."""
    if layout == "feature_major":
        stored = np.ascontiguousarray(rows_by_class.T)
        s = elem_strides(stored)
        return stored, (s[1], s[0])
    stored = np.ascontiguousarray(rows_by_class)
    return stored, tuple(elem_strides(stored))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["feature_major", "row_major"])
@pytest.mark.parametrize("n", [37, 300])  # fewer and more rows than LOSS_THREADS
@pytest.mark.parametrize("j", [None, RBF_LOSS_J, -3.0])  # None: no rubbish logit
def test_softmax_cross_entropy(modules, dtype, layout, n, j):
    """The loss, its gradient and the running sums; with a rubbish logit ``-j``, LeCun's RBF
    loss (``j = -3``: a rubbish logit above most logits, the log-sum-exp's shift)."""
    k = 10
    rubbish = (i32(0), dtype(0)) if j is None else (i32(1), dtype(-j))
    reference = softmax_cross_entropy if j is None else lambda a, b: rbf_loss(a, b, j)
    rng = np.random.default_rng(5)
    fn = kernel(modules, "loss.cu", "softmax_cross_entropy", dtype)
    loss_sum = np.array([1.5])
    correct = np.array([3], np.int64)
    counters = np.array([10, 20, 30], np.int64) if layout == "feature_major" else None
    n_counters = 2 if counters is not None else 0
    expected_sum, expected_correct = 1.5, 3
    for _ in range(2):  # running sums accumulate across launches
        logits, labels = _logits(rng, n, k, dtype)
        stored, (sli, slk) = _store(logits, layout)
        grad_stored, (sgi, sgk) = _store(np.full((n, k), np.nan, dtype), layout)
        batch_loss = np.full(1, np.nan, dtype)
        args = (stored, sli, slk, labels, grad_stored, sgi, sgk, i32(n), i32(k), *rubbish)
        args += (batch_loss, loss_sum, correct, counters, i32(n_counters))
        fn((1,), (LOSS_THREADS,), args)

        ref_loss, ref_grad = reference(logits, labels)
        grad = grad_stored.T if layout == "feature_major" else grad_stored
        assert_close(grad, ref_grad, dtype)
        assert_close(batch_loss[0], ref_loss, dtype)
        expected_sum += float(ref_loss) * n
        expected_correct += int((np.argmax(logits, axis=1) == labels).sum())
        assert correct[0] == expected_correct
        assert_close(loss_sum[0], expected_sum, dtype)
    assert 0 < expected_correct - 3 < 2 * n
    if counters is not None:
        np.testing.assert_array_equal(counters, [12, 22, 30])


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_cross_entropy_bad_label_gives_nan(modules, dtype):
    n, k = 37, 10
    rng = np.random.default_rng(6)
    logits, labels = _logits(rng, n, k, dtype)
    labels[[3, 20]] = [k, -1]
    stored, (sli, slk) = _store(logits, "feature_major")
    grad_stored, (sgi, sgk) = _store(np.full((n, k), np.nan, dtype), "feature_major")
    batch_loss, loss_sum = np.zeros(1, dtype), np.zeros(1)
    correct, counters = np.zeros(1, np.int64), np.zeros(1, np.int64)
    args = (stored, sli, slk, labels, grad_stored, sgi, sgk, i32(n), i32(k), i32(0), dtype(0))
    args += (batch_loss,)
    fn = kernel(modules, "loss.cu", "softmax_cross_entropy", dtype)
    fn((1,), (LOSS_THREADS,), (*args, loss_sum, correct, counters, i32(1)))
    assert np.isnan(batch_loss[0]) and np.isnan(loss_sum[0])
    valid = (labels >= 0) & (labels < k)
    assert correct[0] == int(((np.argmax(logits, axis=1) == labels) & valid).sum())
    assert counters[0] == 1
    expected = np.exp(log_softmax(logits))
    expected[np.flatnonzero(valid), labels[valid]] -= 1
    assert_close(grad_stored.T, expected / n, dtype)  # a bad row: softmax / n, no one-hot


# -- rbf.cu -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 37, 300])
def test_rbf_kernels_against_the_layer(modules, dtype, n):
    """LeCun's RBF output, forward and the input's gradient, against ``RBFOutput``'s array
    code (its digit bitmaps as centres, F6-like inputs in (-1.7, 1.7))."""
    rng = np.random.default_rng(16)
    layer = RBFOutput(84, dtype=np.dtype(dtype).name)
    x = rng.uniform(-1.7, 1.7, (n, 84)).astype(dtype)
    centres = layer.centres.data
    k = centres.shape[0]
    expected = layer.forward(x)
    logits = np.full((n, k), np.nan, dtype)
    fn = kernel(modules, "rbf.cu", "rbf_logits", dtype)
    launch_1d(fn, logits.size, (x, centres, logits, i64(n), i32(k), i32(84)), "gridstride")
    assert_close(logits, expected, dtype)
    grad_logits = rng.standard_normal((n, k)).astype(dtype)
    grad_x = np.full((n, 84), np.nan, dtype)
    fn = kernel(modules, "rbf.cu", "rbf_backward", dtype)
    launch_1d(fn, grad_x.size, (grad_logits, x, centres, grad_x, i64(n), i32(k), i32(84)))
    assert_close(grad_x, layer.backward(grad_logits), dtype)


# -- data.cu ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_shifts", [True, False])
def test_gather_shift(modules, dtype, with_shifts):
    m, h, w, batch, max_shift = 50, 9, 8, 16, 2
    rng = np.random.default_rng(7)
    images = rng.standard_normal((m, 1, h, w)).astype(dtype)
    labels = rng.integers(0, 10, size=m).astype(np.int64)
    order = rng.permutation(m).astype(np.int64)
    shifts = rng.integers(-max_shift, max_shift + 1, size=(2, m)) if with_shifts else None
    fill = np.dtype(dtype).type(-0.4242)
    fn = kernel(modules, "data.cu", "gather_shift", dtype)
    for index in range(-(-m // batch)):  # the last batch is short (2 of 16 rows)
        x = np.full((batch, 1, h, w), 777, dtype)
        y = np.full(batch, -5, np.int64)
        batch_index = np.array([index], np.int64)
        ints = map(i32, (batch, batch, m, m, h, w))  # batch, rows, order's count, M, H, W
        launch_1d(fn, x.size, (images, labels, order, shifts, batch_index, *ints, fill, x, y))
        idx = order[index * batch : (index + 1) * batch]
        expected = images[idx]
        if with_shifts:
            expected = shift_images(expected, shifts[0, idx], shifts[1, idx], max_shift, fill)
        np.testing.assert_array_equal(x[: len(idx)], expected)
        np.testing.assert_array_equal(y[: len(idx)], labels[idx])
        assert (x[len(idx) :] == 777).all() and (y[len(idx) :] == -5).all()  # untouched
    # a rank's slice: rows 5..11 of batch 1, from order's tail at the slice's start (a view)
    start, rows, index = 5, 7, 1
    x, y = np.zeros((rows, 1, h, w), dtype), np.zeros(rows, np.int64)
    ints = map(i32, (batch, rows, m - start, m, h, w))
    tail = order[start:]
    launch_1d(fn, x.size, (images, labels, tail, shifts, np.array([index]), *ints, fill, x, y))
    idx = order[index * batch + start : index * batch + start + rows]
    expected = images[idx]
    if with_shifts:
        expected = shift_images(expected, shifts[0, idx], shifts[1, idx], max_shift, fill)
    np.testing.assert_array_equal(x, expected)
    np.testing.assert_array_equal(y, labels[idx])


# -- optim.cu -----------------------------------------------------------------------------
SHAPES = [(7, 5), (13,), (3, 2, 4)]
OPTIMIZERS = {  # name: (make_optimizer name, weight decay)
    "sgd": ("sgd", 0.0), "sgd_l2": ("sgd", 0.1), "nesterov": ("nesterov", 0.05),
    "adam": ("adam", 0.0), "adam_l2": ("adam", 0.1), "adamw": ("adamw", 0.05),
}  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", sorted(OPTIMIZERS))
def test_flat_optimizers_and_average(modules, dtype, variant):
    """``sgd_flat``/``adam_flat`` and ``ema_flat`` over one flat buffer against the
    optimizers (per parameter) and ``ParameterEMA``, five steps whose learning rates come
    from a device table indexed by the clock (and a sixth past its end: the last rate)."""
    sizes = [int(np.prod(s)) for s in SHAPES]
    size = sum(sizes)
    rng = np.random.default_rng(8)
    flat = rng.standard_normal(size).astype(dtype)
    name, weight_decay = OPTIMIZERS[variant]
    params = [
        Parameter(v.reshape(s).copy())
        for v, s in zip(np.split(flat, np.cumsum(sizes)[:-1]), SHAPES, strict=True)
    ]  # noqa: E501
    optimizer = make_optimizer(name, params, 1.0, weight_decay=weight_decay, ema=0.9)
    lr_of_step = np.array([1e-2, 3e-2, 5e-3, 2e-2, 1e-2])
    param, average = flat.copy(), flat.copy()
    state = [np.zeros(size, dtype), np.zeros(size, dtype)]
    clock = np.array([0, 7, 0, 0], np.int64)  # step, batch, updates, averaged
    adam = name.startswith("adam")
    fn = kernel(modules, "optim.cu", "adam_flat" if adam else "sgd_flat", dtype)
    ema = kernel(modules, "optim.cu", "ema_flat", dtype)
    for t in range(len(lr_of_step) + 1):
        grad = rng.standard_normal(size).astype(dtype)
        for p, g in zip(params, np.split(grad, np.cumsum(sizes)[:-1]), strict=True):
            p.grad = g.reshape(p.shape)
        optimizer.lr = lr_of_step[min(t, len(lr_of_step) - 1)]
        optimizer.step()
        table = (lr_of_step, i64(lr_of_step.size), clock)
        if adam:
            hyper = (*map(np.float64, (*optimizer.betas, optimizer.eps, weight_decay)),)
            args = (param, grad, *state, *table, *hyper, i32(name == "adamw"), i64(size))
        else:
            hyper = (*map(np.float64, (optimizer.momentum, 0.0, weight_decay)),)
            args = (param, grad, state[0], *table, *hyper, i32(optimizer.nesterov), i64(0))
            args += (i64(size),)
        launch_1d(fn, size, args, "gridstride" if t % 2 else "cover")
        launch_1d(ema, size, (average, param, clock, np.float64(0.9), i64(size)))
        clock += 1
        assert_close(param, np.concatenate([p.data.ravel() for p in params]), dtype)
        ref_average = np.concatenate([a.ravel() for a in optimizer.average.averages])
        assert_close(average, ref_average, dtype)
        keys = ("exp_avg", "exp_avg_sq") if adam else ("momentum_buffer",)
        for flat_state, key in zip(state, keys, strict=False):
            ref = np.concatenate([s[key].ravel() for s in optimizer.state])
            if key == "exp_avg_sq":  # a sum of positive terms: compared per element (1 -
                # beta2 rounded from double, as the reference; T(1) - T(beta2) is 1.3e-5 off)
                np.testing.assert_allclose(flat_state, ref, rtol=RTOL[np.dtype(dtype)], atol=0)
            else:
                assert_close(flat_state, ref, dtype)
    assert clock[1] == 13


# -- dense.cu -----------------------------------------------------------------------------
def _activated(values: np.ndarray, act: str) -> tuple[np.ndarray, int]:
    """``values`` through activation ``act`` (``"none"``: as they are), and its kernel code."""
    if act == "none":
        return values, -1
    return ACTS[act][1](values), ACTS[act][0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 13), (120, 33), (1, 1)])
@pytest.mark.parametrize("act", ["none", *sorted(ACTS)])
def test_bias_act(modules, dtype, shape, act):
    """A convolution's feature-major GEMM output ``(C, H*W*N)`` plus its bias, then the
    activation (``--engine kernels``' ``conv -> act`` block, LeCun's C5)."""
    rng = np.random.default_rng(9)
    y = rng.standard_normal(shape).astype(dtype)
    bias = rng.standard_normal(shape[0]).astype(dtype)
    expected, code = _activated(y + bias[:, None], act)
    fn = kernel(modules, "dense.cu", "bias_act", dtype)
    launch_1d(fn, y.size, (y, bias, i32(shape[0]), i64(shape[1]), i32(code)), "gridstride")
    _same(y, expected, dtype, "relu" if act == "none" else act)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(13, 7), (33, 120), (1, 1)])
@pytest.mark.parametrize("act", ["none", *sorted(ACTS)])
def test_bias_act_cols_and_act_backward(modules, dtype, shape, act):
    """A Linear's output ``(N, out)`` plus its bias, then the activation (the layers'
    ``y += bias`` and their forward), and the activation's backward in place."""
    rng = np.random.default_rng(9)
    y = rng.standard_normal(shape).astype(dtype)
    bias = rng.standard_normal(shape[1]).astype(dtype)
    expected, code = _activated(y + bias, act)
    fn = kernel(modules, "dense.cu", "bias_act_cols", dtype)
    launch_1d(fn, y.size, (y, bias, i64(shape[0]), i32(shape[1]), i32(code)), "gridstride")
    _same(y, expected, dtype, "relu" if act == "none" else act)
    if act == "none":
        return
    grad = rng.standard_normal(shape).astype(dtype)
    expected_grad = ACTS[act][2](grad.copy(), y)
    fn = kernel(modules, "dense.cu", "act_backward", dtype)
    launch_1d(fn, grad.size, (grad, y, i64(grad.size), i32(code)))
    _same(grad, expected_grad, dtype, act)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(84, 17), (3,)])
def test_relu_mask(modules, dtype, shape):
    rng = np.random.default_rng(10)
    grad = rng.standard_normal(shape).astype(dtype)
    out = np.maximum(rng.standard_normal(shape), 0).astype(dtype)  # many exact zeros
    out.ravel()[::5] = -1
    expected = np.where(out > 0, grad, 0)
    fn = kernel(modules, "dense.cu", "relu_mask", dtype)
    launch_1d(fn, grad.size, (grad, out, i64(grad.size)))
    np.testing.assert_array_equal(grad, expected)


GEMM_CASES = [  # m, n, k, a transposed, b transposed, c transposed, kchunk (None: no split)
    (20, 19, 40, False, False, False, None, ""),
    (5, 33, 17, True, False, False, None, "bias"),
    (17, 6, 45, False, True, True, None, "mask"),
    (16, 16, 16, True, True, False, None, "relu"),
    (23, 9, 70, False, False, True, 32, "bias,mask,relu"),  # 3 chunks
    (6, 25, 100, False, True, False, 16, ""),  # 7 chunks (a weight gradient)
    (10, 1, 64, True, False, True, 48, "bias,relu"),  # 2 chunks
]


def _operand(rng, shape, transposed, dtype, fill=None):
    """A ``shape`` array; when ``transposed`` it is the transposed view of a contiguous one."""
    rows, cols = shape
    store_shape = (cols, rows) if transposed else (rows, cols)
    if fill is None:
        store = rng.standard_normal(store_shape).astype(dtype)
    else:
        store = np.full(store_shape, fill, dtype)
    return store.T if transposed else store


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GEMM_CASES)
def test_gemm(modules, dtype, case):
    m, n, k, ta, tb, tc, kchunk, epilogue = case
    rng = np.random.default_rng(11)
    a = _operand(rng, (m, k), ta, dtype)
    b = _operand(rng, (k, n), tb, dtype)
    c = _operand(rng, (m, n), tc, dtype, fill=np.nan)
    bias = rng.standard_normal(m).astype(dtype) if "bias" in epilogue else None
    mask = None
    if "mask" in epilogue:  # laid out like C; zeros and negatives mask
        mask = _operand(rng, (m, n), tc, dtype)
        mask[::3, ::2] = 0

    expected = a.astype(np.float64) @ b.astype(np.float64)
    if bias is not None:
        expected += bias[:, None]
    if mask is not None:
        expected[~(mask > 0)] = 0
    if "relu" in epilogue:
        expected = np.maximum(expected, 0)

    splits = 1 if kchunk is None else -(-k // kchunk)
    chunk = -(-k // GEMM_TILE) * GEMM_TILE if kchunk is None else kchunk
    partial = None if splits == 1 else np.full((splits, m, n), np.nan, dtype)
    sa, sb, sc = elem_strides(a), elem_strides(b), elem_strides(c)
    grid = (-(-n // GEMM_TILE), -(-m // GEMM_TILE), splits)
    args = (a, *sa, b, *sb, c, *sc, partial, bias, mask, *map(i32, (m, n, k, chunk)))
    gemm = kernel(modules, "dense.cu", "gemm", dtype)
    gemm(grid, (GEMM_TILE, GEMM_TILE), (*args, i32("relu" in epilogue)))
    if splits > 1:
        assert np.isnan(c).all()  # partial sums only; gemm_reduce writes C
        for s in range(splits):
            lo, hi = s * chunk, min(k, (s + 1) * chunk)
            assert_close(partial[s], a[:, lo:hi].astype(np.float64) @ b[lo:hi], dtype)
        reduce_args = (partial, i32(splits), c, *sc, bias, mask, i32(m), i32(n))
        reduce = kernel(modules, "dense.cu", "gemm_reduce", dtype)
        launch_1d(reduce, m * n, (*reduce_args, i32("relu" in epilogue)), "gridstride")
    assert_close(c, expected, dtype)


# -- the emulator itself -----------------------------------------------------------------
def test_rejects_mistyped_arguments(modules):
    fn = kernel(modules, "dense.cu", "bias_act", np.float32)
    y, bias = np.ones((3, 4), np.float32), np.ones(3, np.float32)
    ok = (i32(3), i64(4), i32(0))  # m, n, act
    bad_calls = {
        r"argument 2 \(int m\): .*Python int": (y, bias, 3, i64(4), i32(0)),
        r"argument 3 \(long long n\): .*numpy.int32": (y, bias, i32(3), i32(4), i32(0)),
        r"argument 0 \(float\* y\): .*float64": (y.astype(np.float64), bias, *ok),
        r"argument 0 \(float\* y\): .*C-contiguous": (np.ones((4, 3), np.float32).T, bias, *ok),
        r"argument 1 \(const float\* bias\): .*list": (y, [1.0, 1.0, 1.0], *ok),
        r"argument 4 \(int act\): .*0-d array": (y, bias, i32(3), i64(4), np.array(0, np.int32)),
        r"takes 5 arguments": (y, bias, i32(3), i64(4)),
    }
    readonly = y.copy()
    readonly.flags.writeable = False
    bad_calls[r"argument 0 \(float\* y\): .*read-only"] = (readonly, bias, *ok)
    for pattern, args in bad_calls.items():
        with pytest.raises(TypeError, match=r"bias_act<float>: " + pattern):
            fn((1,), (32,), args)
    assert (y == 1).all()  # nothing ran

    relu_mask = kernel(modules, "dense.cu", "relu_mask", np.float64)
    g = np.ones(4)
    with pytest.raises(TypeError, match=r"argument 2 \(long long size\).*numpy.int32"):
        relu_mask((1,), (32,), (g, g, i32(4)))
    gather = kernel(modules, "data.cu", "gather_shift", np.float32)
    head = (np.ones((2, 1, 3, 3), np.float32), *[np.zeros(2, np.int64)] * 2, None)
    head += (np.zeros(1, np.int64), *map(i32, (2, 2, 2, 2, 3, 3)))
    tail = (np.ones((2, 1, 3, 3), np.float32), np.ones(2, np.int64))
    for fill in (0.5, np.float64(0.5)):
        with pytest.raises(TypeError, match=r"argument 11 \(float fill\)"):
            gather((1,), (32,), (*head, fill, *tail))
    gather((1,), (32,), (*head, np.float32(0.5), *tail))  # the right types run
    with pytest.raises(ValueError, match="1024"):
        fn((1,), (64, 32), (y, bias, *ok))
    with pytest.raises(ValueError, match="grid"):
        fn((0,), (32,), (y, bias, *ok))


def test_syncthreads_kernels_run_on_threads(modules):
    assert kernel(modules, "dense.cu", "gemm", np.float32).threaded
    assert kernel(modules, "loss.cu", "softmax_cross_entropy", np.float64).threaded
    assert kernel(modules, "subsample.cu", "subsample_grads", np.float32).threaded
    assert not kernel(modules, "conv.cu", "im2col", np.float32).threaded


def test_sequential_launches_are_fast():
    """A few million elements over thousands of blocks in well under a second."""
    module = EmulatedModule("conv.cu", check_bounds=False)
    n, c, h, w, k = 128, 6, 14, 14, 5
    x = np.random.default_rng(12).standard_normal((c, h, w, n)).astype(np.float32)
    x = x.transpose(3, 0, 1, 2)
    cols = np.empty((c * k * k, 10 * 10 * n), np.float32)  # 1.92 M elements
    args = (x, cols, *map(i32, (n, c, h, w)), *elem_strides(x), *map(i32, (k, k, 1, 0, 10, 10)))
    fn = module.get_function("im2col<float>")
    for blocks in (4096, -(-cols.size // THREADS)):
        start = time.perf_counter()
        fn((blocks,), (THREADS,), args)
        assert time.perf_counter() - start < 1.0
    np.testing.assert_array_equal(cols, im2col(x, k, k))


def test_threaded_launches_are_fast():
    """A 16 x 150 @ 150 x 800 GEMM (50 blocks of 16 x 16 threads, 21 barriers each: 270 k
    thread switches) in well under a second (on OS threads with a std::barrier: 1.5 s)."""
    module = EmulatedModule("dense.cu", check_bounds=False)
    m, k, n = 16, 150, 800
    rng = np.random.default_rng(13)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    c = np.full((m, n), np.nan, np.float32)
    args = (a, *elem_strides(a), b, *elem_strides(b), c, *elem_strides(c), None, None, None)
    args += (*map(i32, (m, n, k, -(-k // GEMM_TILE) * GEMM_TILE, 0)),)
    fn = module.get_function("gemm<float>")
    assert fn.threaded
    for _ in range(2):  # the first launch maps the threads' stacks
        start = time.perf_counter()
        fn((-(-n // GEMM_TILE), -(-m // GEMM_TILE), 1), (GEMM_TILE, GEMM_TILE), args)
        assert time.perf_counter() - start < 0.5
    assert_close(c, a.astype(np.float64) @ b, np.float32)


def test_out_of_bounds_access_is_caught(modules):
    relu_mask = kernel(modules, "dense.cu", "relu_mask", np.float32)
    grad, out = np.ones(100, np.float32), np.ones(99, np.float32)
    with pytest.raises(KernelFaultError, match=r"past the end of argument 1 \(const float\* out"):
        launch_1d(relu_mask, 100, (grad, out, i64(100)))
    gather = kernel(modules, "data.cu", "gather_shift", np.float64)
    order = np.array([-1, 0], np.int64)
    images, x = np.ones((2, 1, 9, 9)), np.zeros((2, 1, 9, 9))
    args = (images, np.zeros(2, np.int64), order, None, np.zeros(1, np.int64))
    args += (*map(i32, (2, 2, 2, 2, 9, 9)), np.float64(0), x, np.zeros(2, np.int64))
    with pytest.raises(KernelFaultError, match=r"before the start of argument 0 \(const double\*"):
        launch_1d(gather, x.size, args)
    # a fault on one of the block's threads (gemm, run as coroutines): A has 10 rows, m says 20
    gemm = kernel(modules, "dense.cu", "gemm", np.float32)
    a, b, c = np.ones((10, 16), np.float32), np.ones((16, 16), np.float32), np.zeros((20, 16))
    c = c.astype(np.float32)
    args = (a, i64(16), i64(1), b, i64(16), i64(1), c, i64(16), i64(1), None, None, None)
    with pytest.raises(KernelFaultError, match=r"past the end of argument 0 \(const float\* a"):
        gemm((1, 2, 1), (16, 16), (*args, *map(i32, (20, 16, 16, 16, 0))))
    gemm((1, 1, 1), (16, 16), (*args, *map(i32, (10, 16, 16, 16, 0))))  # still works after
    np.testing.assert_array_equal(c[:10], 16)


def test_null_pointer_is_caught_without_bounds_checking():
    fn = EmulatedModule("dense.cu", check_bounds=False).get_function("bias_act<double>")
    y = np.zeros((2, 3))
    with pytest.raises(KernelFaultError, match="null pointer"):
        fn((1,), (32,), (y, None, i32(2), i64(3), i32(0)))
    fn((1,), (32,), (y, np.ones(2), i32(2), i64(3), i32(0)))
    assert (y == 1).all()


SELFTEST = r"""
// Reverses each block's slice of `in` through shared memory: wrong without the barrier.
template <typename T>
__global__ void block_reverse(const T* in, T* out, int n) {
  __shared__ T tile[256];
  const int base = blockIdx.x * blockDim.x, t = threadIdx.x;
  tile[t] = base + t < n ? in[base + t] : T(-1);
  __syncthreads();
  if (base + t < n) out[base + t] = tile[blockDim.x - 1 - t];
}

// Each thread writes its own linear index: the launch geometry, in 3-d.
__global__ void geometry(long long* out) {
  const long long block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const long long thread = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  const long long id = block * blockDim.x * blockDim.y * blockDim.z + thread;
  out[id] = id;
}

// Thread 0 leaves while the others wait at the barrier: a deadlock on a GPU.
__global__ void early_return(int* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// Recursion n deep on every thread of the block: overflows a thread's stack for large n.
__device__ __noinline__ int depth(int n) {
  volatile char pad[512];
  pad[0] = (char)n;
  const int below = n > 0 ? depth(n - 1) : 0;
  pad[1] = (char)below;
  return below + pad[0] + pad[1];
}
__global__ void deep(int* out, int n) {
  __syncthreads();
  out[threadIdx.x] = depth(n);
}

__device__ void hidden_barrier() { __syncthreads(); }
__global__ void sync_in_helper(int* out) { hidden_barrier(); out[threadIdx.x] = 1; }
__global__ void divide(int* out, int d) { out[threadIdx.x] = 100 / d; }
"""


@pytest.fixture(scope="module")
def selftest() -> EmulatedModule:
    names = ["block_reverse<float>", "geometry", "sync_in_helper", "divide", "early_return"]
    names.append("deep")
    return EmulatedModule("emulator_selftest.cu", text=SELFTEST, names=names, check_bounds=True)


def test_syncthreads_orders_shared_memory(selftest):
    fn = selftest.get_function("block_reverse<float>")
    assert fn.threaded
    n, threads = 300, 64
    data = np.arange(n, dtype=np.float32)
    out = np.full(n, np.nan, np.float32)
    fn((-(-n // threads),), (threads,), (data, out, i32(n)))
    padded = np.concatenate([data, np.full(-n % threads, -1, np.float32)])
    np.testing.assert_array_equal(out, padded.reshape(-1, threads)[:, ::-1].ravel()[:n])


def test_launch_geometry(selftest):
    fn = selftest.get_function("geometry")
    grid, block = (3, 2, 2), (4, 3, 2)
    out = np.full(12 * 24, -1, np.int64)
    fn(grid, block, (out,))
    np.testing.assert_array_equal(out, np.arange(out.size))


def test_kernel_errors_are_reported(selftest):
    out = np.zeros(32, np.int32)
    with pytest.raises(KernelFaultError, match=r"__syncthreads\(\) called in a kernel run sequent"):
        selftest.get_function("sync_in_helper")((1,), (32,), (out,))
    with pytest.raises(KernelFaultError, match="(?i)floating point"):
        selftest.get_function("divide")((1,), (32,), (out, i32(0)))
    selftest.get_function("divide")((1,), (32,), (out, i32(4)))
    assert (out == 25).all()


def test_barrier_errors_are_reported(selftest):
    out = np.zeros(32, np.int32)
    fn = selftest.get_function("early_return")
    assert fn.threaded
    with pytest.raises(
        KernelFaultError,
        match=r"returned from the kernel while 31 of the block's 32 threads wait at "
        r"__syncthreads\(\).* in block \(0, 0, 0\) thread \(0, 0, 0\)",
    ):
        fn((2,), (32,), (out,))
    deep = selftest.get_function("deep")
    with pytest.raises(KernelFaultError, match=r"stack overflow.* thread \(0, 0, 0\)"):
        deep((2,), (32,), (out, i32(1_000_000)))
    deep((2,), (32,), (out, i32(10)))  # a fault or error leaves later launches working
    assert (out == out[0]).all() and out[0] != 0
