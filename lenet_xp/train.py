"""``python -m lenet_xp.train``: train LeNet-5 on MNIST on the CPU or a CUDA GPU.

The loop is the same on every device: parameters and the data set are moved once by
``--device``; per batch there is no host<->device copy and no synchronisation (loss and
accuracy are summed on the device and read once per epoch).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
import warnings
from collections.abc import Collection
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lenet_xp import fused as fused_step
from lenet_xp import kernels, presets, report, tblog
from lenet_xp.augment import Augment, Distortion, parse_augment
from lenet_xp.backend import (
    Device,
    DeviceError,
    get_device,
    host_rng,
    synchronize,
    tune_host_allocator,
    use_device,
)
from lenet_xp.checkpoint import CheckpointError, load_checkpoint
from lenet_xp.data import DeviceSplit, permutation, random_shifts, to_device_split
from lenet_xp.distributed.comm import DistributedError, World
from lenet_xp.distributed.comm import world as mpi_world
from lenet_xp.distributed.engine import AgreedStop, RankParallel
from lenet_xp.distributed.launch import (
    SilentLog,
    broadcast_state,
    check_launch,
    held_together,
    reader_base,
)
from lenet_xp.distributed.nccl import NcclSum
from lenet_xp.evaluate import evaluate, run_data_dir
from lenet_xp.interrupt import Interrupted, StopSignals, exit_message
from lenet_xp.mnist import MEAN, STD, DataError, load_mnist, resolve_data_dir
from lenet_xp.optim import Optimizer, make_optimizer
from lenet_xp.parallel import DataParallel, WorkerError, in_worker
from lenet_xp.resume import (
    DivergedError,
    EpochPosition,
    Keeper,
    inexact_resume_note,
    initial_meta,
    remove_stale_temps,
    resolve_out,
    resume_base,
    resume_hint,
)
from lenet_xp.runlock import RunLock, RunLockError
from lenet_xp.schedules import make_schedule
from lenet_xp.train_args import CONFIG_KEYS, RECIPES, build_parser


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss became NaN); the message says what to change."""


def _load_splits(config: dict, data_dir: str | None, device: Device, quiet: bool, size: int):
    """``(train, val or None, test)`` splits on ``device``; ``val`` is the end of the
    training set when ``config["val_size"]`` asks for one."""

    def on_device(images: Any, labels: Any) -> DeviceSplit:
        return to_device_split(images, labels, device, config["dtype"], size == 32)

    mnist = load_mnist(data_dir, progress=not quiet)
    n_train = config["limit_train"] or len(mnist.train_labels)
    n_test = config["limit_test"] or len(mnist.test_labels)
    train_x, train_y = mnist.train_images[:n_train], mnist.train_labels[:n_train]
    test = on_device(mnist.test_images[:n_test], mnist.test_labels[:n_test])
    n_val = config["val_size"]
    if n_val is None:  # the default: the last twelfth (5,000 of 60,000)
        n_val = len(train_y) // 12
    if not n_val:
        return on_device(train_x, train_y), None, test
    if not 0 < n_val < len(train_y):
        raise DataError(f"--val-size {n_val} must be between 1 and {len(train_y) - 1}")
    val = on_device(train_x[-n_val:], train_y[-n_val:])
    return on_device(train_x[:-n_val], train_y[:-n_val]), val, test


