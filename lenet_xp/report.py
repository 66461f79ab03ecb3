"""``python -m lenet_xp.report RUN``: one HTML page about a training run, readable offline.

Writes ``RUN/report/index.html`` and its pictures beside it (PNG, drawn by
:mod:`lenet_xp.plots`): the run's configuration and final figures; loss and accuracy curves
(train, validation, test); the confusion matrix; the most confidently wrong test digits; every
conv layer's filters; the feature maps of one test digit through every layer; and the per-layer
statistics recorded during training (``RUN/stats.jsonl``, :mod:`lenet_xp.training.stats`).
The pictures of the model are of ``RUN/best.npz`` (``--checkpoint`` to choose another) on the
run's test set. ``train --report`` writes it at the end of training.
"""

from __future__ import annotations

import argparse
import sys

from lenet_xp.backend import DeviceError
from lenet_xp.data.mnist import DataError
from lenet_xp.reporting.report import ReportError, require_matplotlib, write_report
from lenet_xp.storage.checkpoint import CheckpointError

__all__ = ["ReportError", "main", "require_matplotlib", "write_report"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lenet_xp.report", description=__doc__.split("\n")[0]
    )
    p.add_argument("run", help="a folder written by lenet_xp.train --out")
    p.add_argument("--checkpoint", default=None, help="the model to draw (default: RUN/best.npz)")
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
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--digit", type=int, default=0, help="test image whose feature maps to draw")
    args = p.parse_args(argv)
    try:
        page = write_report(
            args.run, checkpoint=args.checkpoint, metrics=args.metrics, data_dir=args.data_dir,
            device=args.device, digit=args.digit,
        )  # fmt: skip
    except (ReportError, CheckpointError, DataError, DeviceError, OSError, ValueError) as exc:
        print(f"lenet_xp.report: error: {exc}", file=sys.stderr)
        return 1
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
