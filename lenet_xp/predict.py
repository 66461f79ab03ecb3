"""``python -m lenet_xp.predict --checkpoint PATH IMAGE...``: read your own digit pictures.

Each picture (any format Pillow reads; dark-on-light or light-on-dark) is prepared the way
MNIST's digits were (see :mod:`lenet_xp.data.images`) and classified: one line per picture, or with
``--json`` one JSON array on stdout holding an object per picture (``file``, ``digit``,
``probability``, ``top3``). A picture that cannot be read is one line on stderr and the others
are still classified; the exit status is then 1. From Python: :func:`predict`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lenet_xp.backend import Device, DeviceError, asnumpy, get_device, use_device
from lenet_xp.data.images import ImageError, denormalise, load_digit
from lenet_xp.data.mnist import MEAN, STD
from lenet_xp.layers import Module
from lenet_xp.storage.checkpoint import CheckpointError
from lenet_xp.training.evaluation import classify, load_model

Images = Sequence[str | os.PathLike[str]] | str | os.PathLike[str] | np.ndarray


def _normalise(images: np.ndarray, size: int) -> np.ndarray:
    """MNIST-style pixels ``(N, S, S)`` or ``(N, 1, S, S)`` -> normalised ``(N, 1, S, S)``."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[:, None]
    sides = {28, size}
    if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] != x.shape[3] or x.shape[3] not in sides:
        raise ValueError(
            f"predict expects images of shape (N, 28, 28) or (N, 1, 28, 28), got {x.shape}"
        )
    if x.dtype == np.uint8:
        x = x / np.float32(255)
    elif x.dtype.kind != "f":
        raise ValueError(f"predict expects uint8 or float pixels, got {x.dtype}")
    elif x.size and (x.min() < 0 or x.max() > 1):
        raise ValueError(
            f"predict expects float pixels in [0, 1] (white on black, as MNIST / 255), got "
            f"values in [{x.min():.3g}, {x.max():.3g}]: already normalised?"
        )
    return ((x - MEAN) / STD).astype(np.float32)


def predict(
    model: Module | str | os.PathLike[str],
    images: Images,
    *,
    device: str | Device = "cpu",
    batch_size: int = 1000,
) -> tuple[np.ndarray, np.ndarray]:
    """Classify ``images`` with ``model``: ``(digits (N,) int64, probabilities (N, 10))``,
    host NumPy arrays (probabilities in the model's float dtype, rows summing to 1).

    ``images``: picture files (a path or a list of them; prepared as MNIST's digits were, see
    :mod:`lenet_xp.data.images`; an unreadable one raises
    :class:`~lenet_xp.data.images.ImageError`),
    or an array of digits already prepared as MNIST's: ``(N, 28, 28)`` or ``(N, 1, 28, 28)``,
    white on black, ``uint8`` 0-255 or float in [0, 1] (not normalised: this does that). A
    bad array raises ``ValueError``. ``model``: a network (run on its own device) or the path
    of a checkpoint, loaded on ``device``.
    """
    if isinstance(model, (str, os.PathLike)):
        model, _ = load_model(os.fspath(model), get_device(device))
    if isinstance(images, np.ndarray) or hasattr(images, "__cuda_array_interface__"):
        x = _normalise(asnumpy(images), getattr(model, "input_size", 28))
    else:
        paths = [images] if isinstance(images, (str, os.PathLike)) else list(images)
        x = np.stack([load_digit(path) for path in paths]) if paths else np.zeros((0, 1, 28, 28))
    probabilities = classify(model, x, batch_size)
    return probabilities.argmax(axis=1), probabilities


def _save_input(x: np.ndarray, path: str, folder: Path, taken: set[str]) -> Path:
    """Write normalised ``x (1, 28, 28)`` as the 28x28 greyscale PNG it came from, named after
    ``path`` (``-2``, ``-3``, ... appended when two pictures share a name)."""
    from PIL import Image

    stem, n = Path(path).stem, 1
    name = f"{stem}.png"
    while name in taken:
        n += 1
        name = f"{stem}-{n}.png"
    taken.add(name)
    out = folder / name
    Image.fromarray(np.round(denormalise(x[0]) * 255).astype(np.uint8)).save(out)
    return out


def _result(path: str, probs: np.ndarray) -> dict[str, Any]:
    top = np.argsort(-probs, kind="stable")[:3]
    return {
        "file": path,
        "digit": int(top[0]),
        "probability": float(f"{probs[top[0]]:.4g}"),
        "top3": [{"digit": int(d), "probability": float(f"{probs[d]:.4g}")} for d in top],
    }


def _run(args: argparse.Namespace, device: Device) -> int:
    """The CLI on the current ``device``: returns the exit status, 1 if any picture failed."""

    def error(message: str) -> None:
        print(f"lenet_xp.predict: error: {message}", file=sys.stderr)

    try:
        model, _ = load_model(args.checkpoint, device, args.arch)
    except CheckpointError as exc:
        error(str(exc))
        return 1
    folder = Path(args.save_input) if args.save_input else None
    try:
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        error(f"cannot create --save-input folder {folder}: {exc.strerror or exc}")
        return 1
    paths, inputs, saved, taken = [], [], {}, set()
    for path in args.images:
        try:
            x = load_digit(path)
            if folder is not None:
                saved[path] = str(_save_input(x, path, folder, taken))
        except ImageError as exc:
            error(str(exc))
            continue
        except OSError as exc:
            error(f"{path}: cannot write its input to {folder}: {exc.strerror or exc}")
            continue
        paths.append(path)
        inputs.append(x)
    probabilities = classify(model, np.stack(inputs)) if inputs else np.zeros((0, 10))
    results = [_result(path, probs) for path, probs in zip(paths, probabilities, strict=True)]
    for result in results:
        if result["file"] in saved:
            result["input"] = saved[result["file"]]
    if args.json:  # one object a line inside the array: valid JSON, readable, greppable
        lines = ",\n".join(json.dumps(r) for r in results)
        print(f"[\n{lines}\n]" if results else "[]")
    else:
        for r in results:
            print(f"{r['file']}: {r['digit']} (probability {r['probability']:.3f})")
    return 1 if len(results) < len(args.images) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lenet_xp.predict", description=__doc__.split("\n")[0]
    )
    p.add_argument("images", nargs="+", help="picture files (PNG, JPEG, ...)")
    p.add_argument("--checkpoint", required=True, help="a .npz written by lenet_xp.train")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--arch", default=None, help="refuse a checkpoint of another --arch")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON array: per picture file, digit, probability, top3 (and input)",
    )
    p.add_argument(
        "--save-input",
        metavar="DIR",
        default=None,
        help="write the 28x28 picture the network saw for each file to DIR/NAME.png",
    )
    args = p.parse_args(argv)
    try:
        device = get_device(args.device)
    except DeviceError as exc:
        print(f"lenet_xp.predict: error: {exc}", file=sys.stderr)
        return 1
    with use_device(device):
        return _run(args, device)


if __name__ == "__main__":
    sys.exit(main())
