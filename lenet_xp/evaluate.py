"""``python -m lenet_xp.evaluate --checkpoint PATH``: test accuracy, loss and confusion matrix.

Evaluation runs in batches (``--batch-size``), so the activations of the whole test set are
never held at once; sums stay on the device and are read once at the end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lenet_xp.averaging import averaged_state
from lenet_xp.backend import DeviceError, asnumpy, get_device, use_device
from lenet_xp.checkpoint import CheckpointError, load_checkpoint
from lenet_xp.data import DeviceSplit, to_device_split
from lenet_xp.layers import Module
from lenet_xp.mnist import DataError, load_mnist
from lenet_xp.model import model_loss
from lenet_xp.parallel import DataParallel
from lenet_xp.presets import PresetError, build_from_config


def evaluate(
    model: Module | DataParallel | Any, split: DeviceSplit, batch_size: int = 2000
) -> tuple[float, float, Any]:
    """``(mean loss, accuracy, confusion (10, 10) host int64)`` of ``model`` on ``split``.

    ``confusion[true, predicted]`` counts images. The model is left in eval mode. Nothing
    is read back to the host until the end (no per-batch synchronisation on a GPU).
    """
    xp = split.device.xp
    model.eval()
    network = model if isinstance(model, Module) else model.model  # its loss (a runner's model)
    loss_sum = xp.zeros((), dtype=xp.float64)
    confusion = xp.zeros(100, dtype=xp.int64)
    cells = xp.arange(100)
    for x, y in split.batches(batch_size):
        logits = model.forward(x)
        loss, _ = model_loss(network, logits, y)
        loss_sum += loss * y.shape[0]
        # Cell true * 10 + predicted of each image (N,), counted by comparing with every cell
        # (N, 100): CuPy's bincount would read its input's min and max on the host (two syncs
        # per batch); this is one deterministic reduction, no atomics.
        codes = y * 10 + logits.argmax(axis=1)
        confusion += (codes[:, None] == cells).sum(axis=0)
    confusion = asnumpy(confusion).reshape(10, 10)
    n = len(split)
    return float(loss_sum) / n, int(confusion.trace()) / n, confusion


def load_model(path: str, device: Any, arch: str | None = None) -> tuple[Module, dict]:
    """``(model on device, meta)`` from a checkpoint written by ``lenet_xp.train``: the
    network its config names (``--arch``, options), rebuilt and loaded (with the averaged
    weights of a run trained with ``--ema``). ``arch``, if given,
    must be the checkpoint's (else :class:`CheckpointError`, one line)."""
    model_state, optim_state, meta = load_checkpoint(path)
    config = meta.get("config", {})
    saved = config.get("arch", "lenet5")
    if arch is not None and arch != saved:
        raise CheckpointError(f"checkpoint {path} holds --arch {saved}, not --arch {arch}")
    try:
        model = build_from_config(config)
    except PresetError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    try:
        model.load_state_dict(averaged_state(model, model_state, optim_state))  # --ema's
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} does not hold a {saved}: {exc}") from None
    return model.to(device), meta


def run_data_dir(config: dict, data_dir: str | None) -> str | None:
    """The MNIST folder to read for the run a checkpoint's ``config`` describes: ``data_dir``
    if given, else the folder the run was trained on (``config["data_dir"]``) if it is still
    there, else ``None`` (:func:`~lenet_xp.mnist.load_mnist`'s default: ``$LENET_XP_DATA``,
    else the cache)."""
    if data_dir is not None:
        return data_dir
    recorded = config.get("data_dir")
    return recorded if recorded and Path(recorded).is_dir() else None


def test_split(
    meta: dict, device: Any, data_dir: str | None, size: int = 28, mnist: Any = None
) -> DeviceSplit:
    """MNIST's test set on ``device``, prepared as the run in ``meta`` was trained: its
    dtype, and padded to 32x32 for a model of input ``size`` 32. ``mnist``: the data set
    if already loaded (else it is read from :func:`run_data_dir`)."""
    config = meta.get("config", {})
    mnist = load_mnist(run_data_dir(config, data_dir)) if mnist is None else mnist
    dtype = config.get("dtype", "float32")
    return to_device_split(mnist.test_images, mnist.test_labels, device, dtype, size == 32)


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
    p.add_argument("--arch", default=None, help="refuse a checkpoint of another --arch")
    p.add_argument(
        "--data-dir",
        default=None,
        help="MNIST folder (else the run's, else $LENET_XP_DATA, else cache)",
    )
    p.add_argument("--batch-size", type=int, default=2000, help="images per evaluation batch")
    args = p.parse_args(argv)
    if args.batch_size <= 0:
        p.error(f"--batch-size must be positive, got {args.batch_size}")
    try:
        device = get_device(args.device)
        with use_device(device):
            model, meta = load_model(args.checkpoint, device, args.arch)
            test = test_split(meta, device, args.data_dir, model.input_size)
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
