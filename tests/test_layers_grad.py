"""Every layer's backward against central finite differences, in float64 (rel. error <= 1e-6)."""

import numpy as np
import pytest
from gradcheck import check_layer

from lenet_xp.layers import (
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Flatten,
    LeCunTanh,
    Linear,
    MaxPool2d,
    ReLU,
    Sequential,
    Sigmoid,
    Tanh,
)


def rand(*shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize(
    "c_in,c_out,k,stride,padding,h,w",
    [
        (1, 6, 5, 1, 2, 8, 8),  # conv1 of LeNet at small size
        (3, 4, 3, 1, 0, 7, 9),  # non-square, odd
        (2, 3, 3, 2, 1, 7, 8),  # stride 2, padding 1
        (2, 2, 5, 1, 2, 6, 5),  # padding 2
        (2, 3, 4, 2, 2, 9, 7),  # stride 2, padding 2, even kernel
        (3, 2, 1, 1, 0, 3, 4),  # 1x1
    ],
)
def test_conv2d(c_in, c_out, k, stride, padding, h, w):
    layer = Conv2d(c_in, c_out, k, stride, padding, rng=np.random.default_rng(0), dtype="float64")
    check_layer(layer, rand(2, c_in, h, w))


def test_conv2d_without_bias_and_input_grad_switch():
    layer = Conv2d(2, 3, 3, bias=False, rng=np.random.default_rng(0), dtype="float64")
    check_layer(layer, rand(2, 2, 5, 6))
    layer.needs_input_grad = False
    layer.forward(rand(2, 2, 5, 6))
    assert layer.backward(rand(2, 3, 3, 4)) is None


def test_linear():
    layer = Linear(7, 5, rng=np.random.default_rng(0), dtype="float64")
    check_layer(layer, rand(4, 7))


@pytest.mark.parametrize("kernel,stride", [(2, 2), (3, 2), (3, 3), (2, 1)])
def test_max_pool(kernel, stride):
    check_layer(MaxPool2d(kernel, stride), rand(2, 3, 7, 8))


@pytest.mark.parametrize("kernel,stride", [(2, 2), (3, 2), (2, 1)])
def test_avg_pool(kernel, stride):
    check_layer(AvgPool2d(kernel, stride), rand(2, 3, 7, 8))


def test_max_pool_ties_route_to_first_maximum():
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 2:, 2:] = [[3.0, 3.0], [3.0, 1.0]]  # a tie inside the last window
    layer = MaxPool2d(2)
    y = layer.forward(x)
    grad_x = layer.backward(np.arange(1.0, 5.0).reshape(1, 1, 2, 2))
    expected = np.zeros((4, 4))
    expected[0, 0], expected[0, 2], expected[2, 0], expected[2, 2] = 1, 2, 3, 4
    np.testing.assert_array_equal(y[0, 0], [[0, 0], [0, 3]])
    np.testing.assert_array_equal(grad_x[0, 0], expected)


def test_max_pool_overlapping_windows_accumulate():
    x = np.array([[[[0.0, 5.0, 0.0, 0.0, 0.0]]]]).repeat(3, axis=2)  # (1,1,3,5)
    layer = MaxPool2d(3, 1)
    layer.forward(x)
    grad_x = layer.backward(np.ones((1, 1, 1, 3)))
    assert grad_x[0, 0, 0, 1] == 2.0  # max of windows 0 and 1
    assert grad_x[0, 0, 0, 2] == 1.0  # window 2: first max is its first element (a zero)
    assert grad_x.sum() == 3.0


@pytest.mark.parametrize("layer_cls", [ReLU, Sigmoid, Tanh, LeCunTanh, Flatten])
def test_elementwise(layer_cls):
    x = rand(3, 2, 4, 5)
    x[np.abs(x) < 1e-3] = 0.5  # keep ReLU's kink away from the finite-difference step
    check_layer(layer_cls(), x)


def test_lecun_tanh_closed_form():
    x = np.array([[-2.0, 0.0, 1.0]])
    np.testing.assert_allclose(LeCunTanh().forward(x), 1.7159 * np.tanh(2 * x / 3))


def test_sigmoid_extreme_inputs_are_finite():
    y = Sigmoid().forward(np.array([[-1e4, 0.0, 1e4]]))
    np.testing.assert_allclose(y, [[0.0, 0.5, 1.0]])


@pytest.mark.parametrize("layer_cls,shape", [(BatchNorm1d, (6, 4)), (BatchNorm2d, (3, 4, 3, 5))])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm(layer_cls, shape, training):
    layer = layer_cls(4, dtype="float64")
    layer.weight.data[:] = rand(4, seed=5)
    layer.bias.data[:] = rand(4, seed=6)
    layer.running_mean[:] = rand(4, seed=7)
    layer.running_var[:] = 1.5
    layer.train(training)
    check_layer(layer, rand(*shape) * 2 + 1)


def test_sequential_chains_layers():
    rng = np.random.default_rng(0)
    net = Sequential(
        Linear(6, 5, rng=rng, dtype="float64"), Tanh(), Linear(5, 3, rng=rng, dtype="float64")
    )
    assert [name for name, _ in net.named_parameters()] == [
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
    ]
    check_layer(net, rand(4, 6))
