"""The JSON API behind ``python -m lenet_xp.serve``: request bodies in, answers out.

No HTTP here (that is :mod:`lenet_xp.serve`): :func:`parse_body` turns a ``POST /predict``
body into a network input, or an :class:`ApiError` (a status and one line); a
:class:`Classifier` runs the network on it, one forward pass at a time, and says what it saw.

Bodies ``POST /predict`` takes:

* a picture's bytes (PNG, JPEG, ...; any ``Content-Type`` but JSON), prepared exactly as
  ``lenet_xp.predict`` prepares a picture file (:func:`lenet_xp.data.images.digit_from_bytes`);
* ``multipart/form-data`` (``curl -F file=@digit.png``): the first part that is a file;
* JSON ``{"image": [[...], ...]}`` (or the bare array; ``Content-Type: application/json``,
  or none that says image and a body starting with ``{`` or ``[``): 28x28 grey levels, 0-255
  (or 0-1 when none is above 1), prepared the same way; with ``"prepare": false`` they are
  taken as they are, as MNIST stores its digits (white on black, centred in 20x20).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

import numpy as np

from lenet_xp.backend import Device, asnumpy, get_array_module, to_device, use_device
from lenet_xp.data.images import (
    ImageError,
    Reserve,
    TooManyPixelsError,
    denormalise,
    digit_from_bytes,
    normalise,
    pad_input,
    prepare_digit,
)
from lenet_xp.functional.loss import log_softmax
from lenet_xp.layers import Module
from lenet_xp.models.feature_maps import layer_outputs

#: The side of the arrays ``POST /predict`` takes as JSON.
ARRAY_SIDE = 28
#: The largest JSON body read: a 28x28 array is under 100 KB even pretty-printed, and parsing
#: JSON numbers takes about 8 times their text in memory (a 20 MB body would take 160 MB).
MAX_JSON_BYTES = 2**20


class ApiError(Exception):
    """A request the API refuses: ``status`` (4xx) and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())


@dataclass(frozen=True)
class Body:
    """A request body with its (lower-cased, parameter-free) media type and full header."""

    media_type: str
    content_type: str
    data: bytes


def body_of(content_type: str | None, data: bytes) -> Body:
    """``data`` with its ``Content-Type`` header split into the media type and the rest."""
    header = content_type or ""
    return Body(header.split(";")[0].strip().lower(), header, data)


def parse_body(
    body: Body, max_pixels: int | None = None, reserve: Reserve | None = None
) -> np.ndarray:
    """The network input ``(1, 28, 28)`` float32 (normalised) a ``POST /predict`` body holds.

    Raises :class:`ApiError` for anything else: 400 for not an image, malformed JSON, an array
    of the wrong shape or range, a blank picture; 413 for a picture that would decode to more
    than ``max_pixels`` pixels (refused from its header, before decoding). ``reserve``: held
    while a picture is decoded, with its cost in bytes (see :mod:`lenet_xp.web.budget`)."""
    json_type = body.media_type == "application/json" or body.media_type.endswith("+json")
    looks_json = body.data.lstrip()[:1] in (b"{", b"[")  # curl -d @x.json sends no JSON type
    if json_type or (looks_json and not body.media_type.startswith("image/")):
        return _from_json(body.data)
    data = body.data
    if body.media_type == "multipart/form-data":
        data = _multipart_file(body)
    if not data:
        raise ApiError(400, "the body is empty: send a picture (PNG, JPEG, ...) or JSON")
    try:
        return digit_from_bytes(data, "the upload", max_pixels, reserve)
    except TooManyPixelsError as exc:
        raise ApiError(413, str(exc)) from None
    except ImageError as exc:
        raise ApiError(400, str(exc)) from None


def _multipart_file(body: Body) -> bytes:
    """The bytes of the first file (or image) part of a ``multipart/form-data`` body."""
    head = f"Content-Type: {body.content_type}\r\n\r\n".encode("latin-1", "replace")
    message = BytesParser(policy=HTTP).parsebytes(head + body.data)
    if message.is_multipart():
        for part in message.iter_parts():
            if part.get_filename() or part.get_content_maintype() == "image":
                return part.get_payload(decode=True) or b""
    raise ApiError(400, "the multipart/form-data body holds no file: send one, e.g. -F file=@x.png")