def train_epoch(
    runner: DataParallel,
    optimizer: Optimizer,
    schedule: Any,
    split: DeviceSplit,
    batch_size: int,
    rng: Any,
    step: int,
    bar: Any,
    max_shift: int = 0,
    augment: Any = None,
    epoch: int = 0,
    on_step: Any = None,
    position: EpochPosition | None = None,
    keeper: Keeper | None = None,
) -> tuple[float, float, int]:
    """One pass in a fresh random order, images randomly translated by up to ``max_shift``
    pixels and distorted as ``augment`` (an :class:`~lenet_xp.augment.Augment`; its draws
    depend on the run's seed, the ``epoch`` and each image, not on the device); ``on_step()``
    after each optimizer step, if given. ``position``: resume this epoch there (``rng`` as
    at the epoch's start); ``keeper.on_step`` after each step (mid-epoch checkpoints, stop
    requests, divergence). Returns ``(mean loss, accuracy, global step)``."""
    xp = split.device.xp
    runner.train()
    loss_sum = xp.zeros((), dtype=xp.float64)
    correct = xp.zeros((), dtype=xp.int64)
    done = position.batch if position is not None else 0
    if position is not None:  # the sums of the batches done before the run stopped
        loss_sum += position.loss_sum
        correct += position.correct
        if bar is not None:
            bar.update(min(done * batch_size, len(split)))
    order = permutation(len(split), rng, split.device)
    shifts = random_shifts(len(split), max_shift, rng, split.device) if max_shift else None
    distortion, ids, next_ids = None, None, None
    if augment is not None and not augment.is_identity:
        seed = int(rng.integers(2**62))  # from the run's generator: resumable, device-free
        distortion = Distortion(augment, seed, epoch, -MEAN / STD)
    batches = split.batches(batch_size, order, shifts, max_shift, skip=done)
    for batch, (x, y) in enumerate(batches, done + 1):
        optimizer.lr = schedule(step)
        if distortion is not None:  # the images' indices: what their random draws depend on
            ids = order[(batch - 1) * batch_size : batch * batch_size]
            next_ids = order[batch * batch_size : (batch + 1) * batch_size]
        loss, n_correct = runner.forward_backward(x, y, distortion, ids, next_ids)
        optimizer.step()
        if on_step is not None:
            on_step()
        step += 1
        loss_sum += loss * y.shape[0]
        correct += n_correct
        if bar is not None:
            bar.update(int(y.shape[0]))
            if split.device.kind == "cpu" and step % 20 == 0:  # free on the CPU; a sync on a GPU
                bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
        if keeper is not None:
            keeper.on_step(step, batch, loss_sum, correct)
    n = len(split)
    return float(loss_sum) / n, int(correct) / n, step


def _progress_bar(total: int, epoch: int, epochs: int, quiet: bool) -> Any:
    if quiet:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, desc=f"epoch {epoch}/{epochs}", unit="img", unit_scale=True, leave=False
    )


def run(args: argparse.Namespace, model: Any = None, given: Collection[str] = ()) -> dict:
    """Train as ``args`` says (``model``: a network built in Python instead of ``--arch``);
    returns the last epoch's metrics. ``given``: the options the user set (not defaults):
    with ``--resume``, those of the run's configuration must match the checkpoint's, except
    ``--epochs`` (:func:`_resumed_config`).

    The whole run (data, model, training, evaluation, checkpoints) happens with
    ``--device``'s GPU as CuPy's current device, so ``cuda:N`` means device N throughout.
    """
    if in_worker():
        raise TrainingError(
            "fit() ran in a worker process, which imports your script to rebuild a layer "
            'class defined there: call fit() under `if __name__ == "__main__":`'
        )
    world = mpi_world()
    device = get_device(args.device, announce=args.device == "auto" and not args.quiet)
    if device.kind == "cpu":
        tune_host_allocator()
    # -- distributed (issue 22): one of N MPI ranks; rank 0 alone writes (and locks --out)
    if world is not None:
        check_launch(world, vars(args), args.batch_size)
        if device.kind == "cuda":  # one GPU per rank: its local rank's
            device = get_device(f"cuda:{world.local_rank}")
        args.quiet = args.quiet or not world.is_writer
    out = resolve_out(args)  # on every rank: their messages and checkpoints name it
    # -- end distributed
    enabled = kernels.enabled()
    try:
        with (
            use_device(device),
            StopSignals() as signals,
            _run_lock(out, world),
        ):
            return _run(args, device, model, signals, frozenset(given), world)
    finally:
        kernels.set_enabled(enabled)  # --cuda-kernels holds for this run only


def _run_lock(out: Path, world: World | None) -> Any:
    """``--out``'s run lock: held by rank 0 alone in a run over MPI ranks (which all fail
    together if it cannot be had)."""
    if world is None:
        return RunLock(out)
    return held_together(world, RunLock(out) if world.is_writer else nullcontext())


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


def _restore(
    state: tuple[dict, dict, dict], path: str, model: Any, optimizer: Any, rng: Any, best: Best
) -> tuple[int, int]:
    """Load a checkpoint's ``state`` (model, optimizer, meta) into the run, and its best epoch
    into ``best``: ``(first epoch, global step)``; :class:`CheckpointError` (one line) if it
    does not fit."""
    model_state, optim_state, meta = state
    try:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        rng.bit_generator.state = meta["rng_state"]
        score = meta["best_score"]
        best.score = -math.inf if score is None else score  # None: stopped inside epoch 1
        best.epoch = meta.get("best_epoch", 0)
        return meta["epoch"] + 1, meta["step"]
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} does not fit: {exc}") from None


