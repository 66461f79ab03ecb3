"""What a training run logs beside ``metrics.jsonl``, each epoch:

- ``metrics.csv``: the same rows as ``metrics.jsonl``, for spreadsheets (columns: every key
  any row has, in order of first appearance; rewritten whole each epoch, atomically);
- ``stats.jsonl``: per-layer statistics (:mod:`lenet_xp.training.stats`), unless
  ``--stats-every 0``;
- with ``--tensorboard DIR``, TensorBoard event files (tensorboardX, ``pip install
  "lenet_xp[tensorboard]"``): the epoch's scalars (losses, accuracies, learning rate,
  images/s, epoch seconds, the layer statistics), histograms of every parameter and of its last
  gradient, and every conv layer's filters as images. The step of every entry is the epoch.

:class:`RunLog` does all three for ``lenet_xp.train``; the pieces work on their own too.
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import Any

from lenet_xp.backend import CPU, asnumpy
from lenet_xp.layers import Module
from lenet_xp.training.stats import STATS_FILE, LayerStats, read_jsonl

np = CPU.xp  # TensorBoard takes host arrays


class LogError(Exception):
    """A run's logs cannot be written (e.g. tensorboardX is missing); one line."""


def write_csv(jsonl: str | Path, csv_path: str | Path | None = None) -> Path:
    """Write the rows of ``jsonl`` (JSON lines) as CSV to ``csv_path`` (default: the same name
    with ``.csv``); a key a row lacks is an empty cell. Returns the CSV's path."""
    jsonl = Path(jsonl)
    target = Path(csv_path) if csv_path else jsonl.with_suffix(".csv")
    rows = read_jsonl(jsonl)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def filter_image(weight: Any, scale: int = 4) -> Any:
    """A conv ``weight (out, in, k, k)`` as a greyscale picture ``(H, W)`` float in [0, 1]:
    the mosaic of :func:`lenet_xp.models.feature_maps.filter_mosaic` (0.5: a zero weight; gaps
    white), each pixel ``scale`` times larger."""
    from lenet_xp.models.feature_maps import filter_mosaic

    grid = filter_mosaic(asnumpy(weight))
    limit = float(np.nanmax(np.abs(grid))) or 1.0
    grid = np.nan_to_num(0.5 + grid / (2 * limit), nan=1.0)
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


class TensorBoardLog:
    """TensorBoard event files in ``logdir`` (tensorboardX's ``SummaryWriter``)."""

    def __init__(self, logdir: str | Path) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise LogError(
                '--tensorboard needs tensorboardX: pip install "lenet_xp[tensorboard]"'
            ) from None
        try:
            self.writer = SummaryWriter(str(logdir))
        except OSError as exc:
            raise LogError(f"cannot write TensorBoard logs to {logdir}: {exc}") from None

    def log_epoch(self, record: dict, model: Module, stats: dict | None = None) -> None:
        """Scalars of a ``metrics.jsonl`` ``record`` (and of a ``stats.jsonl`` record),
        histograms of ``model``'s parameters and gradients, its filters; step: the epoch."""
        w, epoch = self.writer, record["epoch"]
        for split in ("train", "val", "test"):
            if f"{split}_loss" in record:
                w.add_scalar(f"loss/{split}", record[f"{split}_loss"], epoch)
                w.add_scalar(f"accuracy/{split}", record[f"{split}_acc"], epoch)
        w.add_scalar("learning_rate", record["lr"], epoch)
        w.add_scalar("speed/images_per_second", record["images_per_second"], epoch)
        w.add_scalar("speed/epoch_seconds", record["train_seconds"], epoch)
        for group in ("layers", "params"):
            for name, values in (stats or {}).get(group, {}).items():
                for stat, value in values.items():
                    w.add_scalar(f"{stat}/{name}", value, epoch)
        for name, param in model.named_parameters():
            w.add_histogram(f"weights/{name}", asnumpy(param.data), epoch)
            if param.grad is not None:
                w.add_histogram(f"gradients/{name}", asnumpy(param.grad), epoch)
        from lenet_xp.models.feature_maps import conv_filters

        for name, weight in conv_filters(model):
            w.add_image(f"filters/{name}", filter_image(weight), epoch, dataformats="HW")
        w.flush()

    def close(self) -> None:
        self.writer.close()


class RunLog:
    """Everything a run logs beside ``metrics.jsonl`` (see the module's docstring).

    ``stats_every`` 0: no ``stats.jsonl``; ``tensorboard``: a folder, or ``None``;
    ``first_epoch``, ``first_step``: where the run starts (or resumes). Call
    :meth:`after_step` after each optimizer step, :meth:`end_epoch` once the epoch's line is in
    ``metrics_path``, :meth:`close` at the end.
    """

    def __init__(
        self, model: Module, metrics_path: str | Path, out: str | Path, stats_every: int = 0,
        tensorboard: str | Path | None = None, first_epoch: int = 1, first_step: int = 0,
    ) -> None:  # fmt: skip
        self.model, self.metrics_path = model, Path(metrics_path)
        self.tensorboard = TensorBoardLog(tensorboard) if tensorboard else None
        self.stats = None
        if stats_every:
            path = Path(out) / STATS_FILE
            self.stats = LayerStats(model, path, stats_every, first_epoch, first_step)

    def after_step(self) -> None:
        if self.stats is not None:
            self.stats.after_step()

    def end_epoch(self, record: dict) -> None:
        stats = self.stats.end_epoch(record["epoch"]) if self.stats is not None else None
        write_csv(self.metrics_path)
        if self.tensorboard is not None:
            self.tensorboard.log_epoch(record, self.model, stats)

    def close(self) -> None:
        if self.stats is not None:
            self.stats.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
