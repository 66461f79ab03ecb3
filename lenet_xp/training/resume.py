"""Stop a run any time and lose nothing: mid-epoch checkpoints, resuming from them, and the
per-step checks (stop requests, ``--save-every``, divergence) of :class:`Keeper`.

A mid-epoch ``last.npz`` holds the weights and optimizer state after global step ``step``, the
metadata of the previous epoch's end (``epoch``: epochs completed; ``rng_state``: the host
generator *before* this epoch drew its order, shifts and augmentation seed, so the epoch can be
drawn again) and ``mid_epoch``, an :class:`EpochPosition`. Resuming draws the epoch again,
skips the batches done and carries their sums on, so the run's metrics equal an uninterrupted
run's, bit for bit on the CPU. Every checkpoint also carries ``history``, the metrics of the
epochs it completed: on resume ``metrics.jsonl`` is rewritten from it, so the file always
agrees with the checkpoint, whenever the previous run was killed.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lenet_xp.backend import get_array_module
from lenet_xp.storage.checkpoint import TEMP_SUFFIX, CheckpointError, atomic_write, save_checkpoint
from lenet_xp.training.interrupt import Interrupted, StopSignals, signal_name

#: On a GPU the divergence check reads the running loss sum (one host sync) every this many
#: steps; on the CPU the read is free and happens every step.
GPU_CHECK_EVERY = 50


class DivergedError(Exception):
    """The loss or the weights stopped being finite; the message names the step."""


@dataclass
class EpochPosition:
    """Where a run stopped inside epoch ``epoch``: ``batch`` batches done, with the sum of
    their per-image losses (``loss_sum``, float64), correct predictions (``correct``) and the
    training seconds they took."""

    epoch: int
    batch: int
    loss_sum: float
    correct: int
    seconds: float = 0.0

    @classmethod
    def from_meta(cls, meta: dict, steps_per_epoch: int, where: str) -> EpochPosition | None:
        """The position in a checkpoint's ``meta`` (``None`` at an epoch end); ``where``
        names the checkpoint in the :class:`CheckpointError` of one that does not fit."""
        if meta.get("mid_epoch") is None:
            return None
        try:
            position = cls(**meta["mid_epoch"])
        except TypeError as exc:
            raise CheckpointError(f"checkpoint {where} has a bad mid_epoch: {exc}") from None
        if position.epoch != meta["epoch"] + 1 or not 0 <= position.batch <= steps_per_epoch:
            raise CheckpointError(
                f"checkpoint {where} stopped at batch {position.batch} of epoch "
                f"{position.epoch}, which does not fit this run ({steps_per_epoch} per epoch)"
            )
        return position


def initial_meta(config: dict, rng_state: dict) -> dict:
    """The metadata of a run that has not trained yet (the base of epoch 1's checkpoints)."""
    return {
        "epoch": 0, "step": 0, "rng_state": rng_state, "config": config, "metrics": {},
        "best_score": None, "best_epoch": 0, "history": [],
    }  # fmt: skip


#: ``tempfile.mkstemp``'s names, as every atomic write here makes them: ``.<target>.`` then
#: 8 random characters then ``.tmp``.
_TEMP_NAME = re.compile(rf"\.(?P<target>.+)\.[a-z0-9_]{{8}}{re.escape(TEMP_SUFFIX)}")


def remove_stale_temps(out: Path, metrics_path: Path) -> None:
    """Delete the temp files that writes killed mid-way left behind: in ``out`` (call while
    holding its lock), and those of the metrics files beside ``metrics_path``."""
    metrics = {metrics_path.name, metrics_path.with_suffix(".csv").name}
    for folder, targets in ((out, None), (metrics_path.parent, metrics)):
        for path in folder.iterdir():
            match = _TEMP_NAME.fullmatch(path.name)
            if match and (targets is None or match["target"] in targets) and path.is_file():
                path.unlink(missing_ok=True)


def restore_metrics(path: Path, meta: dict) -> list[dict]:
    """Rewrite ``path`` (atomically) with the records of the epochs that checkpoint ``meta``
    completed, and return them: its ``history``, or for a checkpoint without one (format 1)
    the lines of ``path`` up to its epoch."""
    history = meta.get("history")
    if history is None:
        history = [r for r in read_records(path) if r.get("epoch", math.inf) <= meta["epoch"]]
    text = "".join(json.dumps(record) + "\n" for record in history)
    atomic_write(path, lambda f: f.write(text.encode()), mode=0o644)
    return list(history)


def read_records(path: Path) -> list[dict]:
    """The JSON lines of ``path`` (none if it does not exist); a torn line is skipped."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _weights_finite(model: Any) -> bool:
    return all(bool(get_array_module(p.data).isfinite(p.data).all()) for p in model.parameters())


class Keeper:
    """After every training step (``train_epoch(keeper=...)``): every ``check_every``
    steps (1 on the CPU, :data:`GPU_CHECK_EVERY` on a GPU) check that the loss is finite;
    every ``save_every`` steps (``None``: never) and on a stop request write a mid-epoch
    ``out/last.npz``; on a stop request then raise :class:`Interrupted`, its message ending
    in ``hint(checkpoint)`` (how to resume). The trainer saves epoch ends through
    :meth:`save_epoch`; a stop requested during the epoch's evaluation (or a fused
    epoch, which has no steps to stop at) stops at :meth:`begin_epoch` of the next one.
    ``latest``: the checkpoint this run started from (``None``: a fresh run); ``writes``:
    whether this process writes the checkpoints (not a rank above 0 of an MPI run)."""

    def __init__(
        self, out: Path, model: Any, optimizer: Any, stop: StopSignals, base: dict,
        device_kind: str, save_every: int | None, steps_per_epoch: int,
        hint: Callable[[Path | None], str], latest: Path | None, writes: bool = True,
    ) -> None:  # fmt: skip
        self.path, self.model, self.optimizer, self.stop = out / "last.npz", model, optimizer, stop
        self.base, self.save_every, self.hint, self.latest = base, save_every, hint, latest
        self.check_every = 1 if device_kind == "cpu" else GPU_CHECK_EVERY
        self.steps_per_epoch = steps_per_epoch
        self.writes = writes  # False: a rank above 0 of an MPI run (rank 0 writes)
        self.saved_step = base["step"]
        self.epoch, self.t0, self.seconds_before, self.trained = 0, 0.0, 0.0, False

    def begin_epoch(self, epoch: int, position: EpochPosition | None) -> None:
        """Epoch ``epoch`` starts now (at ``position`` if resumed inside it); a stop requested
        since the last epoch's end (which is saved), or while the run was starting, stops
        here."""
        if self.stop.requested is not None:
            name = signal_name(self.stop.requested)
            where = f"after epoch {epoch - 1} (step {self.base['step']}); {self.saved()}"
            if not self.trained:
                where = f"before training started; {self.hint(self.latest)}"
            raise Interrupted(self.stop.requested, f"stopped by {name} {where}")
        self.epoch, self.t0 = epoch, time.perf_counter()
        self.seconds_before = position.seconds if position is not None else 0.0

    def epoch_seconds(self) -> float:
        """Seconds this epoch has trained, with those before a resume inside it."""
        return self.seconds_before + time.perf_counter() - self.t0

    def on_step(self, step: int, batch: int, loss_sum: Any, correct: Any) -> None:
        """Global step ``step`` (batch ``batch`` of this epoch) is done; ``loss_sum`` and
        ``correct`` are the epoch's running sums (0-d device arrays)."""
        self.trained = True
        stop = self.stop.requested
        save = stop is not None or bool(self.save_every) and step % self.save_every == 0
        if save or step % self.check_every == 0:
            self._check(step, batch, float(loss_sum), "training loss")
        if save and step != self.saved_step:
            if not _weights_finite(self.model):
                self._check(step, batch, math.nan, "weights")
            position = EpochPosition(
                self.epoch, batch, float(loss_sum), int(correct), self.epoch_seconds()
            )
            meta = {**self.base, "step": step, "mid_epoch": asdict(position)}
            if self.writes:
                model_state, optim_state = self.model.state_dict(), self.optimizer.state_dict()
                save_checkpoint(self.path, model_state, optim_state, meta)
            self.saved_step, self.latest = step, self.path
        if stop is not None:
            where = f"at step {step} (epoch {self.epoch}, batch {batch} of {self.steps_per_epoch})"
            raise Interrupted(stop, f"stopped by {signal_name(stop)} {where}; {self.saved()}")

    def save_epoch(self, meta: dict, also: list[Path]) -> None:
        """Save this epoch's end with ``meta`` to each of ``also`` (e.g. ``best.npz``), then
        to ``last.npz`` (last: a resumed run starts from it); ``meta`` becomes the base of
        the next epoch's checkpoints."""
        if self.writes:
            model_state, optim_state = self.model.state_dict(), self.optimizer.state_dict()
            save_checkpoint(self.path, model_state, optim_state, meta, also=also)
        self.base, self.saved_step, self.latest = meta, meta["step"], self.path
        self.trained = True  # the fused CUDA step trains whole epochs without on_step

    def interrupted(self, signum: int, how: str) -> Interrupted:
        """The exception for a stop at once (``how``: why, e.g. a second signal): where the
        run was and its last complete checkpoint."""
        where = f"at once {how} " + (f"in epoch {self.epoch}" if self.epoch else "while starting")
        saved = self.saved("the last complete checkpoint is")
        return Interrupted(signum, f"stopped by {signal_name(signum)} {where}; {saved}")

    def saved(self, what: str = "saved") -> str:
        """What was saved last (``what`` and its path) and how to resume from it."""
        saved = "" if self.latest is None else f"{what} {self.latest}; "
        return saved + self.hint(self.latest)

    def _check(self, step: int, batch: int, value: float, what: str) -> None:
        if math.isfinite(value):
            return
        when = f"at step {step}" if self.check_every == 1 else f"by step {step}"
        lr = self.base["config"]["lr"]
        kept = (
            f"the last good checkpoint {self.latest} (step {self.saved_step}) is kept"
            if self.latest is not None
            else "no checkpoint was written"
        )
        raise DivergedError(
            f"the {what} became {value} {when} (epoch {self.epoch}, batch {batch}); training "
            f"diverged: start again with a lower --lr (now {lr:g}, e.g. --lr {lr / 10:g}); "
            f"{kept}"
        )


def resume_base(meta: dict, metrics_path: Path) -> dict:
    """The resumed checkpoint's ``meta`` as the base of the run's next checkpoints: no
    ``mid_epoch``, and its ``history`` (also rewritten to ``metrics_path``)."""
    base = {key: value for key, value in meta.items() if key != "mid_epoch"}
    base["history"] = restore_metrics(metrics_path, meta)
    return base


def inexact_resume_note(config: dict) -> str | None:
    """Why a resumed run of ``config`` cannot repeat the uninterrupted run exactly (``None``:
    it does, bit for bit on the CPU)."""
    if config.get("dropout"):
        return (
            "--dropout draws its masks from a generator that checkpoints do not hold: from "
            "here they differ from an uninterrupted run's"
        )
    if config.get("batchnorm") and config.get("workers", 1) > 1:
        return (
            "--batchnorm with --workers > 1: the workers' running statistics are not in "
            "checkpoints, so evaluations from here differ slightly from an uninterrupted run's"
        )
    return None