def _resumed_config(saved: dict, args: argparse.Namespace, given: frozenset[str]) -> dict:
    """The configuration of a run resumed from a checkpoint of ``saved``'s: ``saved``, with
    ``--epochs`` if given (the schedule is then planned over the new total, as if the run had
    asked for it from the start); :class:`CheckpointError` (one line) for another option of
    the configuration given with another value than the checkpoint's."""
    for key in CONFIG_KEYS:
        if key != "epochs" and key in given and key in saved and getattr(args, key) != saved[key]:
            flag = "--" + key.replace("_", "-")
            raise CheckpointError(
                f"checkpoint {args.resume} holds {flag} {saved[key]}, not {flag} "
                f"{getattr(args, key)}: a resumed run keeps its configuration (only --epochs may "
                f"change); drop {flag}, or start a new run in another --out"
            )
    return {**saved, "epochs": args.epochs} if "epochs" in given else saved


def _nothing_left(meta: dict, config: dict) -> str | None:
    """Why a run resumed from a checkpoint of ``meta`` under ``config`` has nothing to train
    (``None``: it has)."""
    done, planned = meta.get("epoch", 0), config["epochs"]
    if done >= planned:
        return f"it ended after epoch {done} of --epochs {planned}"
    if meta.get("metrics", {}).get("stopped_early") and planned == meta["config"]["epochs"]:
        return f"it stopped early after epoch {done}, by --patience {config.get('patience')}"
    return None


