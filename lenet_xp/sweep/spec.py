"""Sweep files: what to train, read from TOML (or a dict of the same shape) and checked whole
before anything runs.

A sweep is base flags of ``lenet_xp.train`` (``[train]``), axes to vary (``[grid]``: every
combination; ``[random]``: ``samples`` draws) and ``seeds``. A *configuration* is one point
of the axes (every flag but the seed); a *run* is a configuration with one seed, trained in
its own folder ``OUT/<configuration>_seed=<S>/``. A grid axis holds plain values of one flag
(``lr = [1e-3, 3e-3]``) or *rows*: tables of several flags, with an optional ``name`` (used in
folder names and tables) and ``note`` (a free-text column of the summary)::

    [grid]
    network = [{ name = "classic-rbf", arch = "lenet5-classic", output = "rbf" }, ...]

Flags are spelled as on the command line without ``--`` (``limit-train = 2000``; a switch is
``true``/``false``); an axis's value replaces ``[train]``'s. Each random draw is rounded to
3 significant digits (the value a folder name shows is the value trained) and combined with
every grid point; the draws come from ``[random] seed`` (default 0), so the same file always
gives the same runs.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lenet_xp.backend import host_rng
from lenet_xp.sweep.flags import (  # noqa: F401  (SweepError: re-exported)
    FlagParser,
    SweepError,
    SweepFileError,
    Where,
    kind,
)

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

DISTRIBUTIONS = ("uniform", "log-uniform", "int-uniform", "choice")
SORTS = ("validation", "file")
TOP_KEYS = ("seeds", "sort", "train", "grid", "random", "asha")
ROW_KEYS = ("name", "note")  # a row's keys that are not flags


@dataclass(frozen=True)
class Asha:
    """Asynchronous successive halving on validation accuracy: at epochs ``grace``,
    ``grace * eta``, ``grace * eta**2``, ... a run goes on only if its validation accuracy is
    in the best ``1/eta`` of those recorded at that epoch so far (Ray Tune's ASHA rule)."""

    grace: int = 1
    eta: int = 3

    def milestones(self, epochs: int) -> list[int]:
        """The epochs below ``epochs`` at which a run of ``epochs`` epochs is judged."""
        found, epoch = [], self.grace
        while epoch < epochs:
            found.append(epoch)
            epoch *= self.eta
        return found


@dataclass(frozen=True)
class Run:
    """One training run: ``flags`` (``lenet_xp.train``'s, without ``--out``, ``--seed``,
    ``--device``; ``varied``: those its axes set), its configuration's ``config`` name and
    ``values`` (axis -> the value shown), its ``seed`` and ``epochs``, and its rows' notes."""

    config: str
    seed: int
    flags: tuple[str, ...]
    values: tuple[tuple[str, str], ...]
    epochs: int
    note: str = ""
    varied: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The run's folder name under the sweep's output."""
        return f"{self.config}_seed={self.seed}"

    def command(self, device: str = "auto") -> str:
        """The ``lenet_xp.train`` command line that trains this run alone."""
        flags = [*self.flags, "--seed", str(self.seed)]
        flags += ["--device", device] if device != "auto" else []
        return " ".join(["python -m lenet_xp.train", *flags])


@dataclass
class Sweep:
    """A checked sweep: its ``runs`` (configurations in file order, each with every seed),
    the ``axes`` that vary (column order), the ``device`` of ``[train]`` (``auto`` if not
    given), ``asha`` (``None``: off), how the summary is sorted and whether it shows each
    configuration's flags (``rows``: an axis holds rows, whose names do not say them)."""

    source: str
    runs: list[Run]
    axes: list[str]
    device: str = "auto"
    asha: Asha | None = None
    sort: str = "validation"
    seeds: list[int] = field(default_factory=lambda: [0])
    rows: bool = False

    def configs(self) -> list[str]:
        """The configurations' names in file order."""
        return list(dict.fromkeys(run.config for run in self.runs))


def load(source: str | Path | Mapping[str, Any], seeds: list[int] | None = None) -> Sweep:
    """The sweep of a TOML file (path) or of a dict of the same shape; ``seeds`` replaces
    the file's. :class:`SweepError` (one line) if anything in it is wrong."""
    if isinstance(source, Mapping):
        return _build(dict(source), "sweep", seeds)
    path = Path(source)
    try:
        table = tomllib.loads(path.read_text())
    except OSError as exc:
        raise SweepFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SweepFileError(f"{path} is not valid TOML: {exc}") from None
    return _build(table, str(path), seeds)


def _build(table: dict, source: str, seeds: list[int] | None) -> Sweep:
    where = Where(source)
    for key in table:
        if key not in TOP_KEYS:
            where.fail(key, f"unknown key; a sweep file has {', '.join(TOP_KEYS)}")
    parser = FlagParser()
    base = parser.flags(where, "[train]", _table(where, table, "train"))
    device = check_device(str(base.pop("device", "auto")), f"{source}: [train] device")
    axes = _grid_axes(parser, where, _table(where, table, "grid"))
    axes += _random_axes(parser, where, _table(where, table, "random"))
    _check_disjoint(where, axes)
    seeds = _seeds(where, seeds if seeds is not None else table.get("seeds", [0]))
    sort = table.get("sort", "validation")
    if sort not in SORTS:
        where.fail("sort", f"is {sort!r}; one of {', '.join(SORTS)}")
    asha = _asha(where, table.get("asha"))
    runs = []
    for point in itertools.product(*[axis.choices for axis in axes]) if axes else [()]:
        flags = dict(base)
        for choice in point:
            flags.update(choice.flags)
        values = tuple(column for choice in point for column in choice.columns)
        config = _safe("_".join(f"{name}={label}" for name, label in values) or "base")
        epochs = parser.check(flags, config, where)
        note = " ".join(choice.note for choice in point if choice.note)
        argv = tuple(parser.argv(flags))
        varied = tuple(parser.argv({k: v for c in point for k, v in c.flags.items()}))
        runs += [Run(config, s, argv, values, epochs, note, varied) for s in seeds]
    if asha is not None and any("--val-size" in r.flags and _val_size(r) == 0 for r in runs):
        where.fail("asha", "judges validation accuracy: drop val-size = 0")
    runs = _dedupe(runs)
    columns = [name for axis in axes for name, _ in axis.choices[0].columns]
    rows = any(axis.rows for axis in axes)
    return Sweep(source, runs, columns, device, asha, sort, seeds, rows)


def check_device(device: str, place: str) -> str:
    """``device`` if it is ``cpu``, ``cuda``, ``cuda:N`` or ``auto``; else
    :class:`SweepFileError` naming ``place``."""
    if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", device):
        raise SweepFileError(f"{place}: {device!r} is not a device: use cpu, cuda, cuda:N or auto")
    return device


def _val_size(run: Run) -> int:
    return int(run.flags[run.flags.index("--val-size") + 1])


@dataclass
class _Choice:
    """One value of an axis: its ``columns`` ((name, value shown) pairs: one for a grid
    axis, one per drawn flag for a random sample) and the ``flags`` it sets."""

    columns: tuple[tuple[str, str], ...]
    flags: dict[str, Any]
    note: str = ""

    @property
    def label(self) -> str:
        return "_".join(label for _, label in self.columns)


@dataclass
class _Axis:
    name: str
    choices: list[_Choice]
    rows: bool = False  # its values are rows (tables of flags)


def _table(where: Where, table: dict, key: str) -> dict:
    value = table.get(key, {})
    if not isinstance(value, dict):
        where.fail(key, f"must be a table ([{key}]), not {kind(value)}")
    return value


def _seeds(where: Where, seeds: Any) -> list[int]:
    if not isinstance(seeds, list) or not seeds:
        where.fail("seeds", "must be a non-empty list of integers, e.g. seeds = [0, 1, 2]")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        where.fail("seeds", f"must be integers >= 0, got {seeds}")
    if len(set(seeds)) != len(seeds):
        where.fail("seeds", f"repeats a seed: {seeds}")
    return list(seeds)


def _asha(where: Where, table: Any) -> Asha | None:
    if table is None:
        return None
    if not isinstance(table, dict):
        where.fail("asha", "must be a table: [asha] with grace and eta")
    for key, value in table.items():
        if key not in ("grace", "eta"):
            where.fail(f"[asha] {key}", "unknown key; [asha] has grace (epochs) and eta")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            where.fail(f"[asha] {key}", f"must be a whole number >= 1, got {value!r}")
    asha = Asha(**table)
    if asha.eta < 2:
        where.fail("[asha] eta", f"must be >= 2 (keep the best 1/eta), got {asha.eta}")
    return asha


def _grid_axes(parser: FlagParser, where: Where, grid: dict) -> list[_Axis]:
    axes = []
    for key, values in grid.items():
        place = f"[grid] {key}"
        if not isinstance(values, list):
            where.fail(place, f"must be a list of values, not {kind(values)}")
        if not values:
            where.fail(place, "is an empty axis: give at least one value")
        if all(isinstance(v, dict) for v in values):
            choices = [_row(parser, where, place, i, key, v) for i, v in enumerate(values)]
        elif any(isinstance(v, dict) for v in values):
            where.fail(place, "mixes tables and plain values: use one kind")
        else:
            flags = [parser.flags(where, place, {key: v}) for v in values]
            choices = [_Choice(((key, _label(v)),), f) for v, f in zip(values, flags, strict=True)]
        labels = [c.label for c in choices]
        if len(set(labels)) != len(labels):
            where.fail(place, f"repeats a value: {labels}")
        axes.append(_Axis(key, choices, all(isinstance(v, dict) for v in values)))
    return axes


def _row(parser: FlagParser, where: Where, place: str, i: int, axis: str, row: dict) -> _Choice:
    place = f"{place}[{i}]"
    flag_part = {k: v for k, v in row.items() if k not in ROW_KEYS}
    flags = parser.flags(where, place, flag_part)
    for key in ROW_KEYS:
        if key in row and not isinstance(row[key], str):
            where.fail(f"{place} {key}", f"must be a string, got {row[key]!r}")
    default = "-".join(_label(v) for v in flag_part.values()) or "base"
    return _Choice(((axis, row.get("name", default)),), flags, row.get("note", ""))


def _random_axes(parser: FlagParser, where: Where, table: dict) -> list[_Axis]:
    draws = {k: v for k, v in table.items() if k not in ("samples", "seed")}
    if not draws:
        if table:
            where.fail("[random]", "has no axis to draw, e.g. lr = { log-uniform = [1e-4, 1e-2] }")
        return []
    samples, seed = table.get("samples"), table.get("seed", 0)
    for key, value in (("samples", samples), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (key == "samples"):
            where.fail(f"[random] {key}", f"must be a whole number >= 1, got {value!r}")
    rng = host_rng(seed)
    drawn: dict[str, list[Any]] = {key: [] for key in draws}
    for _ in range(samples):
        for key, spec in draws.items():
            drawn[key].append(_draw(where, f"[random] {key}", spec, rng))
    choices = []
    for i in range(samples):
        flags = parser.flags(where, "[random]", {k: v[i] for k, v in drawn.items()})
        choices.append(_Choice(tuple((k, _label(v[i])) for k, v in drawn.items()), flags))
    return [_Axis("[random]", choices)]


def _draw(where: Where, place: str, spec: Any, rng: Any) -> Any:
    """One value drawn as ``spec`` says (``{ log-uniform = [low, high] }`` and the like)."""
    if not isinstance(spec, dict) or len(spec) != 1:
        where.fail(place, f"must be one of {{ {' | '.join(DISTRIBUTIONS)} = [...] }}")
    ((kind, bounds),) = spec.items()
    if kind not in DISTRIBUTIONS:
        where.fail(place, f"unknown distribution {kind!r}; one of {', '.join(DISTRIBUTIONS)}")
    if kind == "choice":
        if not isinstance(bounds, list) or not bounds:
            where.fail(place, "choice needs a non-empty list of values")
        return bounds[int(rng.integers(len(bounds)))]
    numbers = isinstance(bounds, list) and len(bounds) == 2
    numbers = numbers and all(
        isinstance(b, int | float) and not isinstance(b, bool) for b in bounds
    )
    if not numbers or not bounds[0] < bounds[1] or not all(map(math.isfinite, bounds)):
        where.fail(place, f"{kind} needs [low, high] with low < high, got {bounds!r}")
    low, high = bounds
    if kind == "int-uniform":
        if not all(isinstance(b, int) for b in bounds):
            where.fail(place, f"int-uniform needs whole numbers, got {bounds!r}")
        return int(rng.integers(low, high + 1))
    if kind == "log-uniform":
        if low <= 0:
            where.fail(place, f"log-uniform needs 0 < low < high, got {bounds!r}")
        return _round(math.exp(rng.uniform(math.log(low), math.log(high))))
    return _round(rng.uniform(low, high))


def _round(value: float) -> float:
    """``value`` to 3 significant digits."""
    return float(f"{value:.3g}")


def _check_disjoint(where: Where, axes: list[_Axis]) -> None:
    """No flag is set by two axes (which one wins would depend on their order)."""
    owner: dict[str, str] = {}
    for axis in axes:
        for flag in {f for c in axis.choices for f in c.flags}:
            if flag in owner and owner[flag] != axis.name:
                where.fail(axis.name, f"sets {flag}, which {owner[flag]} sets too: keep one")
            owner[flag] = axis.name


def _label(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


_UNSAFE = re.compile(r"[^A-Za-z0-9.+=_-]+")


def _safe(name: str, limit: int = 120) -> str:
    """A folder name: characters outside ``[A-Za-z0-9.+=_-]`` become ``-``; a long name is
    cut and given a digest of the whole."""
    safe = _UNSAFE.sub("-", name)
    if len(safe) > limit:
        safe = safe[: limit - 9] + "~" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return safe


def _dedupe(runs: list[Run]) -> list[Run]:
    """Two configurations whose names became equal (made safe for folders, or cut) get
    ``-2``, ``-3``, ... in file order; a configuration drawn twice (a ``choice`` repeated)
    is trained once."""
    seen: dict[str, tuple] = {}
    unique: dict[str, Run] = {}
    for run in runs:
        config, n = run.config, 1
        while config in seen and seen[config] != run.values:
            n += 1
            config = f"{run.config}-{n}"
        seen[config] = run.values
        run = Run(config, run.seed, run.flags, run.values, run.epochs, run.note, run.varied)
        unique.setdefault(run.name, run)
    return list(unique.values())
