"""A sweep's results, read back from its runs' folders: ``results.csv`` (one row a run) and
``summary.md`` (mean ± sd over seeds per configuration, sorted by validation accuracy).

Every accuracy is that of the run's best-validation epoch (``best.npz``): validation chooses
the epoch and the configuration; the test set chooses nothing. A run's record is its
``last.npz``'s ``history`` (what the checkpoint holds, whenever the run stopped).
"""

from __future__ import annotations

import csv
import io
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lenet_xp.storage.checkpoint import CheckpointError, atomic_write, load_checkpoint
from lenet_xp.sweep.execute import RUN_FILE, STOP_FILE, read_json
from lenet_xp.sweep.spec import Run, Sweep

#: A run's states: trained to its end (or stopped by --patience), stopped by early stopping
#: (ASHA), failed (its last attempt's error), interrupted (resumable), not started.
FINISHED, STOPPED, FAILED, INTERRUPTED, PENDING = (
    "finished", "stopped", "failed", "interrupted", "pending",
)  # fmt: skip
DONE = (FINISHED, STOPPED)  # runs whose results count


@dataclass
class Result:
    """One run as its folder holds it: ``status``, ``history`` (metrics records, one per
    completed epoch), ``error`` (a failed run's one line) and ``info`` (``run.json``)."""

    run: Run
    status: str
    history: list[dict] = field(default_factory=list)
    error: str = ""
    info: dict = field(default_factory=dict)

    @property
    def best(self) -> dict | None:
        """The record of the best-validation epoch (``None``: no epoch completed)."""
        if not self.history:
            return None
        by_epoch = {record["epoch"]: record for record in self.history}
        return by_epoch.get(self.history[-1]["best_epoch"], self.history[-1])

    @property
    def minutes(self) -> float:
        """Training minutes (``train_seconds``; testing not counted)."""
        return sum(record["train_seconds"] for record in self.history) / 60


def read_result(folder: Path, run: Run) -> Result:
    """The state of ``run`` in ``folder`` (its own folder)."""
    info = read_json(folder / RUN_FILE) or {}
    try:
        meta = load_checkpoint(folder / "last.npz")[2]
    except CheckpointError:
        meta = None
    history = list(meta.get("history", [])) if meta else []
    if meta and "mid_epoch" not in meta and _complete(meta, history):
        return Result(run, FINISHED, history, info=info)
    if (folder / STOP_FILE).exists():
        return Result(run, STOPPED, history, info=info)
    if info.get("error") and not info.get("stopped"):
        return Result(run, FAILED, history, info["error"], info)
    return Result(run, INTERRUPTED if meta else PENDING, history, info=info)


def _complete(meta: dict, history: list[dict]) -> bool:
    return meta["epoch"] >= meta["config"]["epochs"] or bool(
        history and history[-1].get("stopped_early")
    )


def read_results(sweep: Sweep, out: Path) -> list[Result]:
    """Every run of ``sweep`` as its folder under ``out`` holds it, in file order."""
    return [read_result(out / run.name, run) for run in sweep.runs]


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def write_csv(sweep: Sweep, results: list[Result], path: Path) -> None:
    """``results.csv``: one row a run; accuracies as fractions, as in ``metrics.jsonl``."""
    columns = ["run", "config", "seed", *sweep.axes, "status", "best_epoch", "val_acc"]
    columns += ["test_acc", "test_acc_last", "epochs", "minutes", "device", "host", "flags"]
    columns += ["error"]
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, lineterminator="\n")
    writer.writeheader()
    for result in results:
        run, best = result.run, result.best
        row = {"run": run.name, "config": run.config, "seed": run.seed, **dict(run.values)}
        row.update(status=result.status, flags=" ".join(run.flags), error=result.error)
        row["host"] = result.info.get("host", "")
        if best is not None:
            row.update(best_epoch=best["epoch"], val_acc=best.get("val_acc", ""))
            row.update(test_acc=best["test_acc"], test_acc_last=result.history[-1]["test_acc"])
            row.update(epochs=len(result.history), minutes=f"{result.minutes:.3f}")
            row["device"] = result.history[-1].get("device", "")
        writer.writerow(row)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()), mode=0o644)


@dataclass
class ConfigSummary:
    """One configuration over its seeds: the runs whose results count (finished or stopped
    early) and the mean of their validation accuracy (``None``: none, or no validation)."""

    config: str
    results: list[Result]
    counted: list[Result]

    @property
    def val_mean(self) -> float | None:
        vals = [r.best.get("val_acc") for r in self.counted]
        return statistics.mean(vals) if vals and None not in vals else None


