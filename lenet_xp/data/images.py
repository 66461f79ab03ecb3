"""Your own digit pictures as MNIST-style inputs (host-side; decoding by Pillow).

MNIST digits are white on black, size-normalised to fit 20x20 and centred by centre of mass in
a 28x28 frame. A photo or scan is usually dark on light, larger, and off-centre; fed as it is,
a network trained on MNIST sees nonsense. :func:`prepare_digit` redoes MNIST's preparation;
:func:`load_digit` (a file, for ``lenet_xp.predict``) and :func:`digit_from_bytes` (an upload,
for ``lenet_xp.serve``) both go through it, so every front end shows the network the same input.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np

from lenet_xp.data.mnist import BACKGROUND, MEAN, STD

#: Pictures are decoded at most this many pixels on their long side (a phone photo of 4000
#: pixels is reduced first); the digit ends up 20 pixels tall whatever the picture's size.
MAX_SIDE = 1024


class ImageError(Exception):
    """An image cannot be read or holds no digit; the message is one line naming the file."""


class TooManyPixelsError(ImageError):
    """An image larger, once decoded, than the caller allows (``max_pixels``)."""


#: ``reserve(nbytes)``: a context manager holding ``nbytes`` of memory for one decode (a
#: server's :class:`~lenet_xp.web.budget.DecodeBudget`); entered before decoding, left after.
Reserve = Callable[[int], AbstractContextManager[Any]]
#: Peak bytes a pixel that decoding and shrinking a picture takes (:func:`decode_cost`),
#: measured on 36- to 40-megapixel PNGs: grey, palette, colour, colour with transparency.
BYTES_PER_PIXEL = {"grey": 1.5, "palette": 2.0, "colour": 5.0, "transparent": 6.0}


#: The transposition that makes a picture upright, by its EXIF orientation (tag 0x0112).
_UPRIGHT = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
            6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}  # fmt: skip


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise ImageError('reading images needs Pillow: pip install "lenet_xp[images]"') from None
    return Image


def _check_pixels(image: Any, max_pixels: int | None, name: str) -> None:
    """:class:`TooManyPixelsError` when ``image`` (opened, not yet decoded) would decode to more
    than ``max_pixels`` pixels; its size is read from the file's header."""
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise TooManyPixelsError(
            f"{name}: {width}x{height} pixels ({width * height / 1e6:.1f} megapixels) is over "
            f"the limit of {max_pixels / 1e6:g} megapixels: send a smaller picture (a digit "
            f"needs a few hundred pixels a side)"
        )


def decode_cost(image: Any) -> int:
    """The peak bytes of memory :func:`read_grey` takes to decode and shrink ``image`` (an
    open Pillow image, not yet decoded: its size and mode come from the file's header, after
    ``draft``): its pixels times :data:`BYTES_PER_PIXEL` of its kind."""
    width, height = image.size
    if image.mode == "PA" or "transparency" in image.info or "A" in image.getbands():
        kind = "transparent"
    else:
        kinds = {"1": "grey", "L": "grey", "P": "palette"}
        kind = kinds.get(image.mode, "colour")
    return int(width * height * BYTES_PER_PIXEL[kind])


def _grey(
    image: Any, max_pixels: int | None = None, name: str = "the picture",
    reserve: Reserve | None = None,
) -> np.ndarray:  # fmt: skip
    """An open Pillow image as grey levels ``(H, W)`` in [0, 1]: upright as the camera's EXIF
    orientation says, transparent parts as white paper, at most :data:`MAX_SIDE` pixels long.

    Memory: a large JPEG is decoded at a reduced scale (``draft``: 1/2 to 1/8); any other
    picture is decoded whole (at most ``max_pixels``, else :class:`TooManyPixelsError` before
    decoding), then shrunk and brought to grey levels with as few full-size copies as it
    takes (:func:`decode_cost`). ``reserve``: held around the decoding, with its cost."""
    image.draft("L", (MAX_SIDE, MAX_SIDE))  # JPEG: decode at a reduced scale (fast), else no-op
    _check_pixels(image, max_pixels, name)
    with reserve(decode_cost(image)) if reserve else contextlib.nullcontext():
        upright = _UPRIGHT.get(image.getexif().get(0x0112))  # a PNG's decodes it: EXIF may follow
        grey = _shrunk_grey(image)
    if upright is not None:
        from PIL import Image

        grey = grey.transpose(Image.Transpose[upright])
    return np.asarray(grey, dtype=np.float32) / 255.0


