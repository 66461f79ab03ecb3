"""Your own digit pictures as MNIST-style inputs (host-side; decoding by Pillow).

MNIST digits are white on black, size-normalised to fit 20x20 and centred by centre of mass in
a 28x28 frame. A photo or scan is usually dark on light, larger, and off-centre; fed as it is,
a network trained on MNIST sees nonsense. :func:`load_digit` redoes MNIST's preparation.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lenet_xp.mnist import MEAN, STD


class ImageError(Exception):
    """An image cannot be read or holds no digit; the message is one line naming the file."""


def _open_grey(path: Path) -> np.ndarray:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ImageError('reading images needs Pillow: pip install "lenet_xp[images]"') from None
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageError(f"{path}: cannot read as an image ({exc})") from None


def mnist_style(grey: np.ndarray) -> np.ndarray:
    """``grey (H, W)`` in [0, 1] -> ``(28, 28)`` in [0, 1], white digit on black: inverted if
    the border is light, cropped to the ink, scaled to fit 20x20, centred by centre of mass."""
    from PIL import Image

    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    light_background = border.mean() > 0.5
    ink = 1.0 - grey if light_background else grey
    background = np.median(1.0 - border if light_background else border)
    ink = np.clip(ink - background, 0.0, None)
    if ink.max() <= 0.05:
        raise ValueError("no digit found (the picture is blank)")
    rows, cols = np.nonzero(ink > 0.25 * ink.max())
    ink = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    scale = 20.0 / max(ink.shape)
    size = (max(1, round(ink.shape[1] * scale)), max(1, round(ink.shape[0] * scale)))
    small = np.asarray(Image.fromarray(ink / ink.max()).resize(size, Image.Resampling.LANCZOS))
    small = np.clip(small, 0.0, 1.0)
    frame = np.zeros((28, 28), dtype=np.float32)
    top, left = (28 - small.shape[0]) // 2, (28 - small.shape[1]) // 2
    frame[top : top + small.shape[0], left : left + small.shape[1]] = small
    mass = frame.sum()
    cy = (frame.sum(axis=1) @ np.arange(28)) / mass
    cx = (frame.sum(axis=0) @ np.arange(28)) / mass
    dy, dx = int(round(13.5 - cy)), int(round(13.5 - cx))
    return np.roll(frame, (dy, dx), axis=(0, 1))


def load_digit(path: str | os.PathLike[str]) -> np.ndarray:
    """One picture as a normalised network input ``(1, 28, 28)`` float32."""
    path = Path(path)
    try:
        digit = mnist_style(_open_grey(path))
    except ValueError as exc:
        raise ImageError(f"{path}: {exc}") from None
    return ((digit - MEAN) / STD)[None].astype(np.float32)
