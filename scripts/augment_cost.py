"""Milliseconds per batch of ``augment_batch`` for each spec, as training runs it (one BLAS
thread, the tuned host allocator), on the CPU:

    python scripts/augment_cost.py [--specs default default,elastic=8:3] [--batch 128]

Prints a table: spec, best and median over ``--repeat`` batches of random images.
"""

import argparse
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_limits

from lenet_xp.backend import tune_host_allocator
from lenet_xp.data.augment import augment_batch, parse_augment


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--specs", nargs="+", default=["light", "default", "default,elastic=8:3"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeat", type=int, default=300)
    args = p.parse_args()
    tune_host_allocator()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 1, 28, 28)).astype(np.float32)
    ids = rng.permutation(55_000)[: args.batch]
    print(f"{'spec':<24} {'best ms':>8} {'median ms':>10}   (batch {args.batch}, CPU, 1 thread)")
    with threadpool_limits(limits=1, user_api="blas"):
        for spec in args.specs:
            aug, times = parse_augment(spec), []
            for epoch in range(args.repeat):
                start = time.perf_counter()
                augment_batch(x, aug, ids, seed=0, epoch=epoch)
                times.append(1000 * (time.perf_counter() - start))
            print(f"{spec:<24} {min(times):>8.2f} {statistics.median(times):>10.2f}")


if __name__ == "__main__":
    main()
