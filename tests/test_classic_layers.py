"""LeCun et al. 1998's layers (trainable subsampling, the partially connected C3, RBF output
units and their loss) and LeakyReLU: backward against central finite differences in float64
(relative error <= 1e-6) on every device, the paper's formulas, tables and parameter counts."""

import itertools
import math

import numpy as np
import pytest
from conftest import DEVICES
from gradcheck import numerical_grad, rel_error

from lenet_xp.backend import asnumpy, device_of, get_device, host_rng, to_device
from lenet_xp.functional.loss import RBF_LOSS_J, rbf_loss, softmax_cross_entropy
from lenet_xp.layers import (
    DIGIT_BITMAPS,
    LENET5_C3_TABLE,
    Conv2d,
    Flatten,
    LeakyReLU,
    LeCunTanh,
    Linear,
    PartialConv2d,
    RBFOutput,
    Sequential,
    TrainableSubsampling,
)
from lenet_xp.layers.rbf import DIGIT_PICTURES
from lenet_xp.optim.optimizers import Adam

TOL = 1e-6


def rand(*shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape)


def grad_numeric(f, array):
    """``gradcheck.numerical_grad`` on the CPU; on a GPU the same central differences,
    perturbing the device array element by element."""
    if isinstance(array, np.ndarray):
        return numerical_grad(f, array)
    host, eps = asnumpy(array), 1e-6
    grad = np.zeros_like(host)
    for idx in np.ndindex(host.shape):
        array[idx] = host[idx] + eps
        f_plus = f()
        array[idx] = host[idx] - eps
        f_minus = f()
        array[idx] = host[idx]
        grad[idx] = (f_plus - f_minus) / (2 * eps)
    return grad


def check_on(device, layer, x_host, seed=0):
    """``gradcheck.check_layer`` on ``device``: input and every parameter that gets a
    gradient; returns the names of parameters whose ``grad`` stayed ``None``."""
    layer.to(device)
    x = to_device(np.ascontiguousarray(x_host), device)
    g = to_device(rand(*layer.forward(x).shape, seed=seed + 100), device)

    def f() -> float:
        return float((layer.forward(x) * g).sum())

    layer.forward(x)
    grad_x = asnumpy(layer.backward(g))
    analytic = {n: asnumpy(p.grad) for n, p in layer.named_parameters() if p.grad is not None}
    err = rel_error(grad_x, grad_numeric(f, x))
    assert err <= TOL, f"input gradient rel error {err:.2e}"
    for name, param in layer.named_parameters():
        if name in analytic:
            err = rel_error(analytic[name], grad_numeric(f, param.data))
            assert err <= TOL, f"{name} gradient rel error {err:.2e}"
    return [n for n, _ in layer.named_parameters() if n not in analytic]


def batch_innermost(x):
    """``x (N, C, H, W)`` as a view of ``(C, H, W, N)`` memory, as convolutions hand it on."""
    return np.ascontiguousarray(x.transpose(1, 2, 3, 0)).transpose(3, 0, 1, 2)


# -- LeakyReLU --------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("slope", [0.01, 0.3, -0.5])
def test_leaky_relu_gradient(device, slope):
    x = rand(3, 2, 4, 5)
    x[np.abs(x) < 1e-3] = 0.5  # keep the kink away from the finite-difference step
    assert check_on(device, LeakyReLU(slope), x) == []


def test_leaky_relu_matches_pytorch():
    torch = pytest.importorskip("torch")
    x = np.array([[-2.0, -0.0, 0.0, 1e-300, 3.0, -1e-8]])
    g = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    for slope in (0.01, 0.2, 1.5):
        layer = LeakyReLU(slope)
        x_t = torch.from_numpy(x.copy()).requires_grad_()
        y_t = torch.nn.functional.leaky_relu(x_t, slope)
        y_t.backward(torch.from_numpy(g))
        np.testing.assert_array_equal(layer.forward(x.copy()), y_t.detach().numpy())
        np.testing.assert_array_equal(layer.backward(g.copy()), x_t.grad.numpy())


