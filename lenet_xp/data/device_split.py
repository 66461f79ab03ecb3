"""MNIST on the training device: normalised once, batched by index permutations.

The whole split lives on the device; a batch is ``images[idx]`` with ``idx`` a slice of a
device-resident permutation, so there is no host-to-device copy per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lenet_xp.backend import Device, asnumpy, get_array_module, to_device
from lenet_xp.data.mnist import BACKGROUND, MEAN, STD, DataError

#: Labels are class indices ``0..NUM_CLASSES-1`` (MNIST's digits).
NUM_CLASSES = 10


@dataclass
class DeviceSplit:
    """``images (N, 1, H, W)`` float and ``labels (N,)`` int64, both on ``device``."""

    images: Any
    labels: Any
    device: Device

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(
        self, batch_size: int, order: Any = None, shifts: Any = None, max_shift: int = 0,
        skip: int = 0, out: Any = None,
    ):  # fmt: skip
        """Yield ``(x, y)`` batches in ``order`` (a device index array) or in storage order,
        from batch ``skip`` on (the ones before are not computed: a resumed epoch); ``out``,
        if given (``(>= batch_size, C, H, W)``, the images' dtype), receives the images of
        each batch gathered in ``order`` (the CPU workers' shared memory), which ``x`` views.

        ``shifts (2, N)`` int (on the device, entries within ``+-max_shift``), if given,
        translates image ``i`` by ``shifts[:, i]`` pixels (down, right): see
        :func:`shift_images` (random distortions come later: ``DataParallel.forward_backward``).
        """
        for start in range(skip * batch_size, len(self), batch_size):
            idx = (
                slice(start, start + batch_size)
                if order is None
                else order[start : start + batch_size]
            )
            if out is not None and order is not None and shifts is None:
                x = out[: idx.shape[0]]
                self.device.xp.take(self.images, idx, axis=0, out=x)
            else:
                x = self.images[idx]
            if shifts is not None:
                x = shift_images(x, shifts[0, idx], shifts[1, idx], max_shift, BACKGROUND)
            yield x, self.labels[idx]


def shift_images(x: Any, down: Any, right: Any, max_shift: int, fill: float) -> Any:
    """Translate each image of ``x (N, C, H, W)`` by ``down[i]``, ``right[i]`` pixels (ints
    within ``+-max_shift``, negative = up/left), filling with ``fill``: one pad and one
    gather, no per-image Python and no host synchronisation."""
    xp = get_array_module(x)
    n, c, h, w = x.shape
    s = max_shift
    padded = xp.full((n, c, h + 2 * s, w + 2 * s), fill, dtype=x.dtype)
    padded[:, :, s : s + h, s : s + w] = x
    rows = (s - down)[:, None] + xp.arange(h)  # (N, H): padded row read by each output row
    cols = (s - right)[:, None] + xp.arange(w)  # (N, W)
    return padded[
        xp.arange(n)[:, None, None, None],
        xp.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def to_device_split(
    images_u8: Any, labels_u8: Any, device: Device, dtype: str = "float32", pad_to_32: bool = False
) -> DeviceSplit:
    """Move ``images_u8 (N, 28, 28)`` uint8 and ``labels_u8 (N,)`` to ``device`` (as uint8, the
    smallest copy), then normalise there: ``(x / 255 - MEAN) / STD``, optionally zero-padded
    (in normalised units, i.e. background) to ``32 x 32``.

    Raises :class:`~lenet_xp.data.mnist.DataError` (one line) unless there is one integer label
    in ``0..NUM_CLASSES-1`` per image: a label out of range must never reach a GPU, where an
    index out of range wraps silently instead of raising."""
    check_labels(images_u8, labels_u8)
    xp = device.xp
    images = to_device(images_u8, device)[:, None, :, :].astype(dtype)
    images *= 1.0 / (255.0 * STD)
    images -= MEAN / STD
    if pad_to_32:
        padded = xp.full(images.shape[:2] + (32, 32), BACKGROUND, dtype=dtype)
        padded[:, :, 2:30, 2:30] = images
        images = padded
    labels = to_device(labels_u8, device).astype(xp.int64)
    return DeviceSplit(xp.ascontiguousarray(images), labels, device)


def check_labels(images: Any, labels: Any) -> None:
    """Raise :class:`DataError` unless ``labels`` is ``(N,)`` integers in ``0..NUM_CLASSES-1``
    with ``N = len(images)`` (host arrays)."""
    labels = asnumpy(labels)  # a list, say
    n = len(images)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise DataError(f"labels of shape {labels.shape} for {n} images; need one label per image")
    if labels.dtype.kind not in "iu":
        raise DataError(f"labels are {labels.dtype}, not integers; pass class indices 0..9")
    bad = get_array_module(labels).flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        raise DataError(
            f"label {labels[bad[0]]} at index {bad[0]} is outside 0..{NUM_CLASSES - 1} "
            f"({bad.size} such labels); fix the labels before training"
        )


def random_shifts(n: int, max_shift: int, rng: Any, device: Device) -> Any:
    """``(2, n)`` random integer shifts in ``[-max_shift, max_shift]`` from the host ``rng``,
    copied to ``device`` once per epoch."""
    return to_device(rng.integers(-max_shift, max_shift + 1, size=(2, n)), device)


def permutation(n: int, rng: Any, device: Device) -> Any:
    """A permutation of ``range(n)`` drawn from the host generator ``rng`` (identical on
    every device for a seed), copied to ``device`` once per epoch."""
    return to_device(rng.permutation(n), device)
