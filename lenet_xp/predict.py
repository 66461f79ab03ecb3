"""``python -m lenet_xp.predict --checkpoint PATH IMAGE...``: read your own digit pictures.

Each picture (any format Pillow reads; dark-on-light or light-on-dark) is prepared the way
MNIST's digits were (see :mod:`lenet_xp.images`) and classified; one line per picture.
"""

from __future__ import annotations

import argparse
import sys

from lenet_xp.backend import Device, DeviceError, asnumpy, get_device, to_device, use_device
from lenet_xp.checkpoint import CheckpointError
from lenet_xp.evaluate import load_model
from lenet_xp.functional.loss import log_softmax
from lenet_xp.images import ImageError, load_digit
from lenet_xp.mnist import MEAN, STD


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lenet_xp.predict", description=__doc__.split("\n")[0]
    )
    p.add_argument("images", nargs="+", help="picture files (PNG, JPEG, ...)")
    p.add_argument("--checkpoint", required=True, help="a .npz written by lenet_xp.train")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--arch", default=None, help="refuse a checkpoint of another --arch")
    args = p.parse_args(argv)
    try:
        device = get_device(args.device)
    except DeviceError as exc:
        print(f"lenet_xp.predict: error: {exc}", file=sys.stderr)
        return 1
    with use_device(device):
        return _predict(args.checkpoint, args.images, device, args.arch)


def _predict(checkpoint: str, images: list[str], device: Device, arch: str | None = None) -> int:
    """Classify each picture in ``images`` with the model in ``checkpoint`` on ``device``
    (the current device); one line each. Returns the exit status: 1 if any failed."""
    try:
        model, _ = load_model(checkpoint, device, arch)
    except CheckpointError as exc:
        print(f"lenet_xp.predict: error: {exc}", file=sys.stderr)
        return 1
    model.eval()
    failed = 0
    for path in images:
        try:
            x = load_digit(path)
        except ImageError as exc:
            print(f"lenet_xp.predict: error: {exc}", file=sys.stderr)
            failed += 1
            continue
        x = to_device(x[None], device).astype(model.parameters()[0].data.dtype)
        if model.input_size == 32:  # pad with the background value, as --pad32 training did
            xp = device.xp
            x = xp.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)), constant_values=-MEAN / STD)
        probs = asnumpy(device.xp.exp(log_softmax(model.forward(x))))[0]
        digit = int(probs.argmax())
        print(f"{path}: {digit} (probability {probs[digit]:.3f})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
