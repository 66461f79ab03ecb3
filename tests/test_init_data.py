"""Initialisers' distributions, device-resident MNIST batches, and the README's API example."""

import re
from pathlib import Path

import numpy as np
import pytest

from lenet_xp.backend import CPU
from lenet_xp.data.device_split import permutation, to_device_split
from lenet_xp.data.mnist import MEAN, STD
from lenet_xp.layers.init import fans, init_bias, init_weight


def test_fans():
    assert fans((16, 6, 5, 5)) == (150, 400)
    assert fans((120, 400)) == (400, 120)


@pytest.mark.parametrize("shape", [(64, 200), (32, 16, 5, 5)])
def test_init_distributions(shape):
    rng = np.random.default_rng(0)
    fan_in, fan_out = fans(shape)
    torch_default = init_weight(shape, "pytorch", rng)
    assert np.abs(torch_default).max() <= 1 / np.sqrt(fan_in)
    assert torch_default.std() == pytest.approx(1 / np.sqrt(3 * fan_in), rel=0.05)  # U(-b, b)
    he = init_weight(shape, "he", rng)
    assert he.std() == pytest.approx(np.sqrt(2 / fan_in), rel=0.05)
    glorot = init_weight(shape, "glorot", rng)
    bound = np.sqrt(6 / (fan_in + fan_out))
    assert np.abs(glorot).max() <= bound and glorot.std() == pytest.approx(
        bound / np.sqrt(3), rel=0.05
    )
    assert he.dtype == glorot.dtype == np.float32
    assert not init_bias(shape, "he", rng).any()
    with pytest.raises(ValueError, match="unknown init"):
        init_weight(shape, "xavier-ish", rng)


def test_device_split_normalises_pads_and_batches():
    images = np.zeros((5, 28, 28), np.uint8)
    images[:, 3, 4] = 255
    labels = np.arange(5, dtype=np.uint8)
    split = to_device_split(images, labels, CPU, "float32", pad_to_32=True)
    assert split.images.shape == (5, 1, 32, 32) and split.images.dtype == np.float32
    assert split.images[0, 0, 0, 0] == pytest.approx(-MEAN / STD)  # background
    assert split.images[0, 0, 5, 6] == pytest.approx((1 - MEAN) / STD)  # shifted by 2
    order = permutation(5, np.random.default_rng(0), CPU)
    seen = [y for _, ys in split.batches(2, order) for y in ys.tolist()]
    assert sorted(seen) == [0, 1, 2, 3, 4] and seen == order.tolist()
    out = np.full((2, 1, 32, 32), np.nan, np.float32)  # gathered there (the workers' memory)
    for start, (x, y) in zip(range(0, 5, 2), split.batches(2, order, out=out), strict=True):
        assert np.shares_memory(x, out) and x.shape[0] == y.shape[0]
        np.testing.assert_array_equal(x, split.images[order[start : start + 2]])


def test_readme_api_example_runs():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## The API in ten lines\s+```python\n(.*?)```", readme, re.S).group(1)
    assert len(block.strip().splitlines()) <= 12
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert np.isfinite(float(namespace["loss"])) and "conv1.weight" in namespace["grads"]


def test_shift_images_translates_each_image_and_fills_background():
    from lenet_xp.data.device_split import shift_images

    x = np.arange(2 * 16, dtype=np.float32).reshape(2, 1, 4, 4)
    out = shift_images(x, np.array([1, 0]), np.array([0, -2]), 2, -1.0)
    np.testing.assert_array_equal(out[0, 0, 1:], x[0, 0, :3])  # down by one
    np.testing.assert_array_equal(out[0, 0, 0], [-1, -1, -1, -1])
    np.testing.assert_array_equal(out[1, 0, :, :2], x[1, 0, :, 2:])  # left by two
    np.testing.assert_array_equal(out[1, 0, :, 2:], -1)


def test_augmented_batches_keep_labels_and_pixel_mass():
    from lenet_xp.data.device_split import random_shifts

    images = np.zeros((6, 28, 28), np.uint8)
    images[:, 10:18, 10:18] = 255  # a square well inside the frame
    split = to_device_split(images, np.arange(6, dtype=np.uint8), CPU)
    rng = np.random.default_rng(0)
    order = permutation(6, rng, CPU)
    shifts = random_shifts(6, 2, rng, CPU)
    assert np.abs(shifts).max() <= 2
    seen = []
    for x, y in split.batches(4, order, shifts, 2):
        assert (x > 0).sum(axis=(1, 2, 3)).tolist() == [64] * len(y)  # moved, not cut
        seen += y.tolist()
    assert seen == order.tolist()