def summarize(results: list[Result]) -> list[ConfigSummary]:
    """Per configuration, in file order."""
    groups: dict[str, list[Result]] = {}
    for result in results:
        groups.setdefault(result.run.config, []).append(result)
    return [
        ConfigSummary(config, rs, [r for r in rs if r.status in DONE and r.best])
        for config, rs in groups.items()
    ]


def ranked(sweep: Sweep, summaries: list[ConfigSummary]) -> list[ConfigSummary]:
    """``summaries`` sorted as the sweep file says: by mean validation accuracy (best first;
    configurations without one last, in file order) or in file order."""
    if sweep.sort == "file":
        return list(summaries)
    return sorted(summaries, key=lambda s: -s.val_mean if s.val_mean is not None else 1.0)


def _spread(values: list[float]) -> str:
    """``"99.30 % ± 0.06 (99.24, 99.32, 99.35)"`` (percent) of fractions."""
    if not values:
        return ""
    pct = [100 * v for v in values]
    sd = f" ± {statistics.stdev(pct):.2f}" if len(pct) > 1 else ""
    each = f" ({', '.join(f'{v:.2f}' for v in pct)})" if len(pct) > 1 else ""
    return f"{statistics.mean(pct):.2f} %{sd}{each}"


def _epochs(results: list[Result]) -> str:
    return ", ".join(str(n) for n in sorted({len(r.history) for r in results}))


def summary_markdown(sweep: Sweep, results: list[Result]) -> str:
    """``summary.md``'s text: the counts, the table, the best configuration and the command
    that trains it, and the runs that failed."""
    summaries = ranked(sweep, summarize(results))
    counts = Counter(result.status for result in results)
    waiting = counts[INTERRUPTED] + counts[PENDING]
    lines = [
        f"# Sweep `{sweep.source}`",
        "",
        f"{len(results)} runs: {counts[FINISHED]} finished, {counts[STOPPED]} stopped early "
        f"(ASHA), {counts[FAILED]} failed, {waiting} not done. Accuracies are each run's "
        "best-validation epoch's (`best.npz`): the test set chooses nothing. Mean ± sd over "
        "seeds (each seed in brackets); "
        + ("sorted by validation accuracy." if sweep.sort != "file" else "in the file's order."),
        "",
    ]
    notes = any(s.results[0].run.note for s in summaries)
    head = [*sweep.axes] or ["configuration"]
    head += ["flags"] * sweep.rows
    head += ["validation accuracy", "test accuracy", "runs", "epochs", "minutes"]
    lines += ["| " + " | ".join(head + ["note"] * notes) + " |"]
    lines += ["|" + "---|" * (len(head) + notes)]
    for s in summaries:
        run = s.results[0].run
        cells = [f"`{v}`" for _, v in run.values] or [run.config]
        cells += [f"`{' '.join(run.varied)}`" if run.varied else ""] * sweep.rows
        vals = [r.best["val_acc"] for r in s.counted] if s.val_mean is not None else []
        cells += [_spread(vals)]
        cells += [_spread([r.best["test_acc"] for r in s.counted])]
        cells += [f"{len(s.counted)}/{len(s.results)}", _epochs(s.counted)]
        cells += [f"{statistics.mean(r.minutes for r in s.counted):.1f}" if s.counted else ""]
        lines.append("| " + " | ".join(cells + [run.note] * notes) + " |")
    lines += ["", *_best_lines(sweep, summaries), *_failed_lines(results)]
    return "\n".join(lines) + "\n"


def best_config(summaries: list[ConfigSummary]) -> ConfigSummary | None:
    """The configuration with the highest mean validation accuracy (``None``: no run has a
    validation accuracy yet)."""
    scored = [s for s in summaries if s.val_mean is not None]
    return max(scored, key=lambda s: s.val_mean) if scored else None


def _best_lines(sweep: Sweep, summaries: list[ConfigSummary]) -> list[str]:
    best = best_config(summaries)
    if best is None:
        return ["No configuration is ranked yet: no run with a validation accuracy has finished."]
    run = best.counted[0].run
    test = _spread([r.best["test_acc"] for r in best.counted])
    return [
        f"**Best configuration** (highest mean validation accuracy, "
        f"{100 * best.val_mean:.2f} %): `{run.config}`, test accuracy {test}.",
        "",
        f"    {run.command(sweep.device)}",
    ]


def _failed_lines(results: list[Result]) -> list[str]:
    failed = [r for r in results if r.status == FAILED]
    if not failed:
        return []
    return ["", "Failed runs (run the sweep again to retry them):", ""] + [
        f"- `{r.run.name}`: {r.error}" for r in failed
    ]


def write_summary(sweep: Sweep, results: list[Result], path: Path) -> None:
    text = summary_markdown(sweep, results)
    atomic_write(path, lambda f: f.write(text.encode()), mode=0o644)
