"""``python -m lenet_xp.train``: train LeNet-5 on MNIST on the CPU or a CUDA GPU.

The flags are :class:`~lenet_xp.training.config.TrainConfig`'s fields; the loop is
:mod:`lenet_xp.training.loop`, each step run by the engine ``--engine`` names
(:mod:`lenet_xp.training.engines`). From Python: :func:`fit`.
"""

from __future__ import annotations

import sys
import traceback
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
from lenet_xp.training.distributed.comm import DistributedError, World
from lenet_xp.training.distributed.comm import world as mpi_world
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
    if config.report and outcome.trained and outcome.writes:
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
    # Over MPI ranks (mpiexec -n N): rank 0 speaks for the ranks; each rank's end waits
    # (bounded) for the others', so one that failed alone ends the job instead of hanging it.
    try:
        ranks = mpi_world()
    except DistributedError as exc:
        print(f"lenet_xp.train: error: {exc}", file=sys.stderr)
        return 1
    if ranks is None:
        return _main(config, given, ranks)
    try:
        status = _main(config, given, ranks)
    except BaseException:  # a bug on one rank: say it, and end every rank (none is left waiting)
        traceback.print_exc()
        ranks.abort(1)
        return 1  # Abort ends this process too, but not always at once
    ranks.finish(status)
    return status


def _main(config: TrainConfig, given: Collection[str], ranks: World | None) -> int:
    """:func:`main` once the flags are parsed: train, and turn the errors into one line and
    an exit status (said by rank 0 alone for the errors all ranks meet together)."""
    prog, alone = "lenet_xp.train", ranks is None or ranks.is_writer
    if not alone:
        prog += f" (rank {ranks.rank} of {ranks.size})"
    try:
        run(config, given=given)
    except (
        DataError, DeviceError, CheckpointError, TrainingError, WorkerError, RunLockError,
        DivergedError, report.ReportError, logs.LogError, DistributedError,
    ) as exc:  # fmt: skip
        if alone or not isinstance(exc, DistributedError):
            print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except presets.PresetError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print(
            f"{prog}: error: out of memory at --batch-size {config.batch_size}; "
            f"lower it (e.g. --batch-size {max(1, config.batch_size // 2)})",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:  # e.g. --out or --metrics not writable
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # SIGINT or SIGTERM (lenet_xp.training.interrupt)
        message, status = exit_message(exc, config.resume_hint(config.resume))
        if alone:
            print(f"{prog}: {message}", file=sys.stderr)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
