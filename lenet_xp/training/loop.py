"""The training loop behind ``python -m lenet_xp.train`` and ``fit()``: :func:`train` sets a
run up (:func:`_prepare`, :func:`_open_outputs`), then trains epoch after epoch
(:func:`_train_epochs`, :func:`_epoch`), each with the run's engine (:mod:`.engines`), and
tests, saves and logs after each.

The loop is the same on every device: parameters and the data set are moved once; per batch
there is no host<->device copy and no synchronisation (loss and accuracy are summed on the
device and read once per epoch).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Collection
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lenet_xp.backend import (
    Device,
    get_device,
    host_rng,
    synchronize,
    tune_host_allocator,
    use_device,
)
from lenet_xp.data.augment import parse_augment
from lenet_xp.data.device_split import DeviceSplit
from lenet_xp.data.mnist import resolve_data_dir
from lenet_xp.models import presets
from lenet_xp.optim.optimizers import Optimizer, make_optimizer
from lenet_xp.optim.schedules import make_schedule
from lenet_xp.storage.checkpoint import CheckpointError, load_checkpoint
from lenet_xp.training import logs
from lenet_xp.training.config import TrainConfig
from lenet_xp.training.distributed.comm import World
from lenet_xp.training.distributed.comm import world as mpi_world
from lenet_xp.training.distributed.engine import AgreedStop, RankParallel
from lenet_xp.training.distributed.launch import (
    SilentLog,
    broadcast_state,
    check_launch,
    held_together,
    reader_base,
)
from lenet_xp.training.distributed.nccl import NcclSum
from lenet_xp.training.engines import Engine, LayersEngine, make_engine
from lenet_xp.training.evaluation import run_data_dir
from lenet_xp.training.interrupt import Interrupted, StopSignals
from lenet_xp.training.parallel import WorkerError, in_worker
from lenet_xp.training.resume import (
    EpochPosition,
    Keeper,
    inexact_resume_note,
    initial_meta,
    remove_stale_temps,
    resume_base,
)
from lenet_xp.training.runlock import RunLock
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
class _Run:
    """A run set up: what the epochs need (built by :func:`_prepare`)."""

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


def train(config: TrainConfig, model: Any = None, given: Collection[str] = ()) -> Outcome:
    """Train as ``config`` says (``model``: a network built in Python instead of ``--arch``).
    ``given``: the options the user set (not defaults): with ``--resume``, those of the run's
    configuration must match the checkpoint's, except ``--epochs``
    (:meth:`TrainConfig.resumed`).

    The whole run (data, model, training, evaluation, checkpoints) happens with
    ``--device``'s GPU as CuPy's current device, so ``cuda:N`` means device N throughout.
    """
    if in_worker():
        raise TrainingError(
            "fit() ran in a worker process, which imports your script to rebuild a layer "
            'class defined there: call fit() under `if __name__ == "__main__":`'
        )
    ranks = mpi_world()
    device = get_device(config.device, announce=config.device == "auto" and not config.quiet)
    if ranks is not None:  # checked alike on every rank; rank 0 alone prints and writes
        check_launch(ranks, dataclasses.asdict(config), config.batch_size)
        if device.kind == "cuda":  # one GPU per rank: its local rank's
            device = get_device(f"cuda:{ranks.local_rank}")
        config = dataclasses.replace(config, quiet=config.quiet or not ranks.is_writer)
    if device.kind == "cpu":
        tune_host_allocator()
    with use_device(device), StopSignals() as signals, _run_lock(config.out_dir, ranks):
        run = _prepare(config, device, model, frozenset(given), ranks)
        if isinstance(run, Outcome):
            return run
        _open_outputs(run, signals)
        metrics = _train_epochs(run)
        return Outcome(
            metrics, config.out_dir, run.metrics_path, run.data_dir, device, writes=run.writes
        )


def _run_lock(out: Path, ranks: World | None) -> AbstractContextManager:
    """``--out``'s run lock: held by rank 0 alone in a run over MPI ranks (which all fail
    together if it cannot be had)."""
    if ranks is None:
        return RunLock(out)
    return held_together(ranks, RunLock(out) if ranks.is_writer else nullcontext())


def _prepare(
    config: TrainConfig, device: Device, model: Any, given: frozenset, ranks: World | None = None
) -> _Run | Outcome:
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
    data_dir = run_data_dir(stored, config.data_dir)  # resumed: the run's own, by default
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
    run = _Run(
        config, stored, device, model, optimizer, schedule, splits, data_dir,
        host_rng(config.seed), Best(config.patience, config.epochs), ranks=ranks, given=given,
    )  # fmt: skip
    if state is not None:
        _restore(run, state)
    if ranks is not None:  # every rank starts from rank 0's parameters and optimizer state
        broadcast_state(ranks, model, optimizer)
    return run


def _restore(run: _Run, state: tuple[dict, dict, dict]) -> None:
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


def _open_outputs(run: _Run, signals: StopSignals) -> None:
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


def _train_epochs(run: _Run) -> dict:
    """Train ``run`` from its first epoch to its last (or an early stop): the last epoch's
    metrics. A signal or a failed worker process ends it with one line saying what is kept."""
    config, keeper = run.config, run.keeper
    record: dict = {}
    engine = None
    try:
        engine = _engine(run, keeper)
        for epoch in range(run.start_epoch, config.epochs + 1):
            record, stop = _epoch(run, engine, epoch)
            if stop:
                break
    except Interrupted as exc:  # stopped at once (a second signal, a silent worker): say where
        raise (exc if str(exc) else keeper.interrupted(exc.signum, exc.how)) from None
    except WorkerError as exc:  # and what is kept
        raise WorkerError(f"{exc}; {keeper.saved('the last checkpoint is')}") from None
    finally:
        if engine is not None:
            engine.close()
        run.metrics_file.close()
        run.log.close()
    return record


def _engine(run: _Run, keeper: Keeper) -> Engine:
    """The engine ``--engine`` asks for, as far as it runs here (notes say why not)."""
    config = run.config

    def note(line: str) -> None:
        if not config.quiet:
            print(f"note: {line}", file=sys.stderr)

    workers = run.stored.get("workers", 1) if run.device.kind == "cpu" else 1
    if run.ranks is not None:
        return _rank_engine(run, workers, note)
    engine = make_engine(
        config.engine, run.model, run.optimizer, run.splits[0], config.batch_size,
        run.schedule, total_steps=config.epochs * run.steps_per_epoch, shift=config.shift,
        augment=parse_augment(config.augment), workers=workers,
        max_batch=max(config.batch_size, config.eval_batch_size), position=run.position,
        stop_requested=lambda: keeper.stop.requested, note=note,
    )  # fmt: skip
    if engine.name != "layers" and config.save_every:
        note(
            "--save-every applies to the array-op layers; the fused CUDA step saves at "
            "epoch ends (a signal lets the epoch finish, about a second, then saves)"
        )
    return engine


def _rank_engine(run: _Run, workers: int, note: Any) -> Engine:
    """The layers over MPI ranks: each rank its slice of every batch, one all-reduce a step
    (NCCL's on GPUs, MPI's of a host buffer on CPUs); ``--workers`` splits a rank's slice
    further only when given (the ranks are the processes)."""
    config = run.config
    if config.engine != "layers":
        note(f"--engine {config.engine} does not all-reduce yet: MPI ranks train with the layers")
    run.model.use_cuda_kernels(False)
    run.optimizer.cuda_kernels = False
    if "workers" not in run.given:
        workers = 1
    reduce = NcclSum(run.ranks) if run.device.kind == "cuda" else None  # None: MPI, on the host
    runner = RankParallel(
        run.ranks, run.model, workers, max(config.batch_size, config.eval_batch_size),
        run.signals, run.agreed, reduce,
    )  # fmt: skip
    return LayersEngine(
        runner, run.optimizer, run.schedule, run.splits[0], config.batch_size, config.shift,
        parse_augment(config.augment),
    )  # fmt: skip


def _epoch(run: _Run, engine: Engine, epoch: int) -> tuple[dict, bool]:
    """Train epoch ``epoch``, test, save and log it: ``(its metrics, stop early now)``."""
    config, keeper, (train_split, val, test) = run.config, run.keeper, run.splits
    position = run.position
    lr = run.schedule(run.step - (position.batch if position else 0))  # its first step's
    synchronize(run.device)  # the last epoch's evaluation is not this epoch's time
    if run.ranks is not None:  # a stop asked for during the evaluation: on every rank
        engine.runner.agree_stop(epoch)
    keeper.begin_epoch(epoch, position)  # a stop asked for now stops; starts the clock
    bar = _progress_bar(len(train_split), epoch, config.epochs, config.quiet)
    train_loss, train_acc, run.step = engine.train_epoch(
        run.rng, run.step, bar, epoch, position, keeper, on_step=run.log.after_step
    )
    synchronize(run.device)
    seconds = keeper.epoch_seconds()  # resumed inside the epoch: with the time before
    run.position = None
    if bar is not None:
        bar.close()
    if not math.isfinite(train_loss):
        raise TrainingError(
            f"the training loss became {train_loss} in epoch {epoch}; lower --lr (now "
            f"{config.lr:g}); last good checkpoint: {config.out_dir / 'last.npz'}"
        )
    average = run.optimizer.average
    with average.applied() if average else nullcontext():  # --ema: the average is tested
        test_loss, test_acc, _ = engine.evaluate(test, config.eval_batch_size)
        if val is not None:
            val_loss, val_acc, _ = engine.evaluate(val, config.eval_batch_size)
    record = {
        "epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
        "test_loss": test_loss, "test_acc": test_acc, "lr": lr,
        "train_seconds": seconds, "images_per_second": len(train_split) / seconds,
        "device": str(run.device), "engine": engine.name,
    }  # fmt: skip
    if val is not None:
        record["val_loss"], record["val_acc"] = val_loss, val_acc
    if run.ranks is not None:
        record["ranks"] = run.ranks.size
    stop = _end_epoch(run, record, -train_loss if val is None else val_acc)
    return record, stop


def _end_epoch(run: _Run, record: dict, score: float) -> bool:
    """Save, write and print epoch ``record`` (its ``score`` chooses ``best.npz``): whether
    the run stops early now."""
    config, epoch, out = run.config, record["epoch"], run.config.out_dir
    improved, stop = run.best.update(epoch, score)
    record["best_epoch"] = run.best.epoch
    if stop:
        record["stopped_early"] = True
    meta = {
        "epoch": epoch, "step": run.step, "rng_state": run.rng.bit_generator.state,
        "config": run.stored, "metrics": record, "best_score": run.best.score,
        "best_epoch": run.best.epoch, "history": [*run.keeper.base["history"], record],
    }  # fmt: skip
    also = [out / "best.npz"] if improved else []
    if config.keep_every_epoch:
        also.append(out / f"epoch_{epoch:03d}.npz")
    run.keeper.save_epoch(meta, also)  # then last.npz
    run.metrics_file.write(json.dumps(record) + "\n")
    run.metrics_file.flush()
    run.log.end_epoch(record)  # metrics.csv, stats.jsonl, TensorBoard
    if not config.quiet:
        print(_summary(record, config.epochs), flush=True)
        if stop:
            print(
                f"early stop: val_acc has not improved for {run.best.patience} epochs "
                f"(best: epoch {run.best.epoch}, {out / 'best.npz'})",
                flush=True,
            )
    return stop


def _progress_bar(total: int, epoch: int, epochs: int, quiet: bool) -> Any:
    if quiet:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, desc=f"epoch {epoch}/{epochs}", unit="img", unit_scale=True, leave=False
    )


def _summary(r: dict, epochs: int) -> str:
    val = f"  val_acc {100 * r['val_acc']:.2f}%" if "val_acc" in r else ""
    return (
        f"epoch {r['epoch']:>2}/{epochs}  train_loss {r['train_loss']:.4f}  "
        f"train_acc {100 * r['train_acc']:.2f}%  test_loss {r['test_loss']:.4f}  "
        f"test_acc {100 * r['test_acc']:.2f}%{val}  lr {r['lr']:.2e}  "
        f"{r['train_seconds']:.1f}s  {r['images_per_second']:,.0f} img/s  [{r['device']}]"
    )
