"""Architecture x augmentation: train each row over several seeds and print the README table
(test accuracy mean and spread, best epoch chosen on validation, minutes on this machine).

    LENET_XP_DATA=../shared/datasets/mnist python scripts/augment_table.py [--seeds 0 1 2]

Each run is ``python -m lenet_xp.train --device cpu --quiet --seed S --out
runs/augment/<row>_s<S> <flags>``; the test accuracy reported is ``best.npz``'s (the epoch
with the best validation accuracy: the test set chooses nothing), and minutes are training
time (testing not counted).
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = [  # (row name, flags)
    ("shift", "--epochs 10"),
    ("default50", "--augment default --shift 0 --epochs 50"),
    ("best-noema", "--recipe best --ema 0 --epochs 50"),
    ("best50", "--recipe best --epochs 50"),
    ("best80", "--recipe best"),
]


def run(name: str, flags: str, seed: int) -> tuple[float, int, float]:
    """``(test accuracy of the best-validation epoch, epochs, training minutes)``."""
    out = ROOT / "runs" / "augment" / f"{name}_s{seed}"
    cmd = [sys.executable, "-m", "lenet_xp.train", "--device", "cpu", "--quiet"]
    cmd += ["--seed", str(seed), "--out", str(out), *flags.split()]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} seed {seed}: {proc.stderr.strip()}")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    best = records[-1]["best_epoch"]
    minutes = sum(r["train_seconds"] for r in records) / 60
    return records[best - 1]["test_acc"], len(records), minutes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="*", default=None, help="row names to run")
    args = p.parse_args()
    lines = [
        "| flags (default LeNet-5) | test accuracy, mean ± sd (seeds) | epochs | minutes (CPU) |",
        "|---|---:|---:|---:|",
    ]
    for name, flags in ROWS:
        if args.only and name not in args.only:
            continue
        results = [run(name, flags, seed) for seed in args.seeds]
        accs = [100 * acc for acc, _, _ in results]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        each = ", ".join(f"{a:.2f}" for a in accs)
        minutes = statistics.mean(m for _, _, m in results)
        lines.append(
            f"| `{flags}` | {statistics.mean(accs):.2f} % ± {spread:.2f} ({each}) | "
            f"{results[0][1]} | {minutes:.1f} |"
        )
        print(lines[-1], flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
