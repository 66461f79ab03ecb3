"""im2col/col2im: adjoint identity, and convolution against a direct definition."""

import numpy as np
import pytest

from lenet_xp.functional.conv import col2im, conv2d_backward, conv2d_forward, im2col, output_size

CONFIGS = [  # (N, C, H, W, k, stride, padding)
    (2, 1, 8, 8, 5, 1, 2),
    (3, 2, 7, 9, 3, 2, 1),
    (1, 3, 6, 5, 4, 1, 2),
    (2, 2, 9, 7, 3, 3, 0),
    (2, 6, 14, 14, 5, 1, 0),
]


@pytest.mark.parametrize("n,c,h,w,k,stride,padding", CONFIGS)
def test_adjoint_identity(n, c, h, w, k, stride, padding):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, h, w))
    x_cols = im2col(x, k, k, stride, padding)
    cols = rng.standard_normal(x_cols.shape)
    lhs = np.vdot(x_cols, cols)
    rhs = np.vdot(x, col2im(cols, x.shape, k, k, stride, padding))
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))


def direct_conv(x, weight, bias, stride, padding):
    """Textbook loops: y[n, o, i, j] = b[o] + sum_{c,u,v} w[o,c,u,v] x_pad[n,c,i*s+u,j*s+v]."""
    n, c, h, w = x.shape
    oc, _, k, _ = weight.shape
    x_pad = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    oh, ow = output_size(h, k, stride, padding), output_size(w, k, stride, padding)
    y = np.zeros((n, oc, oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = x_pad[:, :, i * stride : i * stride + k, j * stride : j * stride + k]
            y[:, :, i, j] = np.tensordot(patch, weight, axes=([1, 2, 3], [1, 2, 3])) + bias
    return y


@pytest.mark.parametrize("n,c,h,w,k,stride,padding", CONFIGS)
def test_conv_forward_matches_definition(n, c, h, w, k, stride, padding):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, c, h, w))
    weight, bias = rng.standard_normal((4, c, k, k)), rng.standard_normal(4)
    y, _ = conv2d_forward(x, weight, bias, stride, padding)
    np.testing.assert_allclose(y, direct_conv(x, weight, bias, stride, padding), atol=1e-12)


def test_conv_keeps_float32():
    x = np.ones((2, 1, 6, 6), dtype=np.float32)
    w, b = np.ones((3, 1, 3, 3), dtype=np.float32), np.zeros(3, dtype=np.float32)
    y, cache = conv2d_forward(x, w, b, 1, 1)
    grad_x, grad_w, grad_b = conv2d_backward(np.ones_like(y), cache, w)
    assert {a.dtype for a in (y, grad_x, grad_w, grad_b)} == {np.dtype(np.float32)}


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="channels"):
        conv2d_forward(np.ones((1, 2, 5, 5)), np.ones((3, 1, 3, 3)), None)
    with pytest.raises(ValueError, match="does not fit"):
        conv2d_forward(np.ones((1, 1, 3, 3)), np.ones((1, 1, 5, 5)), None)
