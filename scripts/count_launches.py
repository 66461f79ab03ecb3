"""Launches per training step of every preset (Adam, batch 128), counted on the strict CuPy
stand-in: the eager layers (``--engine layers``), the layers with our kernels (``--engine
kernels``) and the nodes of the graph engine's captured step (``--engine graph``: one
launch per step).

    LENET_XP_FAKE_CUDA=1 python scripts/count_launches.py [--augment SPEC] [--ema DECAY]

Needs g++ (the stand-in runs our kernels in the CUDA emulator). See
:mod:`lenet_xp.benchmarks.launches` for what a launch is here.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from lenet_xp.backend import fake_cuda  # noqa: E402
from lenet_xp.benchmarks.launches import count_launches  # noqa: E402
from lenet_xp.models.presets import PRESETS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--augment", default="none")
    p.add_argument("--ema", type=float, default=0.0)
    args = p.parse_args(argv)
    if not fake_cuda():
        print("count_launches: run it on the stand-in: LENET_XP_FAKE_CUDA=1", file=sys.stderr)
        return 1
    extras = f", --augment {args.augment}" if args.augment != "none" else ""
    extras += f", --ema {args.ema:g}" if args.ema else ""
    print(f"launches per training step, Adam, batch {args.batch}{extras}:")
    print(f"{'preset':<30} {'layers':>7} {'kernels':>8} {'graph nodes':>12}")
    for arch in PRESETS:
        for output in PRESETS[arch].outputs:
            c = count_launches(arch, args.batch, args.augment, args.ema, output)
            print(f"{c.arch:<30} {c.layers:>7} {c.kernels:>8} {c.graph_nodes:>12}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
