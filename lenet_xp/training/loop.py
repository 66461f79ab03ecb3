"""The training loop behind ``python -m lenet_xp.train`` and ``fit()``: :func:`train` sets a
run up (:mod:`.setup`), then trains epoch after epoch (:func:`_train_epochs`, :func:`_epoch`),
each with the run's engine (:mod:`.engines`), and tests, saves and logs after each.

The loop is the same on every device: parameters and the data set are moved once; per batch
there is no host<->device copy and no synchronisation (loss and accuracy are summed on the
device and read once per epoch).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Collection
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from lenet_xp.backend import get_device, synchronize, tune_host_allocator, use_device
from lenet_xp.data.augment import parse_augment
from lenet_xp.kernels.ops import gpu_kernels
from lenet_xp.training.config import TrainConfig
from lenet_xp.training.distributed.comm import World
from lenet_xp.training.distributed.comm import world as mpi_world
from lenet_xp.training.distributed.engine import RankParallel
from lenet_xp.training.distributed.graph import RankGraphStep
from lenet_xp.training.distributed.launch import check_launch, held_together
from lenet_xp.training.distributed.nccl import NcclSum
from lenet_xp.training.engines import Engine, GraphEngine, LayersEngine, make_engine
from lenet_xp.training.flat import supports as flat_supports
from lenet_xp.training.interrupt import Interrupted, StopSignals
from lenet_xp.training.parallel import WorkerError, in_worker
from lenet_xp.training.resume import Keeper
from lenet_xp.training.runlock import RunLock
from lenet_xp.training.setup import Outcome, Run, TrainingError, open_outputs, prepare


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
        run = prepare(config, device, model, frozenset(given), ranks)
        if isinstance(run, Outcome):
            return run
        open_outputs(run, signals)
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


def _train_epochs(run: Run) -> dict:
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


def _engine(run: Run, keeper: Keeper) -> Engine:
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
    return engine


def _rank_engine(run: Run, workers: int, note: Any) -> Engine:
    """This rank's engine over MPI ranks, each its slice of every batch, one all-reduce a
    step (NCCL's on GPUs, MPI's of a host buffer on CPUs): on GPUs ``--engine graph`` and
    ``kernels`` as :class:`RankGraphStep` runs them, else the layers; ``--workers`` splits a
    rank's slice further only when given (the ranks are the processes)."""
    config, model, optimizer = run.config, run.model, run.optimizer
    model.use_cuda_kernels(False)
    optimizer.cuda_kernels = False
    if "workers" not in run.given:
        workers = 1
    on_gpu = run.device.kind == "cuda"
    reduce = NcclSum(run.ranks) if on_gpu else None  # None: MPI, on the host
    runner = RankParallel(
        run.ranks, model, workers, max(config.batch_size, config.eval_batch_size),
        run.signals, run.agreed, reduce,
    )  # fmt: skip
    augment = parse_augment(config.augment)
    if config.engine != "layers":
        why = (
            flat_supports(optimizer) if on_gpu else f"it applies to CUDA devices, not {run.device}"
        )
        if why is None:
            total = config.epochs * run.steps_per_epoch
            step = RankGraphStep(
                run.ranks, runner.reduce, lambda: run.signals.requested, run.agreed, model,
                optimizer, run.splits[0], config.batch_size,
                [run.schedule(s) for s in range(total)], gpu_kernels(run.device.xp),
                config.shift, augment, captured=config.engine == "graph",
            )  # fmt: skip
            return GraphEngine(runner, step)
        note(f"--engine {config.engine}: the ranks train with the array-op layers: {why}")
    return LayersEngine(
        runner, optimizer, run.schedule, run.splits[0], config.batch_size, config.shift, augment
    )


def _epoch(run: Run, engine: Engine, epoch: int) -> tuple[dict, bool]:
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


def _end_epoch(run: Run, record: dict, score: float) -> bool:
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