def _shrunk_grey(image: Any) -> Any:
    """An open Pillow image decoded as a grey ("L") Pillow image at most :data:`MAX_SIDE`
    pixels long, transparent parts as white paper. ``image`` is closed (its decoded pixels
    freed) unless it is the one returned."""
    from PIL import ImageChops

    opened = image
    if image.mode == "PA" or "transparency" in image.info:
        image = image.convert("RGBA")  # a palette's or colour key's transparency as alpha
    if "A" in image.getbands():  # ink = (1 - grey) * alpha: transparent parts are paper
        alpha, grey = image.getchannel("A"), image.convert("L")
        image.close()  # frees the decoded colour picture now, not when the file is closed
        ink = ImageChops.multiply(ImageChops.invert(grey), alpha)
        del alpha, grey
        ink.thumbnail((MAX_SIDE, MAX_SIDE))
        grey = ImageChops.invert(ink)
    else:
        if image.mode == "RGB":
            image.thumbnail((MAX_SIDE, MAX_SIDE))  # shrunk in colour: no full-size grey copy
        grey = image if image.mode == "L" else image.convert("L")
        grey.thumbnail((MAX_SIDE, MAX_SIDE))
    if grey is not opened:
        opened.close()
    return grey


def read_grey(
    source: str | os.PathLike[str] | bytes, name: str | None = None,
    max_pixels: int | None = None, reserve: Reserve | None = None,
) -> np.ndarray:  # fmt: skip
    """A picture file (a path) or its bytes as grey levels ``(H, W)`` float32 in [0, 1].

    :class:`ImageError` (one line, starting with ``name``: the path, or "the upload") when it
    cannot be read; :class:`TooManyPixelsError` when it would decode to more than ``max_pixels``
    pixels, or over Pillow's decompression-bomb limit. ``reserve(nbytes)`` is held while the
    picture is decoded (:func:`decode_cost` bytes): a server bounds decodes' memory with it."""
    Image = _pillow()
    from PIL import UnidentifiedImageError

    if isinstance(source, bytes | bytearray):
        name = name or "the upload"
        if not source:
            raise ImageError(f"{name}: is empty, not an image")
        opened: Any = io.BytesIO(source)
    else:
        name = name or str(source)
        opened = Path(source)
    try:
        with warnings.catch_warnings():  # our limit, or Pillow's error at twice its warning's
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(opened) as image:
                return _grey(image, max_pixels, name, reserve)
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except UnidentifiedImageError as exc:
        if isinstance(opened, io.BytesIO):  # Pillow's message names the BytesIO object
            raise ImageError(f"{name}: not an image (no format Pillow reads)") from None
        raise ImageError(f"{name}: cannot read as an image ({exc})") from None
    except Image.DecompressionBombError as exc:
        raise TooManyPixelsError(f"{name}: too many pixels to be a digit ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        reason = " ".join(str(exc).split())  # one line
        raise ImageError(f"{name}: cannot read as an image ({reason})") from None


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


def normalise(digit: np.ndarray) -> np.ndarray:
    """An MNIST-style ``(28, 28)`` picture in [0, 1] as the network's input ``(1, 28, 28)``
    float32 (MNIST's mean subtracted, divided by its standard deviation, as in training)."""
    return ((np.asarray(digit, dtype=np.float32) - MEAN) / STD)[None].astype(np.float32)


def denormalise(x: np.ndarray) -> np.ndarray:
    """The reverse of :func:`normalise`: the grey levels in [0, 1] (float64) of normalised
    inputs ``x`` (any shape), clipped (a pad or a distortion can step slightly outside)."""
    return np.clip(np.asarray(x, dtype=np.float64) * STD + MEAN, 0.0, 1.0)


def pad_input(x: np.ndarray, size: int) -> np.ndarray:
    """Normalised inputs ``x (N, 1, 28, 28)`` for a network taking ``size`` x ``size``: as they
    are for 28, padded to 32x32 with the background value (as ``--pad32`` training did) for 32."""
    if size == 32 and x.shape[-1] == 28:
        return np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)), constant_values=BACKGROUND)
    return x


def prepare_digit(grey: np.ndarray) -> np.ndarray:
    """Any picture ``grey (H, W)`` in [0, 1] (dark on light or light on dark) as a normalised
    network input ``(1, 28, 28)`` float32: :func:`mnist_style`, then :func:`normalise`.

    ``ValueError`` (one line) when the picture holds no digit."""
    grey = np.asarray(grey, dtype=np.float32)
    if grey.ndim != 2 or min(grey.shape) < 1:
        raise ValueError(f"a picture is a 2-D array of grey levels, got shape {grey.shape}")
    return normalise(mnist_style(grey))


def load_digit(path: str | os.PathLike[str]) -> np.ndarray:
    """One picture file as a normalised network input ``(1, 28, 28)`` float32."""
    try:
        return prepare_digit(read_grey(path))
    except ValueError as exc:
        raise ImageError(f"{path}: {exc}") from None


def digit_from_bytes(
    data: bytes, name: str = "the upload", max_pixels: int | None = None,
    reserve: Reserve | None = None,
) -> np.ndarray:  # fmt: skip
    """A picture's bytes (PNG, JPEG, ... as a file holds them) as a normalised network input
    ``(1, 28, 28)`` float32, prepared exactly as :func:`load_digit` prepares a file;
    :class:`TooManyPixelsError` over ``max_pixels`` decoded pixels (``reserve``: see
    :func:`read_grey`)."""
    try:
        return prepare_digit(read_grey(data, name, max_pixels, reserve))
    except ValueError as exc:
        raise ImageError(f"{name}: {exc}") from None
