"""Per-layer statistics over training, as Chainer's ``ParameterStatistics`` shows them: what a
student looks at to see vanishing or exploding gradients, dead ReLUs or a learning rate that
is too high or too low.

Every ``every``-th optimizer step is a *sample*. For each top-level layer of the model (the
training forward pass of that very step: the layers' ``forward`` is wrapped for that one step
only) it takes the mean, the standard deviation and the fraction of zeros of the output; for
each parameter the mean and standard deviation of its gradient and the update ratio
``||w_after - w_before|| / ||w_before||`` of the step (about 1e-3 is the usual healthy value).
Nothing is read back per step: the numbers stay on the device (NumPy or CuPy, the model's
``xp``) until :meth:`LayerStats.end_epoch` reads the epoch's samples back at once and appends
one JSON line to ``RUN/stats.jsonl``::

    {"epoch": 1, "samples": 8, "every": 50,
     "layers": {"conv1": {"act_mean": ..., "act_std": ..., "act_zero": ...}, ...},
     "params": {"conv1.weight": {"grad_mean": ..., "grad_std": ...,
                                 "update_ratio_mean": ..., "update_ratio_std": ...}, ...}}

Each value is the mean over the epoch's samples (``update_ratio_std``: the spread of the
update ratio over them). With ``DataParallel`` workers the activations are those of the main
process's slice of the batch; the gradients are the whole batch's. An epoch with no sample (it
had fewer than ``every`` steps, or the fused CUDA step ran it, which bypasses the layers) gets
one at its end: the last step's gradients, without activations or update ratio.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lenet_xp.backend import asnumpy, get_array_module
from lenet_xp.layers import Flatten, Module

STATS_FILE = "stats.jsonl"
#: Steps between samples by default: 8 samples in an epoch of MNIST at batch 128.
DEFAULT_EVERY = 50


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file (``metrics.jsonl``, ``stats.jsonl``), one dict a line."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_stats(path: str | Path) -> list[dict]:
    """The records of a ``stats.jsonl`` file, one dict per epoch (``[]`` if it is missing)."""
    return read_jsonl(path) if Path(path).exists() else []


class LayerStats:
    """Samples ``model`` at global steps ``every``, ``2 * every``, ... (counted by the calls
    of :meth:`after_step`, from ``first_step``) and appends an epoch's record to ``path`` at
    :meth:`end_epoch`. A resumed run passes the epoch and step it resumes at: the file keeps
    the records of the epochs before ``first_epoch`` (1: the file starts afresh), and the
    same steps are sampled as in an uninterrupted run.

    A layer's ``forward`` is wrapped only from the :meth:`after_step` call before a sampled
    step to the one after it (never during a ``DataParallel``'s start, which copies the model).
    """

    def __init__(
        self, model: Module, path: str | Path, every: int = DEFAULT_EVERY, first_epoch: int = 1,
        first_step: int = 0,
    ) -> None:  # fmt: skip
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.model, self.path, self.every = model, Path(path), every
        self._params = list(model.named_parameters())
        self._step = first_step  # optimizer steps done
        self._before: list[Any] | None = None  # the weights before a sampled step
        self._outputs: dict[str, list[Any]] = {}  # layer -> [mean, std, zero fraction]
        self._wrapped: list[Module] = []  # the layers whose forward is wrapped now
        self._samples: list[tuple[tuple[str, ...], Any]] = []  # (keys, values on the device)
        kept = [r for r in read_stats(self.path) if r["epoch"] < first_epoch]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    # -- per step: host-side bookkeeping and, on a sampled step, a few reductions ----------
    def after_step(self) -> None:
        """Call after every optimizer step; every ``every``-th step becomes a sample."""
        if self._before is not None:
            self._sample(self._before)
            self._disarm()
        self._step += 1
        if (self._step + 1) % self.every == 0:  # the next step is a sample
            self._arm()

    def _arm(self) -> None:
        """Before the next step: copy the weights and wrap each layer's ``forward``."""
        self._before = [p.data.copy() for _, p in self._params]
        self._outputs = {}
        for name, layer in self.model.named_children():
            if not isinstance(layer, Flatten):  # a reshape: the same numbers as its input
                layer.forward = self._tap(name, layer)
                self._wrapped.append(layer)

    def _tap(self, name: str, layer: Module) -> Any:
        forward = layer.forward

        def tapped(x: Any) -> Any:
            y = forward(x)
            if layer.training:  # not an evaluation pass between epochs
                # now, before an in-place activation overwrites y
                self._outputs[name] = [y.mean(), y.std(), (y == 0).mean()]
            return y

        return tapped

    def _disarm(self) -> None:
        for layer in self._wrapped:
            del layer.forward  # the class's forward again
        self._wrapped, self._before, self._outputs = [], None, {}

    def _sample(self, before: list[Any] | None) -> None:
        """Queue this step's numbers (device arrays; no host synchronisation): the outputs
        the wrapped layers saw, the gradients, and the update ratios against ``before`` (the
        weights before the step), if given."""
        keys, values = [], []
        for name, (mean, std, zero) in self._outputs.items():
            keys += [f"layers/{name}/act_mean", f"layers/{name}/act_std", f"layers/{name}/act_zero"]
            values += [mean, std, zero]
        before = before or [None] * len(self._params)
        for (name, param), w0 in zip(self._params, before, strict=True):
            if param.grad is None:  # a fixed parameter (e.g. RBF centres)
                continue
            keys += [f"params/{name}/grad_mean", f"params/{name}/grad_std"]
            values += [param.grad.mean(), param.grad.std()]
            if w0 is not None:
                xp = get_array_module(w0)
                norm0 = xp.maximum(xp.sqrt((w0 * w0).sum()), 1e-30)
                keys.append(f"params/{name}/update_ratio")
                values.append(xp.sqrt(((param.data - w0) ** 2).sum()) / norm0)
        if values:
            xp = get_array_module(values[0])
            row = xp.stack([xp.asarray(v, dtype=xp.float64) for v in values])
            self._samples.append((tuple(keys), row))

    # -- per epoch: one read-back ------------------------------------------------------------
    def end_epoch(self, epoch: int) -> dict:
        """Read the epoch's samples back (one synchronisation), append their summary to the
        file and return it (the record shown in the module's docstring)."""
        if not self._samples:
            self._sample(None)  # the last step's gradients
        record: dict[str, Any] = {"epoch": epoch, "samples": 0, "every": self.every}
        if self._samples:
            record.update(self._summary())
        self._samples = []
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return record

    def _summary(self) -> dict:
        """``{"samples": S, "layers": ..., "params": ...}`` of the queued samples; a statistic
        absent from some samples (an update ratio before the first step) is averaged over
        the samples that have it."""
        xp = get_array_module(self._samples[0][1])
        flat = asnumpy(xp.concatenate([row for _, row in self._samples]))  # one read-back
        positions: dict[str, list[int]] = {}
        offset = 0
        for keys, _ in self._samples:
            for i, key in enumerate(keys):
                positions.setdefault(key, []).append(offset + i)
            offset += len(keys)
        record: dict[str, Any] = {"samples": len(self._samples)}
        for key, where in positions.items():
            column = flat[where]
            group, name, stat = key.split("/")
            entry = record.setdefault(group, {}).setdefault(name, {})
            if stat == "update_ratio":
                entry["update_ratio_mean"] = float(column.mean())
                entry["update_ratio_std"] = float(column.std())
            else:
                entry[stat] = float(column.mean())
        return record

    def close(self) -> None:
        """Restore the layers' own ``forward`` (a sample armed after the last step)."""
        self._disarm()