@pytest.mark.parametrize("device", DEVICES)
def test_leaky_relu_inplace_and_layout(device):
    x_host = batch_innermost(rand(4, 3, 2, 5))
    expected_y = np.where(x_host > 0, x_host, 0.1 * x_host)
    expected_g = np.where(x_host > 0, 1.0, 0.1) * 2.0
    plain, inplace = LeakyReLU(0.1), LeakyReLU(negative_slope=0.1, inplace=True)
    x = to_device(x_host, device)
    y = plain.forward(x)
    np.testing.assert_allclose(asnumpy(y), expected_y, rtol=0, atol=0)
    grad = to_device(np.full(x_host.shape, 2.0), device)
    np.testing.assert_allclose(asnumpy(plain.backward(grad)), expected_g, rtol=0, atol=0)
    assert float(grad.min()) == 2.0  # not overwritten
    y_in = inplace.forward(x)
    assert y_in is x  # overwrote its input
    np.testing.assert_allclose(asnumpy(x), expected_y, rtol=0, atol=0)
    assert inplace.backward(grad) is grad
    np.testing.assert_allclose(asnumpy(grad), expected_g, rtol=0, atol=0)
    if device == "cpu":  # the batch stays the innermost axis
        assert y.strides == x_host.strides


# -- TrainableSubsampling ---------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,shape", [(2, (2, 3, 6, 8)), (2, (2, 2, 7, 5)), (3, (2, 2, 7, 9))])
def test_subsampling_gradient(device, k, shape):
    layer = TrainableSubsampling(shape[1], k, rng=host_rng(0), dtype="float64")
    assert check_on(device, layer, rand(*shape)) == []


@pytest.mark.parametrize("device", DEVICES)
def test_subsampling_is_coefficient_times_window_sum_plus_bias(device):
    x_host = rand(3, 4, 9, 8)  # row 8 fills no window: dropped
    layer = TrainableSubsampling(4, 2, rng=host_rng(1), dtype="float64")
    w, b = layer.weight.data.copy(), layer.bias.data.copy()
    sums = x_host[:, :, :8, :8].reshape(3, 4, 4, 2, 4, 2).sum(axis=(3, 5))
    expected = w[:, None, None] * sums + b[:, None, None]
    y = layer.to(device).forward(to_device(batch_innermost(x_host), device))
    np.testing.assert_allclose(asnumpy(y), expected, rtol=1e-13, atol=1e-13)
    g = rand(3, 4, 4, 4, seed=2)
    grad_x = layer.backward(to_device(batch_innermost(g), device))
    np.testing.assert_allclose(asnumpy(layer.weight.grad), (g * sums).sum(axis=(0, 2, 3)))
    np.testing.assert_allclose(asnumpy(layer.bias.grad), g.sum(axis=(0, 2, 3)))
    expected_grad_x = np.zeros_like(x_host)
    expected_grad_x[:, :, :8, :8] = np.repeat(np.repeat(g * w[:, None, None], 2, 2), 2, 3)
    np.testing.assert_allclose(asnumpy(grad_x), expected_grad_x, rtol=1e-13, atol=1e-13)
    if device == "cpu":  # batch-innermost in, batch-innermost out
        assert np.argmin(y.strides) == 0 and np.argmin(grad_x.strides) == 0


