"""``python -m lenet_xp.sweep SWEEP.toml --out DIR``: many training runs as one command, on
this machine or a Ray cluster, resumable, with the table and the picture.

Every run is an ordinary ``lenet_xp.train`` run in ``DIR/<configuration>_seed=<S>/`` (its
flags in ``run.json`` there), so ``evaluate``, ``report``, ``serve`` and ``export`` work on
it unchanged. A finished run is read back, never trained again; an interrupted one resumes
from its ``last.npz``; so the same command, run again after a crash, a signal or a lost
node, finishes the sweep. It writes ``DIR/results.csv``, ``DIR/summary.md`` and
``DIR/sweep.png``. The sweep file's format: :mod:`lenet_xp.sweep.spec`; docs/sweeps.md.

From Python: ``lenet_xp.sweep.run("sweeps/presets.toml", "runs/presets")`` (or a dict
instead of the file) returns the runs' :class:`~lenet_xp.sweep.results.Result`.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lenet_xp.sweep import places
from lenet_xp.sweep.asha import AshaScheduler
from lenet_xp.sweep.execute import RUN_FILE, Outcome, read_json
from lenet_xp.sweep.picture import PictureError, write_picture
from lenet_xp.sweep.results import (
    DONE,
    FAILED,
    Result,
    best_config,
    read_result,
    read_results,
    summarize,
    write_csv,
    write_summary,
)
from lenet_xp.sweep.spec import Run, Sweep, SweepError, SweepFileError, check_device, load
from lenet_xp.training.runlock import RunLock, RunLockError

__all__ = ["Result", "Sweep", "SweepError", "load", "main", "run"]

LOCK_NAME = ".sweep.lock"


class _Signals:
    """SIGINT/SIGTERM while runs train (main thread only): the first stops the sweep (each
    training saves its ``last.npz``), the second as well (the runs are already stopping)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = self.received or signum


def run(
    sweep: str | Path | Mapping[str, Any] | Sweep,
    out: str | Path,
    *,
    jobs: int | None = None,
    ray: str | None = None,
    cpus_per_run: float | None = None,
    gpus_per_run: float | None = None,
    seeds: list[int] | None = None,
    only: list[str] | None = None,
    quiet: bool = False,
) -> list[Result]:
    """Train every run of ``sweep`` (a file, a dict of its shape, or a loaded :class:`Sweep`)
    not yet finished under ``out``, then write ``results.csv``, ``summary.md`` and
    ``sweep.png`` there; returns every run's :class:`Result` in the file's order.

    ``jobs``, ``cpus_per_run``, ``gpus_per_run``: how runs share this machine (defaults:
    :func:`lenet_xp.sweep.places.local_placement`); ``ray``: a Ray address (``auto``,
    ``local`` or ``HOST:PORT``) to run each as a Ray task instead; ``seeds`` replaces the
    file's; ``only``: train only these configurations (the others are read back).
    Raises :class:`SweepError` (one line) for a bad sweep or output folder; a run that fails
    does not raise: its result says ``failed`` and why. Stopped by SIGINT/SIGTERM, it raises
    ``KeyboardInterrupt`` once every running training has saved."""
    if not isinstance(sweep, Sweep):
        sweep = load(sweep, seeds)
    if ray and jobs:
        raise SweepError(
            "--jobs sizes local runs; with --ray, Ray places them: size each run with "
            "--cpus-per-run and --gpus-per-run"
        )
    out = Path(out)
    say = (lambda line: None) if quiet else (lambda line: print(line, flush=True))
    try:
        with RunLock(out, LOCK_NAME, "sweep"):
            return _run(sweep, out, jobs, ray, cpus_per_run, gpus_per_run, only, say)
    except RunLockError as exc:
        raise SweepError(str(exc)) from None


def _run(
    sweep: Sweep, out: Path, jobs: int | None, ray_address: str | None, cpus: float | None,
    gpus: float | None, only: list[str] | None, say: Any,
) -> list[Result]:  # fmt: skip
    _check_folders(sweep, out)
    _check_only(sweep, only)
    results = read_results(sweep, out)
    todo = [r.run for r in results if r.status not in DONE and (not only or r.run.config in only)]
    if ray_address:
        ray = places.connect_ray(ray_address)
        placement = places.ray_placement(ray, sweep.device, cpus, gpus)
    else:
        placement = places.local_placement(sweep.device, jobs, cpus, gpus)
    done = sum(r.status in DONE for r in results)
    say(
        f"sweep {sweep.source}: {len(results)} runs: {done} done (read back, not trained "
        f"again), {len(todo)} to train ({sum(r.status != 'pending' for r in results) - done} "
        f"resumed or retried); {'Ray: ' if ray_address else ''}{placement.describe()}"
    )
    by_name = {run.name: run for run in todo}
    tasks = [(run.name, _task_maker(placement, out, run)) for run in todo]
    asha = AshaScheduler(sweep.asha, out, sweep.runs) if sweep.asha else None
    with _Signals() as signals:
        stop = lambda: signals.received is not None  # noqa: E731
        tick = _ticker(asha, say)
        if ray_address:
            ended = places.run_ray(ray, placement, tasks, stop, tick)
        else:
            ended = places.run_local(placement, tasks, stop, tick)
        for count, (name, outcome) in enumerate(ended, 1):
            if asha is not None:  # before the next look at the running ones
                asha.ended(name)
            say(f"[{count}/{len(todo)}] {_outcome_line(out, by_name[name], outcome)}")
    results = read_results(sweep, out)
    _write_outputs(sweep, results, out, say)
    if signals.received is not None:
        raise KeyboardInterrupt(signals.received)
    return results


