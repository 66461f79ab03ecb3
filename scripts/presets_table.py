"""Train every ``--arch`` preset with the command in its row and print the README table:
this project's test accuracy, epochs and minutes next to what the lab report or paper says.

    LENET_XP_DATA=../shared/datasets/mnist python scripts/presets_table.py [--only NAME ...]

Each row runs ``python -m lenet_xp.train --device cpu --quiet --out runs/presets/<row>
<flags>`` (the same command, copied from the table, reproduces it); minutes are training
time (the metrics' train_seconds; testing not counted).
"""

import argparse
import sys

from train_runs import ROOT, train_run, training_minutes

# (row name, flags, what the report/paper reached and how long it took)
ROWS = [
    ("lenet5", "--arch lenet5 --epochs 10", "the default run (see above)"),
    (
        "lenet5-pad32",
        "--arch lenet5 --pad32 --epochs 3",
        "report B (32x32 in): 98.59 %, 30 epochs at 9-11 s (GPU)",
    ),
    (
        "lenet5-classic",
        "--arch lenet5-classic --epochs 10",
        "LeCun 1998: 99.05 % (0.95 % error), 20 passes",
    ),
    (
        "lenet5-classic-rbf",
        "--arch lenet5-classic --output rbf --epochs 10",
        "LeCun 1998: 99.05 % (0.95 % error), 20 passes",
    ),
    (
        "lenet5-nopad",
        "--arch lenet5-nopad --epochs 6",
        "reports A/C: 98.61 % in ~30 min CPU / 98.2 % in 10 epochs",
    ),
    (
        "lenet5-sigmoid-avg",
        "--arch lenet5-sigmoid-avg --epochs 10 --lr 5e-3",
        "report D: 98.17 %, 50 epochs at 5-13 min each (CPU)",
    ),
    ("compact-cnn", "--arch compact-cnn --epochs 5", "report E: 97.01 % in 3 h 23 min (CPU)"),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="*", default=None, help="row names to run")
    p.add_argument("--reuse", action="store_true", help="read finished runs, do not retrain")
    args = p.parse_args()
    lines = [
        "| preset and flags | test accuracy | epochs | minutes (CPU) | report / paper |",
        "|---|---:|---:|---:|---|",
    ]
    for name, flags, claim in ROWS:
        if args.only and name not in args.only:
            continue
        records = train_run(ROOT / "runs" / "presets" / name, flags.split(), reuse=args.reuse)
        minutes = training_minutes(records)
        acc = 100 * records[-1]["test_acc"]
        lines.append(f"| `{flags}` | {acc:.2f} % | {len(records)} | {minutes:.1f} | {claim} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
