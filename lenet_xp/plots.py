"""``python -m lenet_xp.plots --run OUT``: pictures of a training run (matplotlib).

Writes into ``OUT``: ``curves.png`` (loss and accuracy per epoch, from ``metrics.jsonl``, else
from the run's checkpoint, which holds every epoch's metrics),
``filters.png`` (every conv layer's filters) and ``misclassified.png`` (test digits the model
gets wrong, with true and predicted labels). The HTML report (:mod:`lenet_xp.report`) draws
these and the confusion matrix, feature maps and per-layer statistics with the same functions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lenet_xp.backend import CPU
from lenet_xp.data.mnist import DataError, load_mnist
from lenet_xp.reporting.plots import (
    misclassified,
    plot_curves,
    plot_filters,
    plot_misclassified,
)
from lenet_xp.reporting.report import ReportError, epoch_records
from lenet_xp.storage.checkpoint import CheckpointError
from lenet_xp.training.evaluation import load_model, run_data_dir, test_split


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lenet_xp.plots", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a folder written by lenet_xp.train --out")
    p.add_argument("--checkpoint", default=None, help="default: RUN/best.npz")
    p.add_argument(
        "--metrics",
        default=None,
        help="default: RUN/metrics.jsonl, else the epochs' metrics in RUN's checkpoint",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="MNIST folder (else the run's, else $LENET_XP_DATA, else cache)",
    )
    args = p.parse_args(argv)
    run = Path(args.run)
    try:
        model, meta = load_model(args.checkpoint or str(run / "best.npz"), CPU)
        written = [plot_curves(epoch_records(run, args.metrics, meta), run)]
        written.append(plot_filters(model, run))
        # also the raw pictures, to show them as they are
        mnist = load_mnist(run_data_dir(meta.get("config", {}), args.data_dir))
        test = test_split(meta, CPU, args.data_dir, model.input_size, mnist)
        wrong, predicted = misclassified(model, test)
        written.append(
            plot_misclassified(mnist.test_images, mnist.test_labels, wrong, predicted, run)
        )
    except (CheckpointError, DataError, ReportError, OSError, ValueError) as exc:
        print(f"lenet_xp.plots: error: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
