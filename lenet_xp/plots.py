"""``python -m lenet_xp.plots --run OUT``: pictures of a training run (matplotlib).

Writes into ``OUT``: ``curves.png`` (loss and accuracy per epoch, from ``metrics.jsonl``),
``filters.png`` (conv1's six 5x5 filters) and ``misclassified.png`` (test digits the model
gets wrong, with true and predicted labels).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lenet_xp.backend import CPU, asnumpy
from lenet_xp.checkpoint import CheckpointError
from lenet_xp.data import DeviceSplit
from lenet_xp.evaluate import load_model, test_split
from lenet_xp.layers import Module
from lenet_xp.mnist import DataError, load_mnist


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            'lenet_xp.plots: error: needs matplotlib: pip install "lenet_xp[plots]"'
        ) from None
    matplotlib.use("Agg")  # files only, no screen needed
    import matplotlib.pyplot as plt

    return plt


def misclassified(model: Module, split: DeviceSplit, batch_size: int = 2000) -> tuple[Any, Any]:
    """``(indices, predictions)`` (host int arrays) of the images of ``split`` that ``model``
    gets wrong, in order."""
    model.eval()
    predictions = [asnumpy(model.forward(x).argmax(axis=1)) for x, _ in split.batches(batch_size)]
    predicted = CPU.xp.concatenate(predictions)
    wrong = (predicted != asnumpy(split.labels)).nonzero()[0]
    return wrong, predicted[wrong]


def plot_curves(metrics_path: Path, out: Path) -> Path:
    plt = _pyplot()
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in records], "o-", label="train")
    ax_loss.plot(epochs, [r["test_loss"] for r in records], "o-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss")
    ax_acc.plot(epochs, [100 * r["train_acc"] for r in records], "o-", label="train")
    ax_acc.plot(epochs, [100 * r["test_acc"] for r in records], "o-", label="test")
    ax_acc.set(xlabel="epoch", ylabel="%", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, out / "curves.png")


def plot_filters(model: Module, out: Path) -> Path:
    plt = _pyplot()
    weights = asnumpy(model.conv1.weight.data)  # (6, 1, 5, 5)
    fig, axes = plt.subplots(1, len(weights), figsize=(2 * len(weights), 2.2))
    for i, (ax, w) in enumerate(zip(axes, weights, strict=True)):
        ax.imshow(w[0], cmap="RdBu_r", vmin=-abs(w).max(), vmax=abs(w).max())
        ax.set(title=f"conv1 filter {i}", xticks=[], yticks=[])
    return _save(fig, out / "filters.png")


def plot_misclassified(images: Any, labels: Any, wrong: Any, predicted: Any, out: Path) -> Path:
    plt = _pyplot()
    shown = min(len(wrong), 36)
    cols = 9
    rows = max(1, -(-shown // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index, guess in zip(axes.flat, wrong[:shown], predicted[:shown], strict=False):
        ax.imshow(images[index], cmap="gray")
        ax.set_title(f"{labels[index]} -> {guess}", fontsize=9)
    fig.suptitle(f"{len(wrong)} misclassified test digits (true -> predicted)")
    return _save(fig, out / "misclassified.png")


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lenet_xp.plots", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a folder written by lenet_xp.train --out")
    p.add_argument("--checkpoint", default=None, help="default: RUN/best.npz")
    p.add_argument(
        "--data-dir", default=None, help="MNIST folder (else $LENET_XP_DATA, else cache)"
    )
    args = p.parse_args(argv)
    run = Path(args.run)
    try:
        written = []
        if (run / "metrics.jsonl").exists():
            written.append(plot_curves(run / "metrics.jsonl", run))
        model, meta = load_model(args.checkpoint or str(run / "best.npz"), CPU)
        written.append(plot_filters(model, run))
        test = test_split(meta, CPU, args.data_dir, model.input_size)
        wrong, predicted = misclassified(model, test)
        mnist = load_mnist(args.data_dir)  # the raw pictures, to show them as they are
        written.append(
            plot_misclassified(mnist.test_images, mnist.test_labels, wrong, predicted, run)
        )
    except (CheckpointError, DataError, OSError, ValueError) as exc:
        print(f"lenet_xp.plots: error: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
