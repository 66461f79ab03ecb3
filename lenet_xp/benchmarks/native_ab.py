"""``python -m lenet_xp.benchmarks.native_ab``: the default CPU epoch with the compiled kernels
(:mod:`lenet_xp.native`) and without, epochs alternating in one process so both see the same
machine (a shared machine's load drifts more between runs than between epochs).

Two copies of the training loop are built, one with ``LENET_XP_NATIVE=1`` and one with ``0``
(their worker processes inherit the setting); this process sets it before each epoch."""

from __future__ import annotations

import argparse
import os
import statistics
import time

from lenet_xp import native
from lenet_xp.backend import get_device, tune_host_allocator
from lenet_xp.benchmarks.timing import load_train_split, our_epoch
from lenet_xp.training.config import default_workers


def alternate(workers: int, rounds: int, limit: int, batch: int = 128) -> dict[str, list[float]]:
    """Seconds of each timed epoch: ``{"native": [...], "numpy": [...]}``, ``rounds`` each."""
    split, _ = load_train_split(get_device("cpu"), None, limit)
    kept = os.environ.get("LENET_XP_NATIVE")
    runs, times = {}, {"native": [], "numpy": []}
    try:
        for name, setting in (("native", "1"), ("numpy", "0")):
            os.environ["LENET_XP_NATIVE"] = setting
            native.reread()
            runs[name] = (setting, *our_epoch(split, batch, workers))
        for _ in range(rounds):
            for name, (setting, epoch, _close) in runs.items():
                os.environ["LENET_XP_NATIVE"] = setting
                native.reread()
                start = time.perf_counter()
                epoch()
                times[name].append(time.perf_counter() - start)
    finally:
        for _setting, _epoch, close in runs.values():
            close()
        if kept is None:
            os.environ.pop("LENET_XP_NATIVE", None)
        else:
            os.environ["LENET_XP_NATIVE"] = kept
        native.reread()
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lenet_xp.benchmarks.native_ab")
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--rounds", type=int, default=5, help="timed epochs of each")
    parser.add_argument("--limit-train", type=int, default=60_000, help="first N images")
    args = parser.parse_args(argv)
    tune_host_allocator()  # as training does
    times = alternate(args.workers, args.rounds, args.limit_train)
    native, numpy = (statistics.median(times[name]) for name in ("native", "numpy"))
    print(f"{'path':8s} {'epoch s':>8s}  epochs (alternating, --workers {args.workers})")
    for name, median in (("native", native), ("numpy", numpy)):
        print(f"{name:8s} {median:8.3f}  " + " ".join(f"{t:.2f}" for t in times[name]))
    print(f"the compiled kernels take {100 * (1 - native / numpy):.1f} % off the epoch")


if __name__ == "__main__":
    main()
