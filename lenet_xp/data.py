"""MNIST on the training device: normalised once, batched by index permutations.

The whole split lives on the device; a batch is ``images[idx]`` with ``idx`` a slice of a
device-resident permutation, so there is no host-to-device copy per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lenet_xp.backend import Device, to_device
from lenet_xp.mnist import MEAN, STD


@dataclass
class DeviceSplit:
    """``images (N, 1, H, W)`` float and ``labels (N,)`` int64, both on ``device``."""

    images: Any
    labels: Any
    device: Device

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(self, batch_size: int, order: Any = None):
        """Yield ``(x, y)`` batches in ``order`` (a device index array) or in storage order."""
        n = len(self)
        for start in range(0, n, batch_size):
            if order is None:
                yield (
                    self.images[start : start + batch_size],
                    self.labels[start : start + batch_size],
                )
            else:
                idx = order[start : start + batch_size]
                yield self.images[idx], self.labels[idx]


def to_device_split(
    images_u8: Any, labels_u8: Any, device: Device, dtype: str = "float32", pad_to_32: bool = False
) -> DeviceSplit:
    """Move ``images_u8 (N, 28, 28)`` uint8 and ``labels_u8 (N,)`` to ``device`` (as uint8, the
    smallest copy), then normalise there: ``(x / 255 - MEAN) / STD``, optionally zero-padded
    (in normalised units, i.e. background) to ``32 x 32``."""
    xp = device.xp
    images = to_device(images_u8, device)[:, None, :, :].astype(dtype)
    images *= 1.0 / (255.0 * STD)
    images -= MEAN / STD
    if pad_to_32:
        padded = xp.full(images.shape[:2] + (32, 32), -MEAN / STD, dtype=dtype)
        padded[:, :, 2:30, 2:30] = images
        images = padded
    labels = to_device(labels_u8, device).astype(xp.int64)
    return DeviceSplit(xp.ascontiguousarray(images), labels, device)


def permutation(n: int, rng: Any, device: Device) -> Any:
    """A permutation of ``range(n)`` drawn from the host generator ``rng`` (identical on
    every device for a seed), copied to ``device`` once per epoch."""
    return to_device(rng.permutation(n), device)