def test_subsampling_parameters_and_lecun_init():
    s2, s4 = TrainableSubsampling(6, rng=host_rng(0)), TrainableSubsampling(16, rng=host_rng(0))
    assert s2.num_parameters() == 12 and s4.num_parameters() == 32
    assert [n for n, _ in s2.named_parameters()] == ["weight", "bias"]
    assert s2.weight.data.dtype == np.float32
    big = TrainableSubsampling(4000, 2, rng=host_rng(0), dtype="float64")
    for array in (big.weight.data, big.bias.data):  # U(-2.4/F, 2.4/F), F = 4
        assert np.abs(array).max() <= 0.6 and np.abs(array).max() > 0.59
        assert abs(array.mean()) < 0.03
    pt = TrainableSubsampling(4000, 3, init="pytorch", rng=host_rng(0), dtype="float64")
    assert 0.33 < np.abs(pt.weight.data).max() <= 1 / 3  # U(-1/sqrt(9), +)
    assert np.all(TrainableSubsampling(5, init="he", rng=host_rng(0)).bias.data == 0)
    with pytest.raises(ValueError, match="unknown init"):
        TrainableSubsampling(6, init="orthogonal")
    with pytest.raises(ValueError, match=r"\(N, 6, H, W\)"):
        s2.forward(np.zeros((2, 5, 8, 8), np.float32))


# -- PartialConv2d ----------------------------------------------------------------------------
def random_table(rng, c_in, c_out):
    return [tuple(rng.choice(c_in, size=rng.integers(1, c_in + 1), replace=False)) for _ in
            range(c_out)]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_partial_conv_gradient_c3_table(device):
    layer = PartialConv2d(6, 16, 5, LENET5_C3_TABLE, rng=host_rng(0), dtype="float64")
    assert check_on(device, layer, rand(2, 6, 7, 8)) == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stride,padding", [(2, 1), (1, 2)])