def _run(
    args: argparse.Namespace, device: Device, model: Any, signals: StopSignals, given: frozenset,
    world: World | None = None,
) -> dict:  # fmt: skip
    """:func:`run` on the resolved ``device``, inside :func:`use_device`, holding ``--out``'s
    lock; ``signals``: the SIGINT/SIGTERM handlers; ``given``: the options set by the user;
    ``world``: the MPI ranks this process is one of (``None``: it trains alone)."""
    config = {key: getattr(args, key) for key in CONFIG_KEYS}
    if model is not None:
        config["arch"] = "custom"  # built in Python: the CLIs cannot rebuild it
    resume_state = None
    if args.resume:
        model_state, optim_state, meta = load_checkpoint(args.resume)
        config = _resumed_config(meta["config"], args, given)
        if why := _nothing_left(meta, config):
            print(
                f"lenet_xp.train: nothing to train: {args.resume} is a finished run ({why}); "
                "to train more, resume with a larger --epochs",
                file=sys.stderr,
            )
            return meta.get("metrics", {})
        resume_state = (model_state, optim_state, meta)
    model = presets.build_from_config(config) if model is None else model
    data_dir = run_data_dir(config, args.data_dir)  # resumed: the run's own, by default
    config["data_dir"] = str(resolve_data_dir(data_dir).resolve())  # for evaluate, report
    train, val, test = _load_splits(config, data_dir, device, args.quiet, model.input_size)
    if config.get("patience") and val is None:
        raise TrainingError("--patience needs a validation split: drop --val-size 0")
    model.to(device)
    if not args.quiet:
        print(model.summary(config["batch_size"]), flush=True)
    optimizer = make_optimizer(
        config["optimizer"],
        model.parameters(),
        config["lr"],
        config["weight_decay"],
        config["momentum"],
        config.get("ema"),
    )
    steps_per_epoch = math.ceil(len(train) / config["batch_size"])
    schedule = make_schedule(
        config["schedule"], config["lr"], config["epochs"] * steps_per_epoch, steps_per_epoch
    )
    rng = host_rng(config["seed"])
    start_epoch, step, best = 1, 0, Best(config.get("patience"), config["epochs"])
    if resume_state:
        start_epoch, step = _restore(resume_state, args.resume, model, optimizer, rng, best)
    writer = world is None or world.is_writer  # distributed (issue 22): rank 0 alone writes
    if world is not None:
        broadcast_state(world, model, optimizer)
    position = EpochPosition.from_meta(meta, steps_per_epoch, args.resume) if resume_state else None
    if resume_state and not args.quiet and (note := inexact_resume_note(config)):
        print(f"note: {note}", file=sys.stderr)
    if resume_state and not args.quiet and config["epochs"] != meta["config"]["epochs"]:
        print(f"note: {_replanned(meta, config, step, schedule(step))}", file=sys.stderr)

    out = Path(args.out)
    metrics_path = Path(args.metrics) if args.metrics else out / "metrics.jsonl"
    if writer:
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
    if args.report:
        report.require_matplotlib()  # now, not after the training
    log = (
        tblog.RunLog(
            model, metrics_path, out, args.stats_every, args.tensorboard, start_epoch, step
        )  # metrics.csv, stats.jsonl, TensorBoard
        if writer
        else SilentLog()
    )
    if writer:
        remove_stale_temps(out, metrics_path)  # a killed run's; this run holds the lock
    if resume_state:  # metrics.jsonl as the checkpoint has it, whenever the last run stopped
        meta = resume_state[2]
        base = resume_base(meta, metrics_path) if writer else reader_base(meta)
        base["config"] = config  # its mid-epoch checkpoints keep a changed --epochs too
    else:
        base = initial_meta(config, rng.bit_generator.state)
    metrics_file = open(  # noqa: SIM115
        metrics_path if writer else os.devnull, "a" if resume_state else "w"
    )
    agreed = AgreedStop() if world is not None else None  # the stop all ranks act on
    keeper = Keeper(
        out, model, optimizer, agreed or signals, base, device.kind, args.save_every,
        steps_per_epoch, hint=lambda checkpoint: resume_hint(args, checkpoint),
        latest=Path(args.resume) if args.resume else None, writes=writer,
    )  # fmt: skip
    workers = config.get("workers", 1) if device.kind == "cpu" else 1
    if world is not None and "workers" not in given:
        workers = 1  # the ranks are the processes; --workers splits a rank's slice further
    max_batch = max(config["batch_size"], args.eval_batch_size)
    total_steps = config["epochs"] * steps_per_epoch
    augment = parse_augment(config.get("augment", "none"))
    record: dict = {}
    runner = None
    try:
        if world is not None:
            reduce = NcclSum(world) if device.kind == "cuda" else None  # else MPI, host
            runner = RankParallel(world, model, workers, max_batch, signals, agreed, reduce)
        else:
            runner = DataParallel(
                model, workers, max_batch=max_batch, stop_requested=lambda: signals.requested
            )
        fused, engine = (
            _engine(
                args, device, model, optimizer, train, config, schedule, total_steps, augment,
                position,
            )
            if world is None  # the fused CUDA step does not all-reduce yet: ranks use layers
            else (None, "layers")
        )  # fmt: skip
        for epoch in range(start_epoch, config["epochs"] + 1):
            lr = schedule(step - (position.batch if position else 0))  # the epoch's first step's
            synchronize(device)  # the last epoch's evaluation is not this epoch's time
            if world is not None:  # a stop asked for during the evaluation: on every rank
                runner.agree_stop(epoch)
            keeper.begin_epoch(epoch, position)  # a stop asked for now stops; starts the clock
            bar = _progress_bar(len(train), epoch, config["epochs"], args.quiet)
            if fused is not None:
                train_loss, train_acc, step = fused_step.train_epoch_fused(fused, rng, bar)
            else:
                train_loss, train_acc, step = train_epoch(
                    runner,
                    optimizer,
                    schedule,
                    train,
                    config["batch_size"],
                    rng,
                    step,
                    bar,
                    config.get("shift", 0),
                    augment,
                    epoch,
                    on_step=log.after_step,
                    position=position,
                    keeper=keeper,
                )
            synchronize(device)
            seconds = keeper.epoch_seconds()  # resumed inside the epoch: with the time before
            position = None
            if bar is not None:
                bar.close()
            if not math.isfinite(train_loss):
                raise TrainingError(
                    f"the training loss became {train_loss} in epoch {epoch}; lower --lr "
                    f"(now {config['lr']:g}); last good checkpoint: "
                    f"{out / 'last.npz'}"
                )
            tested = optimizer.average.applied() if optimizer.average else nullcontext()
            with tested:  # --ema: the averaged weights are the network tested (and kept)
                test_loss, test_acc, _ = evaluate(runner, test, args.eval_batch_size)
                val_loss, val_acc, _ = (
                    evaluate(runner, val, args.eval_batch_size) if val is not None else (None,) * 3
                )
            record = {
                "epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                "test_loss": test_loss, "test_acc": test_acc, "lr": lr,
                "train_seconds": seconds, "images_per_second": len(train) / seconds,
                "device": str(device), "engine": engine,
            }  # fmt: skip
            if val is not None:
                record["val_loss"], record["val_acc"] = val_loss, val_acc
            if world is not None:
                record["ranks"] = world.size
            improved, stop = best.update(
                epoch, record["val_acc"] if val is not None else -train_loss
            )
            record["best_epoch"] = best.epoch
            if stop:
                record["stopped_early"] = True
            meta = {
                "epoch": epoch, "step": step, "rng_state": rng.bit_generator.state,
                "config": config, "metrics": record, "best_score": best.score,
                "best_epoch": best.epoch, "history": [*keeper.base["history"], record],
            }  # fmt: skip
            also = [out / "best.npz"] if improved else []
            if args.keep_every_epoch:
                also.append(out / f"epoch_{epoch:03d}.npz")
            keeper.save_epoch(meta, also)  # then last.npz
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            log.end_epoch(record)  # metrics.csv, stats.jsonl, TensorBoard
            if not args.quiet:
                print(_summary(record, config["epochs"]), flush=True)
            if stop:
                if not args.quiet:
                    print(
                        f"early stop: val_acc has not improved for {best.patience} epochs "
                        f"(best: epoch {best.epoch}, {out / 'best.npz'})",
                        flush=True,
                    )
                break
    except Interrupted as exc:  # stopped at once (a second signal, a silent worker): say where
        raise (exc if str(exc) else keeper.interrupted(exc.signum, exc.how)) from None
    except WorkerError as exc:  # and what is kept
        raise WorkerError(f"{exc}; {keeper.saved('the last checkpoint is')}") from None
    finally:
        if runner is not None:
            runner.close()
        metrics_file.close()
        log.close()
    if args.report and writer:
        page = report.write_report(out, metrics=metrics_path, data_dir=data_dir, device=device)
        if not args.quiet:
            print(f"report: {page}", flush=True)
    return record


