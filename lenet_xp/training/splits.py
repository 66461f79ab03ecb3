"""A run's data: MNIST's training set split into training and validation (``--val-size``),
and its test set, on the training device."""

from __future__ import annotations

from typing import Any

from lenet_xp.backend import Device
from lenet_xp.data.device_split import DeviceSplit, to_device_split
from lenet_xp.data.mnist import DataError, load_mnist
from lenet_xp.training.config import TrainConfig


def load_splits(
    config: TrainConfig, data_dir: str | None, device: Device, size: int
) -> tuple[DeviceSplit, DeviceSplit | None, DeviceSplit]:
    """``(train, val or None, test)`` splits on ``device``; ``val`` is the end of the
    training set when ``config.val_size`` asks for one."""

    def on_device(images: Any, labels: Any) -> DeviceSplit:
        return to_device_split(images, labels, device, config.dtype, size == 32)

    mnist = load_mnist(data_dir, progress=not config.quiet)
    n_train = config.limit_train or len(mnist.train_labels)
    n_test = config.limit_test or len(mnist.test_labels)
    train_x, train_y = mnist.train_images[:n_train], mnist.train_labels[:n_train]
    test = on_device(mnist.test_images[:n_test], mnist.test_labels[:n_test])
    n_val = config.val_size
    if n_val is None:  # the default: the last twelfth (5,000 of 60,000)
        n_val = len(train_y) // 12
    if not n_val:
        return on_device(train_x, train_y), None, test
    if not 0 < n_val < len(train_y):
        raise DataError(f"--val-size {n_val} must be between 1 and {len(train_y) - 1}")
    val = on_device(train_x[-n_val:], train_y[-n_val:])
    return on_device(train_x[:-n_val], train_y[:-n_val]), val, test
