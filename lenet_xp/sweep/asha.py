"""Early stopping of hopeless runs: asynchronous successive halving (ASHA, Li et al. 2018;
Ray Tune's ``AsyncHyperBandScheduler``) on validation accuracy.

At each milestone epoch (``grace``, ``grace * eta``, ...) a run goes on only if its validation
accuracy there is at least the ``1 - 1/eta`` quantile of all the accuracies recorded at that
milestone so far (its own included: the first run to reach a milestone always goes on). The
sweep reads the runs' ``metrics.jsonl`` as they grow and stops a run by writing its
``stopped.json`` (:func:`lenet_xp.sweep.execute.write_stop`); a stopped run is final and
is never resumed. A decision is made once, when the sweep first sees a run at a milestone;
on a restart the milestones a run has already passed count as passed. Which runs reach a
milestone first depends on timing, so with more runs than jobs the decisions can differ
from one sweep to the next (as in every asynchronous scheduler).
"""

from __future__ import annotations

import math
from pathlib import Path

from lenet_xp.sweep.execute import write_stop
from lenet_xp.sweep.spec import Asha, Run
from lenet_xp.training.resume import read_records


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (0 <= q <= 1), interpolated linearly between the
    sorted values (NumPy's ``percentile`` default, which Ray Tune's ASHA uses)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class AshaScheduler:
    """The milestones' records (``recorded[epoch][run name] = validation accuracy``) and
    each run's decided milestones."""

    def __init__(self, asha: Asha, out: Path, runs: list[Run]) -> None:
        self.asha, self.out = asha, out
        self.milestones = {run.name: asha.milestones(run.epochs) for run in runs}
        self.recorded: dict[int, dict[str, float]] = {}
        self.decided: dict[str, set[int]] = {run.name: set() for run in runs}
        self._sizes: dict[str, int] = {}
        for run in runs:  # what finished or interrupted runs recorded before this sweep
            self.ended(run.name)

    def ended(self, name: str) -> None:
        """Record the milestones run ``name`` reached (it ended, or it is not running): a
        run that ends between two looks of :meth:`check` counts at them too."""
        history = self._history(name)
        for epoch in self.milestones[name]:
            if epoch < len(history):  # went on past it: promoted then
                self.decided[name].add(epoch)
            if epoch <= len(history):
                self.recorded.setdefault(epoch, {})[name] = history[epoch - 1]["val_acc"]

    def _history(self, name: str) -> list[dict]:
        records = read_records(self.out / name / "metrics.jsonl")
        epochs = [r for r in records if "val_acc" in r]
        return [r for i, r in enumerate(epochs, 1) if r.get("epoch") == i]

    def check(self, name: str) -> str | None:
        """Look at the running run ``name``: a line saying why it was stopped (and its
        ``stopped.json`` written), or ``None`` if it goes on."""
        path = self.out / name / "metrics.jsonl"
        size = path.stat().st_size if path.exists() else 0
        if size == self._sizes.get(name):
            return None
        self._sizes[name] = size
        history = self._history(name)
        for epoch in self.milestones[name]:
            if epoch > len(history) or epoch in self.decided[name]:
                continue
            self.decided[name].add(epoch)
            value = history[epoch - 1]["val_acc"]
            self.recorded.setdefault(epoch, {})[name] = value
            cutoff = quantile(list(self.recorded[epoch].values()), 1 - 1 / self.asha.eta)
            if value < cutoff:  # decided for good: not judged again while it winds down
                self.decided[name].update(self.milestones[name])
                n = len(self.recorded[epoch])
                write_stop(self.out / name, {"by": "asha", "epoch": epoch, "val_acc": value,
                                             "cutoff": cutoff, "recorded": n})  # fmt: skip
                return (
                    f"stopped by ASHA at epoch {epoch}: validation {100 * value:.2f} % is "
                    f"below {100 * cutoff:.2f} %, the top 1/{self.asha.eta} of {n} runs there"
                )
        return None