def _replanned(meta: dict, config: dict, step: int, lr: float) -> str:
    """The line that says a resumed run's ``--epochs`` changed, and what becomes of the
    learning-rate schedule (now at ``step``, ``lr``)."""
    before, after = meta["config"]["epochs"], config["epochs"]
    return (
        f"--epochs {after} (the checkpoint's run planned {before}, {meta['epoch']} done): "
        f"the {config['schedule']} learning-rate schedule is planned over {after} epochs, as if "
        f"the run had asked for them from the start; it goes on from step {step} at lr {lr:.2e}"
    )


def _engine(
    args: argparse.Namespace, device: Device, model: Any, optimizer: Any, train: DeviceSplit,
    config: dict, schedule: Any, total_steps: int, augment: Augment, position: Any = None,
) -> tuple[Any, str]:  # fmt: skip
    """``(fused step or None, engine name)``: ``"layers"`` (array ops), ``"kernels"`` (our
    fused step) or ``"graph"`` (that step as a CUDA graph), as the flags ask and allow.
    The fused step starts and saves at epoch boundaries only: resuming mid-epoch
    (``position``) takes the layers, and ``--save-every`` is noted as not applying."""
    wanted = args.cuda_graph or args.cuda_kernels
    kernels.set_enabled(wanted and device.kind == "cuda")
    if not wanted or device.kind != "cuda":
        if wanted and args.cuda_graph and not args.quiet:
            print(
                f"note: --cuda-graph applies to CUDA devices; training on {device}", file=sys.stderr
            )
        return None, "layers"
    if not augment.is_identity or position is not None:
        if not args.quiet:
            why = "--augment runs there" if position is None else "resuming inside an epoch"
            print(f"note: training with the array-op layers: {why}", file=sys.stderr)
        return None, "layers"
    lr_of_step = [schedule(s) for s in range(total_steps)]
    fused, why = fused_step.build(
        model, optimizer, train, config["batch_size"], lr_of_step, config.get("shift", 0),
        args.cuda_graph,
    )  # fmt: skip
    if fused is None:
        if not args.quiet:
            print(f"note: training with the array-op layers: {why}", file=sys.stderr)
        return None, "layers"
    if args.save_every and not args.quiet:
        print(
            "note: --save-every applies to the array-op layers; the fused CUDA step saves at "
            "epoch ends (a signal lets the epoch finish, about a second, then saves)",
            file=sys.stderr,
        )
    return fused, why


