"""``python -m lenet_xp.evaluate --checkpoint PATH``: test accuracy, loss and confusion matrix.

Evaluation runs in batches (``--batch-size``), so the activations of the whole test set are
never held at once; sums stay on the device and are read once at the end.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lenet_xp.backend import DeviceError, asnumpy, get_device, use_device
from lenet_xp.checkpoint import CheckpointError, load_checkpoint
from lenet_xp.data import DeviceSplit, to_device_split
from lenet_xp.functional.loss import softmax_cross_entropy
from lenet_xp.layers import Module
from lenet_xp.mnist import DataError, load_mnist
from lenet_xp.model import LeNet5
from lenet_xp.parallel import DataParallel


def evaluate(
    model: Module | DataParallel, split: DeviceSplit, batch_size: int = 2000
) -> tuple[float, float, Any]:
    """``(mean loss, accuracy, confusion (10, 10) host int64)`` of ``model`` on ``split``.

    ``confusion[true, predicted]`` counts images. The model is left in eval mode. Nothing
    is read back to the host until the end (no per-batch synchronisation on a GPU).
    """
    xp = split.device.xp
    model.eval()
    loss_sum = xp.zeros((), dtype=xp.float64)
    confusion = xp.zeros(100, dtype=xp.int64)
    cells = xp.arange(100)
    for x, y in split.batches(batch_size):
        logits = model.forward(x)
        loss, _ = softmax_cross_entropy(logits, y)
        loss_sum += loss * y.shape[0]
        # Cell true * 10 + predicted of each image (N,), counted by comparing with every cell
        # (N, 100): CuPy's bincount would read its input's min and max on the host (two syncs
        # per batch); this is one deterministic reduction, no atomics.
        codes = y * 10 + logits.argmax(axis=1)
        confusion += (codes[:, None] == cells).sum(axis=0)
    confusion = asnumpy(confusion).reshape(10, 10)
    n = len(split)
    return float(loss_sum) / n, int(confusion.trace()) / n, confusion


def load_model(path: str, device: Any) -> tuple[LeNet5, dict]:
    """``(model on device, meta)`` from a checkpoint written by ``lenet_xp.train``."""
    model_state, _, meta = load_checkpoint(path)
    config = meta.get("config", {})
    model = LeNet5(
        dtype=config.get("dtype", "float32"), input_size=32 if config.get("pad32") else 28
    )
    try:
        model.load_state_dict(model_state)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} does not hold a LeNet5: {exc}") from None
    return model.to(device), meta


def test_split(meta: dict, device: Any, data_dir: str | None) -> DeviceSplit:
    """MNIST's test set on ``device``, prepared as the run in ``meta`` was trained
    (its dtype, and 32x32 padding if it used ``--pad32``)."""
    config = meta.get("config", {})
    mnist = load_mnist(data_dir)
    dtype, pad32 = config.get("dtype", "float32"), bool(config.get("pad32"))
    return to_device_split(mnist.test_images, mnist.test_labels, device, dtype, pad32)


def format_confusion(confusion: Any) -> str:
    """The confusion matrix as text: rows are true digits, columns predictions."""
    lines = ["true\\pred " + " ".join(f"{d:>5}" for d in range(10))]
    lines += [f"{t:>9} " + " ".join(f"{c:>5}" for c in row) for t, row in enumerate(confusion)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lenet_xp.evaluate", description=__doc__.split("\n")[0]
    )
    p.add_argument("--checkpoint", required=True, help="a .npz written by lenet_xp.train")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument(
        "--data-dir", default=None, help="MNIST folder (else $LENET_XP_DATA, else cache)"
    )
    p.add_argument("--batch-size", type=int, default=2000, help="images per evaluation batch")
    args = p.parse_args(argv)
    if args.batch_size <= 0:
        p.error(f"--batch-size must be positive, got {args.batch_size}")
    try:
        device = get_device(args.device)
        with use_device(device):
            model, meta = load_model(args.checkpoint, device)
            test = test_split(meta, device, args.data_dir)
            loss, acc, confusion = evaluate(model, test, args.batch_size)
    except (DataError, DeviceError, CheckpointError) as exc:
        print(f"lenet_xp.evaluate: error: {exc}", file=sys.stderr)
        return 1
    print(f"checkpoint {args.checkpoint} (epoch {meta.get('epoch', '?')}) on {device}")
    print(f"test_acc {100 * acc:.2f}%  test_loss {loss:.4f}  ({len(test)} images)")
    print(format_confusion(confusion))
    return 0


if __name__ == "__main__":
    sys.exit(main())