def _from_json(data: bytes) -> np.ndarray:
    """``{"image": 28x28 array, "prepare": true}`` (or the bare array) as a network input."""
    if len(data) > MAX_JSON_BYTES:
        raise ApiError(
            413, f"the JSON body is {len(data) / 2**20:.1f} MiB, over the limit of "
            f"{MAX_JSON_BYTES // 2**20} MiB for a 28x28 array: send the array, or the picture",
        )  # fmt: skip
    try:
        request = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc})") from None
    prepare = True
    if isinstance(request, dict):
        if "image" not in request:
            raise ApiError(400, 'the JSON object has no "image" (a 28x28 array of grey levels)')
        prepare = request.get("prepare", True)
        if not isinstance(prepare, bool):
            raise ApiError(400, f'"prepare" must be true or false, not {prepare!r}')
        request = request["image"]
    try:
        image = np.asarray(request, dtype=np.float64)
    except (ValueError, TypeError):
        raise ApiError(
            400, '"image" must be a 28x28 array of numbers (rows of equal length)'
        ) from None
    side = ARRAY_SIDE
    if image.shape != (side, side):
        raise ApiError(400, f'"image" must be {side}x{side}, got shape {image.shape}')
    if not np.isfinite(image).all() or image.min() < 0 or image.max() > 255:
        raise ApiError(400, '"image" values must be grey levels from 0 to 255 (or 0 to 1)')
    grey = (image / 255.0 if image.max() > 1.0 else image).astype(np.float32)
    try:
        if prepare:
            return prepare_digit(grey)
        if grey.max() <= 0.05:
            raise ValueError("no digit found (the picture is blank)")
    except ValueError as exc:
        raise ApiError(400, f"the image: {exc}") from None
    return normalise(grey)


class Classifier:
    """A trained model answering one picture at a time, safe to call from many threads.

    Layers are written for one pass at a time (in training mode they keep the activations of
    their last pass for the backward pass), so :meth:`classify` holds a lock around the pass:
    a pass on one picture takes about a millisecond on the CPU, while decoding and preparing
    pictures, the slower part, run in parallel.
    """

    def __init__(self, model: Module, device: Device, meta: dict | None = None) -> None:
        self.model = model.eval()
        self.device = device
        self.meta = meta or {}
        self.dtype = model.parameters()[0].data.dtype
        self.layer_types = {name: type(layer).__name__ for name, layer in model.named_children()}
        self._lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        """What the page shows about the model: ``arch``, ``epoch``, ``parameters``,
        ``input_size``, ``device``."""
        config = self.meta.get("config", {})
        return {
            "arch": getattr(self.model, "arch", config.get("arch", "lenet5")),
            "epoch": self.meta.get("epoch"),
            "parameters": self.model.num_parameters(),
            "input_size": self.model.input_size,
            "device": str(self.device),
        }

    def classify(self, x: np.ndarray, maps: bool = True) -> dict[str, Any]:
        """The answer for one normalised input ``x (1, 28, 28)``: ``digit``, ``probability``,
        ``probabilities`` (10), ``input`` (the picture the network sees, rows of grey levels
        in [0, 1], 28x28 or 32x32 as the model takes) and, with ``maps``, ``feature_maps``:
        ``[{"layer", "type", "shape": [C, H, W], "maps": C x H x W values}]`` for every layer
        whose output is a stack of maps (convolutions, pools and their activations)."""
        batch = pad_input(x[None].astype(self.dtype), self.model.input_size)
        with self._lock, use_device(self.device):
            outputs = layer_outputs(self.model, to_device(batch, self.device))
            logits = outputs[-1][1]
            probs = asnumpy(get_array_module(logits).exp(log_softmax(logits)))[0]
        digit = int(probs.argmax())
        picture = denormalise(batch[0, 0])
        answer: dict[str, Any] = {
            "digit": digit,
            "probability": round(float(probs[digit]), 6),
            "probabilities": np.round(probs, 6).tolist(),
            "input": np.round(picture, 3).tolist(),
        }
        if maps:
            answer["feature_maps"] = [
                {
                    "layer": name,
                    "type": self.layer_types.get(name, ""),
                    "shape": list(out.shape[1:]),
                    "maps": np.round(out[0].astype(np.float64), 3).tolist(),
                }
                for name, out in outputs
                if out.ndim == 4
            ]
        return answer
