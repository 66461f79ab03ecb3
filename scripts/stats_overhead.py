"""What recording per-layer statistics (``train --stats-every N``,
:mod:`lenet_xp.training.stats`) costs.

    LENET_XP_DATA=../shared/datasets/mnist python scripts/stats_overhead.py [--device cpu]

Two measurements with the real training loop (``train.train_epoch``, default LeNet-5, batch
128, Adam, the CPU's worker processes), each alternating with and without statistics so both
see the same machine, device-synchronised, medians:

1. the cost of one sample: 100 steps with every step sampled (``every=1``) against 100 steps
   without statistics; the overhead of an epoch is then (steps / N) samples of that cost;
2. whole epochs on the training set with ``--stats-every N`` against none (noisier: it is
   the small difference of two large numbers).
"""

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lenet_xp.backend import get_device, host_rng, synchronize, use_device
from lenet_xp.bench import load_train_split
from lenet_xp.data.device_split import DeviceSplit
from lenet_xp.models.lenet5 import LeNet5
from lenet_xp.optim.optimizers import Adam
from lenet_xp.optim.schedules import ConstantLR
from lenet_xp.train import train_epoch
from lenet_xp.training.config import default_workers
from lenet_xp.training.parallel import DataParallel
from lenet_xp.training.stats import DEFAULT_EVERY, LayerStats

BATCH = 128


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--every", type=int, default=DEFAULT_EVERY, help="--stats-every to price")
    p.add_argument("--rounds", type=int, default=5, help="alternations of each measurement")
    p.add_argument("--workers", type=int, default=default_workers())
    args = p.parse_args()
    device = get_device(args.device)
    with use_device(device):
        split, source = load_train_split(device, args.data_dir)
        model = LeNet5(seed=0).to(device)
        workers = args.workers if device.kind == "cpu" else 1
        runner = DataParallel(model, workers, BATCH)
        optimizer, rng = Adam(model.parameters(), lr=1e-3), host_rng(0)
        folder = Path(tempfile.mkdtemp())

        def timed(data: DeviceSplit, stats: LayerStats | None) -> float:
            synchronize(device)
            start = time.perf_counter()
            on_step = None if stats is None else stats.after_step
            schedule = ConstantLR(1e-3)
            train_epoch(runner, optimizer, schedule, data, BATCH, rng, 0, None, 2, on_step=on_step)
            if stats is not None:
                stats.end_epoch(1)
                stats.close()  # unwrap the layers a sample armed after the last step
            synchronize(device)
            return time.perf_counter() - start

        short = DeviceSplit(split.images[: 100 * BATCH], split.labels[: 100 * BATCH], device)
        every_step = LayerStats(model, folder / "every_step.jsonl", every=1)
        timed(short, every_step), timed(short, None)  # warm-up
        with_s, without_s = [], []
        for _ in range(args.rounds):
            with_s.append(timed(short, every_step))
            without_s.append(timed(short, None))
        sample = (statistics.median(with_s) - statistics.median(without_s)) / 100
        sampled = LayerStats(model, folder / "sampled.jsonl", every=args.every)
        epochs_with, epochs_without = [], []
        for _ in range(args.rounds):
            epochs_with.append(timed(split, sampled))
            epochs_without.append(timed(split, None))
        runner.close()
    steps = math.ceil(len(split) / BATCH)
    epoch = statistics.median(epochs_without)
    estimate = steps / args.every * sample / epoch
    measured = statistics.median(epochs_with) / epoch - 1
    print(f"stats overhead on {device} ({workers} workers), {len(split):,} images ({source})")
    print(f"one sample: {1e3 * sample:.2f} ms (every step sampled vs none, 100 steps)")
    print(f"epoch without statistics: {epoch:.2f} s, {steps} steps (median of {args.rounds})")
    print(
        f"--stats-every {args.every}: {steps // args.every} samples an epoch, estimated "
        f"overhead {100 * estimate:.2f} %; whole epochs measured: {100 * measured:+.2f} %"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
