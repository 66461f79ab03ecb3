"""Setting a run up for :mod:`.loop`: its configuration (a resumed checkpoint's), model, data,
optimizer, schedule and generator (:func:`prepare`), restored from ``--resume``, and its
outputs (:func:`open_outputs`: ``metrics.jsonl``, the logs, the keeper of checkpoints).
:class:`Run` is what the epochs need; :class:`Best` tracks the best epoch."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lenet_xp.backend import Device, host_rng
from lenet_xp.data.device_split import DeviceSplit
from lenet_xp.data.mnist import resolve_data_dir
from lenet_xp.models import presets
from lenet_xp.optim.optimizers import Optimizer, make_optimizer
from lenet_xp.optim.schedules import make_schedule
from lenet_xp.storage.checkpoint import CheckpointError, load_checkpoint
from lenet_xp.training import logs
from lenet_xp.training.config import TrainConfig
from lenet_xp.training.distributed.comm import World
from lenet_xp.training.distributed.engine import AgreedStop
from lenet_xp.training.distributed.launch import SilentLog, broadcast_state, reader_base
from lenet_xp.training.evaluation import run_data_dir
from lenet_xp.training.interrupt import StopSignals
from lenet_xp.training.resume import (
    EpochPosition,
    Keeper,
    inexact_resume_note,
    initial_meta,
    remove_stale_temps,
    resume_base,
)
from lenet_xp.training.splits import load_splits


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss became NaN); the message says what to change."""


@dataclass
class Best:
    """The best epoch so far by its score (validation accuracy, else minus the training
    loss), and early stopping: no improvement for ``patience`` epochs (``None``: never)."""

    patience: int | None
    epochs: int
    score: float = -math.inf
    epoch: int = 0

    def update(self, epoch: int, score: float) -> tuple[bool, bool]:
        """Epoch ``epoch`` scored ``score``: ``(it is the best so far, stop early now)``."""
        improved = score > self.score
        if improved:
            self.score, self.epoch = score, epoch
        waited = epoch - self.epoch
        return improved, bool(self.patience) and waited >= self.patience and epoch < self.epochs


@dataclass
class Outcome:
    """What :func:`train` did: the last epoch's ``metrics``, where the run wrote
    (``out``, ``metrics_path``), the MNIST folder it read (``data_dir``, ``None``: the
    default) and its ``device``; ``trained`` is false for a finished run resumed."""

    metrics: dict
    out: Path
    metrics_path: Path
    data_dir: str | None
    device: Device
    trained: bool = True
    writes: bool = True  # False: a rank above 0 of a run over MPI ranks (rank 0 writes)


@dataclass
class Run:
    """A run set up: what the epochs need (built by :func:`prepare`)."""

    config: TrainConfig
    stored: dict  # the configuration as checkpoints keep it (with the resolved data_dir)
    device: Device
    model: Any
    optimizer: Optimizer
    schedule: Any
    splits: tuple[DeviceSplit, DeviceSplit | None, DeviceSplit]  # train, val or None, test
    data_dir: str | None
    rng: Any
    best: Best
    start_epoch: int = 1
    step: int = 0
    position: EpochPosition | None = None
    resumed: dict | None = None  # the checkpoint's meta, when resuming
    keeper: Keeper | None = None
    log: Any = None
    metrics_file: Any = None
    metrics_path: Path = field(default_factory=Path)
    ranks: World | None = None  # the MPI ranks this process is one of (None: it trains alone)
    agreed: AgreedStop | None = None  # over ranks: the stop they all act on
    signals: StopSignals | None = None  # this process's SIGINT/SIGTERM
    given: frozenset = frozenset()  # the options the user set

    @property
    def writes(self) -> bool:
        """Whether this process writes checkpoints, metrics and logs (rank 0 alone does)."""
        return self.ranks is None or self.ranks.is_writer

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.splits[0]) / self.config.batch_size)


