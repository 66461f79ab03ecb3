"""``python -m lenet_xp.benchmarks.tree_ab A=PATH B=PATH``: the default CPU epoch of two source
trees of lenet_xp (two commits' worktrees: before and after a change), epochs alternating so
both see the same machine. Each tree trains in a process of its own (``PYTHONPATH=PATH``), which
waits between its epochs; the table gives each tree's median and the median of the paired
ratios ``B / A`` (each pair of epochs run back to back), steadier than the medians on a shared
machine whose load drifts."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

#: A tree's timing process: builds the default training loop, then times one epoch per "go".
_SERVER = """
import sys, time
from lenet_xp.backend import get_device, tune_host_allocator
tune_host_allocator()
from lenet_xp.benchmarks.timing import load_train_split, our_epoch
split, _ = load_train_split(get_device("cpu"), None, int(sys.argv[2]))
epoch, close = our_epoch(split, 128, int(sys.argv[1]))
print("ready", flush=True)
for line in sys.stdin:
    start = time.perf_counter()
    epoch()
    print(time.perf_counter() - start, flush=True)
close()
"""


def alternate(trees: dict[str, str], rounds: int, workers: int, limit: int) -> dict[str, list]:
    """Seconds of each timed epoch of each tree (name -> path), ``rounds`` each."""
    procs = {}
    try:
        for name, path in trees.items():
            env = dict(os.environ, PYTHONPATH=os.path.abspath(path))
            cmd = [sys.executable, "-c", _SERVER, str(workers), str(limit)]
            procs[name] = subprocess.Popen(
                cmd, cwd=path, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            if procs[name].stdout.readline().strip() != "ready":
                raise SystemExit(f"error: the tree {name} ({path}) could not start; see above")
        times: dict[str, list] = {name: [] for name in trees}
        for _ in range(rounds):
            for name, proc in procs.items():
                proc.stdin.write("go\n")
                proc.stdin.flush()
                times[name].append(float(proc.stdout.readline()))
        return times
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lenet_xp.benchmarks.tree_ab")
    parser.add_argument("trees", nargs=2, metavar="NAME=PATH", help="two source trees")
    parser.add_argument("--rounds", type=int, default=8, help="timed epochs of each")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit-train", type=int, default=60_000, help="first N images")
    args = parser.parse_args(argv)
    trees = dict(spec.split("=", 1) for spec in args.trees)
    times = alternate(trees, args.rounds, args.workers, args.limit_train)
    print(f"{'tree':8s} {'epoch s':>8s}  epochs (alternating, --workers {args.workers})")
    for name, seconds in times.items():
        print(
            f"{name:8s} {statistics.median(seconds):8.3f}  " + " ".join(f"{t:.2f}" for t in seconds)
        )
    first, second = times.values()
    ratio = statistics.median(b / a for a, b in zip(first, second, strict=True))
    print(f"{list(trees)[1]} / {list(trees)[0]}: {ratio:.3f} (median of the paired epochs)")


if __name__ == "__main__":
    main()
