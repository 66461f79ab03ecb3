"""``sweep.png``: test accuracy by configuration (mean, ± one sd, each seed a dot), in the
summary's order; beside it, for a sweep along one or two numeric axes (a 1-D or 2-D grid, or
random draws of one or two flags), accuracy against the first axis, one line per value of the
second. Every accuracy is the run's best-validation epoch's."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from lenet_xp.sweep.results import ConfigSummary, Result, ranked, summarize
from lenet_xp.sweep.spec import Sweep


class PictureError(Exception):
    """No picture could be drawn (matplotlib is missing, or nothing has finished)."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PictureError('needs matplotlib: pip install "lenet_xp[plots]"') from None
    matplotlib.use("Agg")  # files only, no screen needed
    import matplotlib.pyplot as plt

    return plt


def _numeric(label: str) -> float | None:
    try:
        return float(label)
    except ValueError:
        return None


def _test_pct(summary: ConfigSummary) -> list[float]:
    return [100 * r.best["test_acc"] for r in summary.counted]


def write_picture(sweep: Sweep, results: list[Result], path: Path) -> None:
    """Draw ``sweep.png`` at ``path`` (:class:`PictureError` if it cannot)."""
    summaries = [s for s in ranked(sweep, summarize(results)) if s.counted]
    if not summaries:
        raise PictureError("no run has finished yet")
    plt = _pyplot()
    axes = _numeric_axes(sweep, summaries)
    fig, panels = plt.subplots(
        1, 2 if axes else 1, figsize=(13 if axes else 7, max(3.0, 0.35 * len(summaries) + 1.5)),
        squeeze=False,
    )  # fmt: skip
    _by_config(panels[0][0], summaries)
    if axes:
        _against_axis(panels[0][1], summaries, sweep, *axes)
    fig.suptitle(f"{sweep.source}: test accuracy at the best-validation epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _by_config(ax: Any, summaries: list[ConfigSummary]) -> None:
    """One row per configuration, best on top: mean ± sd and each seed."""
    for row, summary in enumerate(reversed(summaries)):
        pct = _test_pct(summary)
        sd = statistics.stdev(pct) if len(pct) > 1 else 0.0
        ax.errorbar(statistics.mean(pct), row, xerr=sd, fmt="o", color="C0", capsize=3)
        ax.plot(pct, [row] * len(pct), ".", color="C1", alpha=0.7)
    ax.set_yticks(range(len(summaries)))
    ax.set_yticklabels([s.config for s in reversed(summaries)], fontsize=8)
    ax.set_xlabel("test accuracy (%): mean ± sd, dots: seeds")
    ax.grid(axis="x", alpha=0.3)


def _numeric_axes(sweep: Sweep, summaries: list[ConfigSummary]) -> tuple[str, ...] | None:
    """``(x axis,)`` or ``(x axis, line axis)`` when the sweep varies one or two axes (the
    x axis: one that holds numbers, if any); ``None`` otherwise."""
    if not 1 <= len(sweep.axes) <= 2:
        return None
    numeric = [
        name for name in sweep.axes
        if all(_numeric(dict(s.results[0].run.values)[name]) is not None for s in summaries)
    ]  # fmt: skip
    first = numeric[0] if numeric else sweep.axes[0]
    return (first, *[name for name in sweep.axes if name != first])


def _against_axis(ax: Any, summaries: list[ConfigSummary], sweep: Sweep, *names: str) -> None:
    """Mean ± sd against ``names[0]`` (numbers, or categories in the file's order), one
    line per value of ``names[1]``."""
    values = [dict(s.results[0].run.values) for s in summaries]
    if len(names) > 1 and len({v[names[1]] for v in values}) > 8:
        names = names[:1]  # random draws of two flags: too many values for lines
    categories = list(dict.fromkeys(v[names[0]] for v in values))
    numeric = all(_numeric(c) is not None for c in categories)
    lines: dict[str, list[tuple[float, list[float]]]] = {}
    for summary, value in zip(summaries, values, strict=True):
        x = _numeric(value[names[0]]) if numeric else categories.index(value[names[0]])
        line = value[names[1]] if len(names) > 1 else ""
        lines.setdefault(line, []).append((x, _test_pct(summary)))
    for i, (line, points) in enumerate(lines.items()):
        points.sort(key=lambda point: point[0])
        means = [statistics.mean(p) for _, p in points]
        sds = [statistics.stdev(p) if len(p) > 1 else 0.0 for _, p in points]
        label = f"{names[1]} = {line}" if line else None
        ax.errorbar([x for x, _ in points], means, yerr=sds, marker="o", capsize=3,
                    color=f"C{i}", label=label)  # fmt: skip
    xs = [x for points in lines.values() for x, _ in points]
    if numeric and min(xs) > 0 and max(xs) / min(xs) >= 10:
        ax.set_xscale("log")
    if numeric and len(categories) <= 8:  # each value trained, as the sweep names it
        ax.set_xticks([_numeric(c) for c in categories], categories, fontsize=8)
        ax.minorticks_off()
    elif not numeric:
        ax.set_xticks(range(len(categories)), categories, rotation=20, fontsize=8)
    ax.set_xlabel(names[0])
    ax.set_ylabel("test accuracy (%): mean ± sd")
    ax.grid(alpha=0.3)
    if len(names) > 1:
        ax.legend(fontsize=8)
