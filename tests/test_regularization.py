"""Dropout (inverted, train/eval) and batch-norm running statistics."""

import numpy as np
import pytest

from lenet_xp.layers import BatchNorm1d, BatchNorm2d, Dropout


def test_dropout_train_mask_scale_and_gradient():
    layer = Dropout(0.25, seed=0)
    x = np.ones((200, 500), dtype=np.float32)
    y = layer.forward(x)
    kept = y != 0
    assert y.dtype == np.float32
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-6)
    g = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    np.testing.assert_allclose(layer.backward(g), g * y, rtol=1e-6)  # y = mask * x, x = 1


def test_dropout_eval_is_identity_and_seeded():
    x = np.random.default_rng(1).standard_normal((4, 6))
    layer = Dropout(0.5, seed=3)
    layer.eval()
    assert layer.forward(x) is x and layer.backward(x) is x
    a, b = Dropout(0.5, seed=3), Dropout(0.5, seed=3)
    np.testing.assert_array_equal(a.forward(x), b.forward(x))
    with pytest.raises(ValueError):
        Dropout(1.0)


def test_batchnorm_running_statistics_match_closed_form():
    rng = np.random.default_rng(0)
    layer = BatchNorm2d(3, dtype="float64")
    batches = [rng.standard_normal((4, 3, 2, 5)) * 3 + 2 for _ in range(2)]
    mean, var = np.zeros(3), np.ones(3)
    for x in batches:
        y = layer.forward(x)
        np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-12)
        np.testing.assert_allclose(y.var(axis=(0, 2, 3)), 1, rtol=1e-4)
        mean = 0.9 * mean + 0.1 * x.mean(axis=(0, 2, 3))
        var = 0.9 * var + 0.1 * x.var(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(layer.running_mean, mean)
    np.testing.assert_allclose(layer.running_var, var)
    assert int(layer.num_batches_tracked) == 2
    layer.eval()
    x = batches[0]
    expected = (x - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5)
    np.testing.assert_allclose(layer.forward(x), expected)
    assert set(layer.state_dict()) == {
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }


def test_batchnorm_rejects_wrong_shape():
    with pytest.raises(ValueError, match="BatchNorm1d"):
        BatchNorm1d(4).forward(np.zeros((2, 5), np.float32))