def test_partial_conv_gradient_random_table(device, stride, padding):
    table = random_table(np.random.default_rng(3), 4, 5)
    layer = PartialConv2d(
        4, 5, 3, table, stride=stride, padding=padding, rng=host_rng(0), dtype="float64"
    )
    assert check_on(device, layer, rand(2, 4, 7, 6)) == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "c_in,c_out,k,stride,padding,table",
    [
        (6, 16, 5, 1, 0, LENET5_C3_TABLE),
        (4, 5, 3, 2, 1, None),  # a random table
        (3, 2, 3, 1, 1, [(0, 1, 2), (0, 1, 2)]),  # every connection: a plain convolution
    ],
)
def test_partial_conv_equals_dense_conv_with_zeros(device, c_in, c_out, k, stride, padding, table):
    table = table or random_table(np.random.default_rng(5), c_in, c_out)
    partial = PartialConv2d(
        c_in, c_out, k, table, stride=stride, padding=padding, rng=host_rng(0), dtype="float64"
    )
    dense = Conv2d(c_in, c_out, k, stride, padding, rng=host_rng(9), dtype="float64")
    dense.weight.data[...] = partial.dense_weight()
    dense.bias.data[...] = partial.bias.data
    for o in range(c_out):  # the missing connections are zero, the present ones are not
        assert all((np.abs(dense.weight.data[o, i]).sum() > 0) == (i in table[o]) for i in
                   range(c_in))  # fmt: skip
    partial.to(device)
    dense.to(device)
    x = to_device(batch_innermost(rand(3, c_in, 9, 8)), device)
    y_p, y_d = partial.forward(x), dense.forward(x)
    np.testing.assert_allclose(asnumpy(y_p), asnumpy(y_d), rtol=1e-12, atol=1e-12)
    g = to_device(rand(*y_d.shape, seed=4), device)
    gx_p, gx_d = partial.backward(g), dense.backward(g)
    np.testing.assert_allclose(asnumpy(gx_p), asnumpy(gx_d), rtol=1e-12, atol=1e-12)
    dense_grad = asnumpy(dense.weight.grad)
    expected = np.stack([dense_grad[o, i] for o, row in enumerate(table) for i in row])
    np.testing.assert_allclose(asnumpy(partial.weight.grad), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(asnumpy(partial.bias.grad), asnumpy(dense.bias.grad), rtol=1e-12)
    assert partial.weight.grad.shape == partial.weight.shape


def test_c3_table_is_lecun_table_one():
    table = LENET5_C3_TABLE
    assert len(table) == 16 and sum(map(len, table)) == 60
    for o in range(6):  # three contiguous maps, cyclically
        assert set(table[o]) == {o % 6, (o + 1) % 6, (o + 2) % 6}
    for o in range(6, 12):  # four contiguous
        assert set(table[o]) == {(o - 6 + d) % 6 for d in range(4)}
    assert [set(table[o]) for o in (12, 13, 14)] == [{0, 1, 3, 4}, {1, 2, 4, 5}, {0, 2, 3, 5}]
    for o in (12, 13, 14):  # non-contiguous: no cyclic run of four
        assert all(set(table[o]) != {(s + d) % 6 for d in range(4)} for s in range(6))
    assert table[15] == (0, 1, 2, 3, 4, 5)
    assert len(set(map(frozenset, table))) == 16  # every C3 map sees a different set
    assert [sum(i in row for row in table) for i in range(6)] == [10] * 6  # each S2 map: 10


def test_partial_conv_parameters_and_init():
    c3 = PartialConv2d(6, 16, 5, LENET5_C3_TABLE, rng=host_rng(0))
    assert c3.weight.shape == (60, 5, 5) and c3.bias.shape == (16,)
    assert c3.num_parameters() == 1516 and c3.connections == 60
    assert c3.dense_weight().shape == (16, 6, 5, 5) and c3.weight.data.dtype == np.float32
    big = [(0,), (0, 1, 2, 3)] * 200  # many kernels per fan-in to see each bound
    for init, bound in (("pytorch", lambda f: 1 / math.sqrt(f)), ("lecun", lambda f: 2.4 / f)):
        layer = PartialConv2d(4, 400, 3, big, init=init, rng=host_rng(1), dtype="float64")
        w = np.abs(layer.weight.data)
        one, four = w[0::5].max(), w[np.arange(w.shape[0]) % 5 != 0].max()  # fan-in 9 and 36
        assert 0.97 * bound(9) < one <= bound(9) and 0.97 * bound(36) < four <= bound(36)
        b = np.abs(layer.bias.data)
        assert b[0::2].max() <= bound(9) and b[1::2].max() <= bound(36)
    he = PartialConv2d(4, 400, 3, big, init="he", rng=host_rng(1), dtype="float64")
    assert np.all(he.bias.data == 0) and 0.2 < he.weight.data[1::5].std() < 0.27  # sqrt(2/36)
    same_a = PartialConv2d(6, 16, 5, LENET5_C3_TABLE, rng=host_rng(7)).weight.data
    same_b = PartialConv2d(6, 16, 5, LENET5_C3_TABLE, rng=host_rng(7)).weight.data
    np.testing.assert_array_equal(same_a, same_b)


@pytest.mark.parametrize(
    "table,match",
    [
        ([(0, 1)] * 3, "one per output map"),
        ([(0,), (), (1,), (2,)], "empty"),
        ([(0,), (1, 1), (2,), (0,)], "distinct"),
        ([(0,), (1,), (3,), (0,)], r"0\.\.2"),
    ],
)
def test_partial_conv_rejects_bad_tables(table, match):
    with pytest.raises(ValueError, match=match):
        PartialConv2d(3, 4, 3, table)


# -- RBF output and loss ----------------------------------------------------------------------
def test_digit_bitmaps():
    assert DIGIT_BITMAPS.shape == (10, 84) and set(np.unique(DIGIT_BITMAPS)) == {-1.0, 1.0}
    assert not DIGIT_BITMAPS.flags.writeable
    hamming = (DIGIT_BITMAPS[:, None] != DIGIT_BITMAPS[None]).sum(axis=2)
    assert hamming[~np.eye(10, dtype=bool)].min() >= 7  # pairwise distinct, by 7+ pixels
    for digit, picture in enumerate(DIGIT_PICTURES):  # row-major 12 rows of 7
        assert len(picture) == 12 and {len(row) for row in picture} == {7}
        drawn = np.array([[1.0 if c == "#" else -1.0 for c in row] for row in picture])
        np.testing.assert_array_equal(DIGIT_BITMAPS[digit].reshape(12, 7), drawn)


@pytest.mark.parametrize("device", DEVICES)
def test_rbf_output_gradient_and_fixed_centres(device):
    layer = RBFOutput(dtype="float64")
    assert check_on(device, layer, rand(4, 84) * 1.5) == ["centres"]  # no grad: not trained
    small = RBFOutput(5, centres=rand(3, 5, seed=3), dtype="float64")
    assert check_on(device, small, rand(6, 5)) == ["centres"]


@pytest.mark.parametrize("device", DEVICES)
def test_rbf_output_is_minus_squared_distance_and_argmax_is_nearest(device):
    layer = RBFOutput(dtype="float64").to(device)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 64)
    x_host = np.concatenate(  # noisy bitmaps, then points anywhere
        [DIGIT_BITMAPS[labels] + 0.8 * rng.standard_normal((64, 84)), rand(64, 84) * 2]
    )
    logits = asnumpy(layer.forward(to_device(x_host, device)))
    distances = ((x_host[:, None, :] - DIGIT_BITMAPS[None]) ** 2).sum(axis=2)
    np.testing.assert_allclose(logits, -distances, rtol=1e-12)
    np.testing.assert_array_equal(logits.argmax(axis=1), distances.argmin(axis=1))
    np.testing.assert_array_equal(logits[:64].argmax(axis=1), labels)
    exact = asnumpy(layer.forward(to_device(DIGIT_BITMAPS.copy(), device)))
    np.testing.assert_array_equal(exact.argmax(axis=1), np.arange(10))
    assert np.all(np.diag(exact) == 0)


