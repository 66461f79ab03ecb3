"""``python -m lenet_xp.training.distributed.bench``: ``--workers N`` (shared memory, one process
tree) against ``mpiexec -n N`` (MPI ranks) on this machine, and both against one process, in
one run, rounds alternating.

Each round trains the same run (``--limit-train`` images, float32, ``--batch-size``) once
each way through the real CLI and reads the last epoch's images/s from its
``metrics.jsonl`` (the first epoch is warm-up); the medians and their ratio are printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def _train(launcher: list[str], flags: list[str], out: Path) -> float:
    """Images/s of the last epoch of one run launched by ``launcher`` with ``flags``."""
    cmd = [*launcher, sys.executable, "-m", "lenet_xp.train", *flags, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}")
    last = (out / "metrics.jsonl").read_text().splitlines()[-1]
    return json.loads(last)["images_per_second"]


def compare(processes: int, rounds: int, flags: list[str]) -> dict[str, list[float]]:
    """``{"one": [img/s per round], "workers": [...], "mpi": [...]}``: one process, then
    ``processes`` of them as workers and as MPI ranks."""
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or "mpiexec"
    ways = {
        "one": ([], [*flags, "--workers", "1"]),
        "workers": ([], [*flags, "--workers", str(processes)]),
        "mpi": ([mpiexec, "-n", str(processes)], [*flags, "--workers", "1"]),
    }
    speeds: dict[str, list[float]] = {name: [] for name in ways}
    with tempfile.TemporaryDirectory() as scratch:
        for index in range(rounds):
            for name, (launcher, their_flags) in ways.items():
                out = Path(scratch) / f"{name}{index}"
                speeds[name].append(_train(launcher, their_flags, out))
    return speeds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lenet_xp.training.distributed.bench", description=__doc__
    )
    p.add_argument("--processes", type=int, default=2, help="workers, and MPI ranks")
    p.add_argument("--rounds", type=int, default=3, help="runs of each, alternating")
    p.add_argument("--limit-train", type=int, default=12000, help="training images per epoch")
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args(argv)
    flags = ["--device", "cpu", "--quiet", "--epochs", "2", "--val-size", "0"]
    flags += ["--limit-train", str(args.limit_train), "--limit-test", "1000"]
    flags += ["--batch-size", str(args.batch_size), "--stats-every", "0"]
    try:
        speeds = compare(args.processes, args.rounds, flags)
    except RuntimeError as exc:
        print(f"lenet_xp.training.distributed.bench: error: {exc}", file=sys.stderr)
        return 1
    medians = {name: statistics.median(values) for name, values in speeds.items()}
    for name, values in speeds.items():
        runs = ", ".join(f"{v:,.0f}" for v in values)
        print(f"{name:>8}: median {medians[name]:,.0f} img/s  (runs: {runs})")
    print(f"mpi / workers: {medians['mpi'] / medians['workers']:.3f}")
    print(f"speed-up over one process: workers {medians['workers'] / medians['one']:.2f}, "
          f"mpi {medians['mpi'] / medians['one']:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
