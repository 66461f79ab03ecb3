"""``python -m lenet_xp.train``: train LeNet-5 on MNIST on the CPU or a CUDA GPU.

The flags are :class:`~lenet_xp.training.config.TrainConfig`'s fields; the loop is
:mod:`lenet_xp.training.loop`, each step run by the engine ``--engine`` names
(:mod:`lenet_xp.training.engines`). From Python: :func:`fit`.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Collection
from typing import Any

from lenet_xp.backend import DeviceError
from lenet_xp.data.augment import parse_augment
from lenet_xp.data.mnist import DataError
from lenet_xp.models import presets
from lenet_xp.reporting import report
from lenet_xp.storage.checkpoint import CheckpointError
from lenet_xp.training import logs
from lenet_xp.training.config import (
    CONFIG_KEYS,
    RECIPES,
    TrainConfig,
    build_parser,
    parse_flags,
)
from lenet_xp.training.engines import train_epoch
from lenet_xp.training.interrupt import exit_message
from lenet_xp.training.loop import TrainingError, train
from lenet_xp.training.parallel import WorkerError
from lenet_xp.training.resume import DivergedError
from lenet_xp.training.runlock import RunLockError

__all__ = [
    "CONFIG_KEYS",
    "RECIPES",
    "TrainConfig",
    "TrainingError",
    "build_parser",
    "fit",
    "main",
    "run",
    "train_epoch",
]


def run(config: TrainConfig, model: Any = None, given: Collection[str] = ()) -> dict:
    """Train as ``config`` says (``model``: a network built in Python instead of ``--arch``)
    and, with ``--report``, write the run's report; returns the last epoch's metrics.
    ``given``: the options the user set (a resumed run may change only ``--epochs``)."""
    if config.report:
        report.require_matplotlib()  # now, not after the training
    outcome = train(config, model, given)
    if config.report and outcome.trained:
        page = report.write_report(
            outcome.out, metrics=outcome.metrics_path, data_dir=outcome.data_dir,
            device=outcome.device,
        )  # fmt: skip
        if not config.quiet:
            print(f"report: {page}", flush=True)
    return outcome.metrics


def fit(model: Any = None, **options: Any) -> dict:
    """Train ``model`` (any :class:`~lenet_xp.layers.Sequential` ending in 10 logits, or
    ``None`` for ``--arch``) through the same loop as the CLI; ``options`` are the CLI's
    flags with underscores (``epochs=3, out="runs/mine", resume="runs/mine/last.npz"``).
    Returns the last epoch's metrics. Bad options raise, as in the CLI, with one line."""
    return run(TrainConfig.from_options(**options), model, given=options)


def main(argv: list[str] | None = None) -> int:
    config, given = parse_flags(argv)
    try:
        parse_augment(config.augment)
    except ValueError as exc:
        build_parser().error(str(exc))
    if config.arch == "list":
        print(presets.listing())
        return 0
    # A diverging run overflows; it is reported once, as a NaN/inf loss, not per operation.
    warnings.filterwarnings("ignore", r"(overflow|invalid value)", RuntimeWarning)
    try:
        run(config, given=given)
    except (
        DataError, DeviceError, CheckpointError, TrainingError, WorkerError, RunLockError,
        DivergedError, report.ReportError, logs.LogError,
    ) as exc:  # fmt: skip
        print(f"lenet_xp.train: error: {exc}", file=sys.stderr)
        return 1
    except presets.PresetError as exc:
        print(f"lenet_xp.train: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print(
            f"lenet_xp.train: error: out of memory at --batch-size {config.batch_size}; "
            f"lower it (e.g. --batch-size {max(1, config.batch_size // 2)})",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:  # e.g. --out or --metrics not writable
        print(f"lenet_xp.train: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # SIGINT or SIGTERM (lenet_xp.training.interrupt)
        message, status = exit_message(exc, config.resume_hint(config.resume))
        print(f"lenet_xp.train: {message}", file=sys.stderr)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
