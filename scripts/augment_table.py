"""Accuracy with and without augmentation: train each row over several seeds and print a
README table (test accuracy mean and spread, epochs, minutes of training on this machine).

    LENET_XP_DATA=../shared/datasets/mnist python scripts/augment_table.py [--seeds 0 1 2]
    LENET_XP_DATA=../shared/datasets/mnist python scripts/augment_table.py --table archs

``--table recipes`` (the default): the default LeNet-5 with each recipe tried; ``--table
archs``: every ``--arch`` preset with the default shifts and with the best recipe's
augmentation, for the same number of epochs. Each run is ``python -m lenet_xp.train --device
DEVICE --quiet --seed S --out runs/augment[-DEVICE]/<row>_s<S> <flags>``; the test accuracy
reported is ``best.npz``'s (the epoch with the best validation accuracy: the test set
chooses nothing), and minutes are training time (testing not counted). Each run also prints
a line on stderr: its best validation accuracy and epoch, the test accuracy there and at the
last epoch. ``--device cuda`` prints the same table for a GPU (runs in runs/augment-cuda/).
"""

import argparse
import statistics
import sys

from train_runs import ROOT, train_run, training_minutes

RECIPES = [  # (row name, flags)
    ("shift", "--epochs 10"),
    ("default50", "--augment default --shift 0 --epochs 50"),
    ("best-noema", "--recipe best --ema 0 --epochs 50"),
    ("best50", "--recipe best --epochs 50"),
    ("best80", "--recipe best"),
]
ARCH_EPOCHS = 15
ARCHS = [  # (row name, flags): each trained with shifts and with the recipe's augmentation
    ("lenet5", "--arch lenet5"),
    ("nopad", "--arch lenet5-nopad"),
    ("sigmoid-avg", "--arch lenet5-sigmoid-avg --lr 5e-3"),
    ("classic", "--arch lenet5-classic"),
    ("classic-rbf", "--arch lenet5-classic --output rbf"),
    ("compact", "--arch compact-cnn"),
]
AUGMENTATIONS = [  # (row suffix, flags, what the table says)
    ("shift", "", "shifts of up to 2 px (the default)"),
    ("recipe", "--recipe best", "`--recipe best`'s: `default,elastic=8:3`, EMA 0.999"),
]


def run(
    name: str, flags: str, seed: int, device: str, reuse: bool = False
) -> tuple[float, int, float]:
    """``(test accuracy of the best-validation epoch, epochs, training minutes)``; ``reuse``:
    read a finished run instead of training it again."""
    folder = "augment" if device == "cpu" else f"augment-{device}"
    out = ROOT / "runs" / folder / f"{name}_s{seed}"
    records = train_run(out, ["--seed", str(seed), *flags.split()], device, reuse)
    best = records[-1]["best_epoch"]
    print(
        f"{name} seed {seed}: best validation {100 * records[best - 1]['val_acc']:.2f} % (epoch "
        f"{best}), test there {100 * records[best - 1]['test_acc']:.2f} %, test at the last "
        f"epoch {100 * records[-1]['test_acc']:.2f} %",
        file=sys.stderr,
        flush=True,
    )
    return records[best - 1]["test_acc"], len(records), training_minutes(records)


def summary(results: list[tuple[float, int, float]]) -> tuple[str, int, float]:
    """``(accuracy cell "mean % ± sd (each)", epochs, mean minutes)`` of one row's seeds."""
    accs = [100 * acc for acc, _, _ in results]
    spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
    each = ", ".join(f"{a:.2f}" for a in accs)
    cell = f"{statistics.mean(accs):.2f} % ± {spread:.2f} ({each})"
    return cell, results[0][1], statistics.mean(m for _, _, m in results)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--table", choices=("recipes", "archs"), default="recipes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--device", default="cpu", help="cpu or cuda: where to train")
    p.add_argument("--only", nargs="*", default=None, help="row names to run")
    p.add_argument("--reuse", action="store_true", help="read finished runs, do not retrain")
    args = p.parse_args()
    where = "CPU" if args.device == "cpu" else "GPU"
    if args.table == "recipes":  # (row name, flags, the row's first cells)
        rows = [(name, flags, f"`{flags}`") for name, flags in RECIPES]
        head = "| flags (default LeNet-5) |"
    else:
        rows = [
            (
                f"{arch}-{aug}",
                " ".join(filter(None, (flags, aug_flags, f"--epochs {ARCH_EPOCHS}"))),
                f"`{flags}` | {what}",
            )
            for arch, flags in ARCHS
            for aug, aug_flags, what in AUGMENTATIONS
        ]
        head = "| network | augmentation |"
    head += f" test accuracy, mean ± sd (seeds) | epochs | minutes ({where}) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, flags, first in rows:
        if args.only and name not in args.only:
            continue
        cell, epochs, minutes = summary(
            [run(name, flags, s, args.device, args.reuse) for s in args.seeds]
        )
        lines.append(f"| {first} | {cell} | {epochs} | {minutes:.1f} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