def test_rbf_output_parameters_and_checks():
    layer = RBFOutput()
    assert layer.num_parameters() == 840 and layer.centres.data.dtype == np.float32
    np.testing.assert_array_equal(layer.centres.data, DIGIT_BITMAPS)
    layer.centres.data[0, 0] = 5.0  # a copy: the module constant is untouched
    assert DIGIT_BITMAPS[0, 0] == -1.0
    with pytest.raises(ValueError, match=r"\(classes, 80\)"):
        RBFOutput(80)
    with pytest.raises(ValueError, match=r"\(N, 84\)"):
        layer.forward(np.zeros((2, 83), np.float32))


def test_classic_lenet5_has_60840_parameters_and_trains_without_moving_centres():
    rng = host_rng(0)
    net = Sequential(
        Conv2d(1, 6, 5, init="pytorch", rng=rng), LeCunTanh(),  # C1: 156
        TrainableSubsampling(6, rng=rng), LeCunTanh(),  # S2: 12
        PartialConv2d(6, 16, 5, LENET5_C3_TABLE, rng=rng), LeCunTanh(),  # C3: 1,516
        TrainableSubsampling(16, rng=rng), LeCunTanh(),  # S4: 32
        Conv2d(16, 120, 5, rng=rng), LeCunTanh(), Flatten(),  # C5: 48,120
        Linear(120, 84, rng=rng), LeCunTanh(),  # F6: 10,164
        RBFOutput(),  # 840 fixed centres
    )  # fmt: skip
    assert net.num_parameters() == 60_840
    data = np.random.default_rng(1)
    x, y = data.standard_normal((16, 1, 32, 32)).astype(np.float32), data.integers(0, 10, 16)
    optimizer = Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss, grad = rbf_loss(net.forward(x), y)
        net.backward(grad)
        optimizer.step()
        losses.append(float(loss))
    assert net.forward(x).shape == (16, 10) and losses[-1] < 0.5 * losses[0]
    np.testing.assert_array_equal(net.layers()[-1].centres.data, DIGIT_BITMAPS)