def prepare(
    config: TrainConfig, device: Device, model: Any, given: frozenset, ranks: World | None = None
) -> Run | Outcome:
    """The run set up: its configuration (a resumed checkpoint's), model, data, optimizer,
    schedule and generator, restored from ``--resume``; an :class:`Outcome` if a resumed
    run has nothing left to train."""
    state = None
    if config.resume:
        state = load_checkpoint(config.resume)
        saved = state[2]["config"]
        config = config.resumed(saved, given)
        if why := _nothing_left(state[2], config):
            print(
                f"lenet_xp.train: nothing to train: {config.resume} is a finished run ({why}); "
                "to train more, resume with a larger --epochs",
                file=sys.stderr,
            )
            path = Path(config.metrics) if config.metrics else config.out_dir / "metrics.jsonl"
            metrics = state[2].get("metrics", {})
            return Outcome(metrics, config.out_dir, path, None, device, trained=False)
    stored = {**(saved if state else {}), **config.kept()}
    if model is not None:
        stored["arch"] = "custom"  # built in Python: the CLIs cannot rebuild it
    model = presets.build_from_config(stored) if model is None else model
    writes = ranks is None or ranks.is_writer  # rank 0 speaks for the ranks
    data_dir = run_data_dir(stored, config.data_dir, writes)  # resumed: its own, by default
    stored["data_dir"] = str(resolve_data_dir(data_dir).resolve())  # for evaluate, report
    splits = load_splits(config, data_dir, device, model.input_size)
    if config.patience and splits[1] is None:
        raise TrainingError("--patience needs a validation split: drop --val-size 0")
    model.to(device)
    if not config.quiet:
        print(model.summary(config.batch_size), flush=True)
    optimizer = make_optimizer(
        config.optimizer, model.parameters(), config.lr, config.weight_decay, config.momentum,
        config.ema,
    )  # fmt: skip
    steps_per_epoch = math.ceil(len(splits[0]) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    schedule = make_schedule(config.schedule, config.lr, total_steps, steps_per_epoch)
    run = Run(
        config, stored, device, model, optimizer, schedule, splits, data_dir,
        host_rng(config.seed), Best(config.patience, config.epochs), ranks=ranks, given=given,
    )  # fmt: skip
    if state is not None:
        _restore(run, state)
    if ranks is not None:  # every rank starts from rank 0's parameters and optimizer state
        broadcast_state(ranks, model, optimizer)
    return run


def _restore(run: Run, state: tuple[dict, dict, dict]) -> None:
    """Load a checkpoint's ``state`` (model, optimizer, meta) into ``run``: its weights,
    optimizer, generator, best epoch and where it stopped; :class:`CheckpointError` (one
    line) if it does not fit."""
    model_state, optim_state, meta = state
    path = run.config.resume
    try:
        run.model.load_state_dict(model_state)
        run.optimizer.load_state_dict(optim_state)
        run.rng.bit_generator.state = meta["rng_state"]
        score = meta["best_score"]
        run.best.score = -math.inf if score is None else score  # None: stopped inside epoch 1
        run.best.epoch = meta.get("best_epoch", 0)
        run.start_epoch, run.step = meta["epoch"] + 1, meta["step"]
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} does not fit: {exc}") from None
    run.position = EpochPosition.from_meta(meta, run.steps_per_epoch, path)
    run.resumed = meta
    if not run.config.quiet and (note := inexact_resume_note(run.stored)):
        print(f"note: {note}", file=sys.stderr)
    if not run.config.quiet and run.config.epochs != meta["config"]["epochs"]:
        line = _replanned(meta, run.stored, run.step, run.schedule(run.step))
        print(f"note: {line}", file=sys.stderr)
    before, now = meta["config"].get("workers", 1), run.stored.get("workers", 1)
    if not run.config.quiet and run.device.kind == "cpu" and before != now:
        print(
            f"note: --workers {now} (the checkpoint's run used {before}): the same weights and "
            "optimizer state go on, but each step's gradient is now summed in another order, "
            "so from here the metrics equal an uninterrupted run's to rounding, not bit for bit",
            file=sys.stderr,
        )


def _nothing_left(meta: dict, config: TrainConfig) -> str | None:
    """Why a run resumed from a checkpoint of ``meta`` under ``config`` has nothing to train
    (``None``: it has)."""
    done, planned = meta.get("epoch", 0), config.epochs
    if done >= planned:
        return f"it ended after epoch {done} of --epochs {planned}"
    if meta.get("metrics", {}).get("stopped_early") and planned == meta["config"]["epochs"]:
        return f"it stopped early after epoch {done}, by --patience {config.patience}"
    return None


def _replanned(meta: dict, config: dict, step: int, lr: float) -> str:
    """The line that says a resumed run's ``--epochs`` changed, and what becomes of the
    learning-rate schedule (now at ``step``, ``lr``)."""
    before, after = meta["config"]["epochs"], config["epochs"]
    return (
        f"--epochs {after} (the checkpoint's run planned {before}, {meta['epoch']} done): "
        f"the {config['schedule']} learning-rate schedule is planned over {after} epochs, as if "
        f"the run had asked for them from the start; it goes on from step {step} at lr {lr:.2e}"
    )


def open_outputs(run: Run, signals: StopSignals) -> None:
    """``metrics.jsonl`` (appended to when resuming), the other logs, and the keeper of
    checkpoints (epoch ends, ``--save-every``, stop requests from ``signals``)."""
    config, out, writes = run.config, run.config.out_dir, run.writes
    run.metrics_path = Path(config.metrics) if config.metrics else out / "metrics.jsonl"
    if writes:
        run.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        run.log = logs.RunLog(
            run.model,
            run.metrics_path,
            out,
            config.stats_every,
            config.tensorboard,
            run.start_epoch,
            run.step,
        )  # fmt: skip  (metrics.csv, stats.jsonl, TensorBoard)
        remove_stale_temps(out, run.metrics_path)  # a killed run's; this run holds the lock
    else:
        run.log = SilentLog()
    if run.resumed:  # metrics.jsonl as the checkpoint has it, whenever the last run stopped
        base = resume_base(run.resumed, run.metrics_path) if writes else reader_base(run.resumed)
        base["config"] = run.stored  # its mid-epoch checkpoints keep a changed --epochs too
    else:
        base = initial_meta(run.stored, run.rng.bit_generator.state)
    metrics_target = run.metrics_path if writes else os.devnull
    run.metrics_file = open(metrics_target, "a" if run.resumed else "w")  # noqa: SIM115
    run.agreed = AgreedStop() if run.ranks is not None else None
    run.keeper = Keeper(
        out, run.model, run.optimizer, run.agreed or signals, base, run.device.kind,
        config.save_every, run.steps_per_epoch, hint=config.resume_hint,
        latest=Path(config.resume) if config.resume else None, writes=writes,
    )  # fmt: skip
    run.signals = signals