def _task_maker(placement: places.Placement, out: Path, run: Run) -> Any:
    return lambda slot: placement.task(str(out / run.name), run.flags, run.seed, slot)


def _ticker(asha: AshaScheduler | None, say: Any) -> Any:
    def tick(running: list[str]) -> None:
        for name in running if asha else []:
            if line := asha.check(name):
                say(f"{name}: {line}")

    return tick


def _check_folders(sweep: Sweep, out: Path) -> None:
    """Each run's folder holds nothing, or a run of this very configuration and seed."""
    for run in sweep.runs:
        info = read_json(out / run.name / RUN_FILE)
        if info is None:
            if (out / run.name / "last.npz").exists():
                raise SweepError(
                    f"{out / run.name} holds a run this sweep did not start (no {RUN_FILE}): "
                    "choose another --out or move that folder"
                )
            continue
        if info.get("flags") != list(run.flags) or info.get("seed") != run.seed:
            raise SweepError(
                f"{out / run.name} holds a run with other flags ({' '.join(info.get('flags', []))}"
                f"; seed {info.get('seed')}): the sweep file changed; choose another --out or "
                "remove that folder"
            )


def _check_only(sweep: Sweep, only: list[str] | None) -> None:
    configs = sweep.configs()
    for name in only or []:
        if name not in configs:
            raise SweepError(
                f"--only {name}: no such configuration; they are: {', '.join(configs)}"
            )


def _outcome_line(out: Path, run: Run, outcome: Outcome | None) -> str:
    result = read_result(out / run.name, run)
    if outcome is None:
        return f"{run.name}: not started (the sweep was stopped)"
    best = result.best
    if result.status in DONE and best is not None:
        val = f"validation {100 * best['val_acc']:.2f} %, " if "val_acc" in best else ""
        how = "resumed and finished" if outcome.resumed else "finished"
        if result.status != "finished":
            how = f"stopped early after {len(result.history)} epochs"
        return (
            f"{run.name}: {how}: {val}test {100 * best['test_acc']:.2f} % (epoch "
            f"{best['epoch']}), {result.minutes:.1f} min, {best.get('device', '')}"
        )
    if result.status == FAILED:
        return f"{run.name}: failed: {result.error}"
    return f"{run.name}: {result.status} after {len(result.history)} epochs (saved; it resumes)"


def _write_outputs(sweep: Sweep, results: list[Result], out: Path, say: Any) -> None:
    write_csv(sweep, results, out / "results.csv")
    write_summary(sweep, results, out / "summary.md")
    try:
        write_picture(sweep, results, out / "sweep.png")
        picture = f", {out / 'sweep.png'}"
    except PictureError as exc:
        picture = f" (no picture: {exc})"
    say(f"wrote {out / 'results.csv'}, {out / 'summary.md'}{picture}")
    best = best_config(summarize(results))
    if best is not None:
        say(f"best configuration (validation): {best.config}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lenet_xp.sweep",
        description="Train every run of a sweep file (a grid, random draws, seeds) and write "
        "results.csv, summary.md and sweep.png; run it again to finish an interrupted sweep.",
    )
    p.add_argument("sweep", help="the sweep file (TOML; see docs/sweeps.md)")
    p.add_argument("--out", required=True, help="folder of the runs and the results")
    p.add_argument(
        "--jobs",
        type=_positive(int),
        default=None,
        help="runs at once on this machine (default: one per core, or per GPU)",
    )
    p.add_argument("--cpus-per-run", type=_positive(float), default=None,
                   help="cores each run uses (--workers, BLAS threads); default: cores / jobs, "
                   "1 with Ray")  # fmt: skip
    p.add_argument(
        "--gpus-per-run",
        type=_positive(float),
        default=None,
        help="GPUs each run uses, e.g. 0.25: four runs per GPU (default 1)",
    )
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run each run as a Ray task: auto (this machine's cluster), local (start "
                   "Ray here) or HOST:PORT; --out must be on a path every node shares")  # fmt: skip
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:N or auto: replaces the file's [train] device",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="replace the file's seeds")
    p.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="CONFIG",
        help="train only these configurations (as summary.md names them)",
    )
    p.add_argument(
        "--list",
        action="store_true",
        help="print each run, its state and its command; train nothing",
    )
    p.add_argument("--quiet", action="store_true", help="print only errors")
    return p


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _list(sweep: Sweep, out: Path) -> None:
    for result in read_results(sweep, out):
        print(f"{result.run.name}  [{result.status}]  {result.run.command(sweep.device)}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sweep = load(args.sweep, args.seeds)
        if args.device:
            sweep.device = check_device(args.device, "--device")
        if args.list:
            _list(sweep, Path(args.out))
            return 0
        results = run(
            sweep, args.out, jobs=args.jobs, ray=args.ray, cpus_per_run=args.cpus_per_run,
            gpus_per_run=args.gpus_per_run, only=args.only, quiet=args.quiet,
        )  # fmt: skip
    except SweepError as exc:
        print(f"lenet_xp.sweep: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, SweepFileError) else 1
    except KeyboardInterrupt as exc:
        signum = exc.args[0] if exc.args else signal.SIGINT
        print(
            f"lenet_xp.sweep: stopped by {signal.Signals(signum).name}; the runs saved where "
            "they were: run the same command again to finish the sweep",
            file=sys.stderr,
        )
        return 128 + signum
    failed = sum(r.status == FAILED for r in results)
    if failed:
        print(
            f"lenet_xp.sweep: {failed} of {len(results)} runs failed (summary.md says why); "
            "run the same command again to retry them",
            file=sys.stderr,
        )
        return 1
    return 0