def _summary(r: dict, epochs: int) -> str:
    val = f"  val_acc {100 * r['val_acc']:.2f}%" if "val_acc" in r else ""
    return (
        f"epoch {r['epoch']:>2}/{epochs}  train_loss {r['train_loss']:.4f}  "
        f"train_acc {100 * r['train_acc']:.2f}%  test_loss {r['test_loss']:.4f}  "
        f"test_acc {100 * r['test_acc']:.2f}%{val}  lr {r['lr']:.2e}  "
        f"{r['train_seconds']:.1f}s  {r['images_per_second']:,.0f} img/s  [{r['device']}]"
    )


def fit(model: Any = None, **options: Any) -> dict:
    """Train ``model`` (any :class:`~lenet_xp.layers.Sequential` ending in 10 logits, or
    ``None`` for ``--arch``) through the same loop as the CLI; ``options`` are the CLI's
    flags with underscores (``epochs=3, out="runs/mine", resume="runs/mine/last.npz"``).
    Returns the last epoch's metrics. Bad options raise, as in the CLI, with one line."""
    parser = build_parser()
    recipe = options.get("recipe", "default")
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; one of {', '.join(RECIPES)}")
    parser.set_defaults(**RECIPES[recipe])
    args = parser.parse_args([])
    for key, value in options.items():
        if not hasattr(args, key):
            raise TypeError(f"fit() got an unknown option {key!r}; see train --help")
        setattr(args, key, value)
    return run(args, model, given=options)


def given_options(argv: list[str] | None) -> frozenset[str]:
    """The options (``args`` names) that ``argv`` sets explicitly, not by default."""
    parser, unset = build_parser(), object()
    # argparse fills in a default only where the namespace has no value yet
    namespace = argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), unset))
    parsed = vars(parser.parse_args(argv, namespace=namespace))
    return frozenset(key for key, value in parsed.items() if value is not unset)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    parser.set_defaults(**RECIPES[args.recipe])
    args = parser.parse_args(argv)  # the recipe's values, then the flags given
    try:
        parse_augment(args.augment)
    except ValueError as exc:
        parser.error(str(exc))
    if args.arch == "list":
        print(presets.listing())
        return 0
    # A diverging run overflows; it is reported once, as a NaN/inf loss, not per operation.
    warnings.filterwarnings("ignore", r"(overflow|invalid value)", RuntimeWarning)
    # -- distributed (issue 22): rank 0 speaks for the ranks; each rank's end waits (bounded)
    # for the others', so one that failed alone ends the job instead of leaving it waiting.
    try:
        world = mpi_world()
    except DistributedError as exc:
        print(f"lenet_xp.train: error: {exc}", file=sys.stderr)
        return 1
    if world is None:
        return _main(args, argv, world)
    try:
        status = _main(args, argv, world)
    except BaseException:  # a bug on one rank: say it, and end every rank (none is left waiting)
        traceback.print_exc()
        world.abort(1)
        return 1  # Abort ends this process too, but not always at once
    world.finish(status)
    return status


def _main(args: argparse.Namespace, argv: list[str] | None, world: World | None) -> int:
    """:func:`main` once the flags are parsed: train, and turn the errors into one line and
    an exit status (said by rank 0 alone for the errors all ranks meet together)."""
    prog, alone = "lenet_xp.train", world is None or world.is_writer
    if not alone:
        prog += f" (rank {world.rank} of {world.size})"
    try:
        run(args, given=given_options(argv))
    except (
        DataError, DeviceError, CheckpointError, TrainingError, WorkerError, RunLockError,
        DivergedError, report.ReportError, tblog.LogError, DistributedError,
    ) as exc:  # fmt: skip
        if alone or not isinstance(exc, DistributedError):
            print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except presets.PresetError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print(
            f"{prog}: error: out of memory at --batch-size {args.batch_size}; "
            f"lower it (e.g. --batch-size {max(1, args.batch_size // 2)})",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:  # e.g. --out or --metrics not writable
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # SIGINT or SIGTERM (lenet_xp.interrupt)
        message, status = exit_message(exc, resume_hint(args, args.resume))
        if alone:
            print(f"{prog}: {message}", file=sys.stderr)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
