"""``python -m lenet_xp.evaluate --checkpoint PATH``: test accuracy, loss and confusion matrix.

Evaluation runs in batches (``--batch-size``), so the activations of the whole test set are
never held at once; sums stay on the device and are read once at the end.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lenet_xp.backend import DeviceError, get_device, use_device
from lenet_xp.data.mnist import DataError
from lenet_xp.storage.checkpoint import CheckpointError
from lenet_xp.training.evaluation import evaluate, load_model, run_data_dir, test_split

__all__ = ["evaluate", "format_confusion", "load_model", "main", "run_data_dir", "test_split"]


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