def paper_loss(logits, labels, j):
    """LeCun et al. 1998, section II-C, written out with ``y = -logits`` (moderate values only)."""
    y = -logits
    terms = y[np.arange(len(labels)), labels] + np.log(np.exp(-j) + np.exp(-y).sum(axis=1))
    return terms.mean()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("j", [RBF_LOSS_J, 0.1, 5.0])
def test_rbf_loss_gradient_and_paper_formula(device, j):
    rng = np.random.default_rng(0)
    logits_host, labels_host = -np.abs(rng.standard_normal((6, 10)) * 3), rng.integers(0, 10, 6)
    logits, labels = to_device(logits_host, device), to_device(labels_host, device)
    loss, grad = rbf_loss(logits, labels, j)
    assert loss.shape == () and device_of(loss) == get_device(device)  # 0-d, not moved
    assert float(loss) == pytest.approx(paper_loss(logits_host, labels_host, j), rel=1e-12)
    assert float(loss) > 0  # the paper: the second term never exceeds the first
    numeric = grad_numeric(lambda: float(rbf_loss(logits, labels, j)[0]), logits)
    assert rel_error(asnumpy(grad), numeric) <= TOL


def test_rbf_loss_tends_to_softmax_cross_entropy():
    rng = np.random.default_rng(1)
    logits, labels = -np.abs(rng.standard_normal((8, 10)) * 4), rng.integers(0, 10, 8)
    ce, ce_grad = softmax_cross_entropy(logits, labels)
    gaps = []
    for j in (0.0, 1.0, 5.0, 10.0, 20.0):
        loss, _ = rbf_loss(logits, labels, j)
        gaps.append(float(loss - ce))  # > 0: the rubbish class takes some probability
    assert gaps[-1] > 0 and all(a > b for a, b in itertools.pairwise(gaps))
    assert abs(float(rbf_loss(logits, labels, 40.0)[0] - ce)) < 1e-13
    loss, grad = rbf_loss(logits, labels, math.inf)
    assert float(loss) == pytest.approx(float(ce), rel=1e-15)
    np.testing.assert_allclose(grad, ce_grad, rtol=1e-14, atol=1e-16)


def test_rbf_loss_extreme_penalties_and_checks():
    logits = np.array([[-1e4, -2e4, -3e4], [-5e3, 0.0, -1e4]])
    loss, grad = rbf_loss(logits, np.array([0, 0]), 1.0)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(grad))
    # sample 0: every class far, the rubbish class takes all: E = y_D - j;
    # sample 1: class 1 (y = 0) competes with the rubbish class: E = y_D + log(1 + e^-j)
    assert float(loss) == pytest.approx((1e4 - 1.0 + 5e3 + math.log1p(math.exp(-1))) / 2)
    p1 = 1 / (1 + math.exp(-1))
    np.testing.assert_allclose(grad, [[-0.5, 0, 0], [-0.5, p1 / 2, 0]], atol=1e-12)
    loss32, _ = rbf_loss(logits.astype(np.float32), np.array([0, 1]))
    assert loss32.dtype == np.float32
    with pytest.raises(ValueError, match="labels shape"):
        rbf_loss(logits, np.array([[0], [1]]))


def test_sparse_weight_is_the_reverse_of_dense_weight():
    c3 = PartialConv2d(6, 16, 5, LENET5_C3_TABLE, rng=np.random.default_rng(2))
    dense = c3.dense_weight()
    assert np.array_equal(c3.sparse_weight(dense), c3.weight.data)
    with pytest.raises(ValueError, match=r"has shape \(16, 6, 5\), expected \(16, 6, 5, 5\)"):
        c3.sparse_weight(dense[..., 0])
    dense[0, 5, 2, 2] = 0.5  # C3 map 0 does not see S2 map 5
    with pytest.raises(ValueError, match="non-zero kernels outside the connection table"):
        c3.sparse_weight(dense)
