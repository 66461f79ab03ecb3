"""The command line of ``python -m lenet_xp.train``: its flags, their checks and the recipes.

:func:`build_parser` is the whole interface; ``CONFIG_KEYS`` are the flags a checkpoint keeps
as the run's configuration (a resumed run reuses them).
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

from lenet_xp import kernels
from lenet_xp.models import presets
from lenet_xp.training import stats

OPTIMIZERS = ("adam", "adamw", "sgd", "nesterov")
#: ``--recipe NAME``: flag values that go together; flags given explicitly still win.
#: ``best``: the best recipe found for the default LeNet-5, chosen on validation accuracy
#: (README, "Augmentation": what was tried and what it reaches).
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "best": {"augment": "default,elastic=8:3", "shift": 0, "epochs": 80, "ema": 0.999},
}
SCHEDULES = ("cosine", "onecycle", "step", "constant")


def _number(kind: type, minimum: float, strict: bool) -> Any:
    """An argparse type: a finite ``kind`` above ``minimum`` (or equal to it, if not strict)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            relation = ">" if strict else ">="
            raise argparse.ArgumentTypeError(f"must be {relation} {minimum:g}, got {text}")
        return value

    return parse


_positive_int, _positive_float = _number(int, 0, True), _number(float, 0, True)
_non_negative_float = _number(float, 0, False)


def _ema_decay(text: str) -> float | None:
    """``--ema``: a decay in [0, 1); 0 turns averaging off (``None``)."""
    decay = _non_negative_float(text)
    if decay >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1 (e.g. 0.999), got {text}")
    return decay or None


def default_workers() -> int:
    """The cores this process may use, at most 4 (LeNet's batches are small)."""
    try:
        return max(1, min(4, len(os.sched_getaffinity(0))))
    except AttributeError:  # not Linux
        return max(1, min(4, os.cpu_count() or 1))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lenet_xp.train",
        description="Train LeNet-5 on MNIST with NumPy (CPU) or CuPy (CUDA).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--device",
        default=os.environ.get("LENET_XP_DEVICE", "auto"),
        help="cpu, cuda, cuda:N, or auto (CUDA if CuPy and a GPU answer, else CPU); "
        "default from $LENET_XP_DEVICE",
    )
    p.add_argument("--epochs", type=_positive_int, default=10, help="passes over the training set")
    p.add_argument("--batch-size", type=_positive_int, default=128, help="images per step")
    p.add_argument("--lr", type=_positive_float, default=2e-3, help="peak learning rate")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="update rule")
    p.add_argument("--momentum", type=_non_negative_float, default=0.9, help="for sgd/nesterov")
    p.add_argument(
        "--weight-decay",
        type=_non_negative_float,
        default=0.0,
        help="L2 penalty (decoupled for adamw)",
    )
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="cosine",
        help="learning-rate schedule over all steps: onecycle (warm-up then cosine decay), "
        "cosine decay, step (x0.1 every third of training) or constant",
    )
    p.add_argument(
        "--shift",
        type=int,
        choices=range(0, 5),
        default=2,
        metavar="{0..4}",
        help="augment: translate each training image by up to this many pixels at random",
    )
    p.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default="default",
        help="a set of flags that go together; best: "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in RECIPES["best"].items())
        + " (the best found, see the README); explicit flags win",
    )
    p.add_argument(
        "--augment",
        default="none",
        help="distort training images on the training device: none, light, default, strong, "
        "or key=value,... (rotate, scale, shear, translate, elastic=ALPHA:SIGMA, noise); "
        "see lenet_xp/data/augment/",
    )
    p.add_argument(
        "--ema",
        type=_ema_decay,
        default=None,
        metavar="DECAY",
        help="average the weights (exponential moving average with this decay, e.g. 0.999): "
        "the average is what is tested, chosen as best.npz and used by evaluate/predict; "
        "0: off",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for weights and batch order")
    p.add_argument(
        "--data-dir", default=None, help="MNIST folder (else $LENET_XP_DATA, else cache)"
    )
    p.add_argument(
        "--out",
        default=None,
        help="folder for last.npz, best.npz and metrics.jsonl; one run at a time (default: "
        "runs/lenet5; with --resume: the checkpoint's folder)",
    )
    p.add_argument(
        "--save-every",
        type=_positive_int,
        default=None,
        help="also save OUT/last.npz every N steps, mid-epoch (resumable exactly); SIGTERM and "
        "SIGINT save there too, whatever N",
    )
    p.add_argument(
        "--metrics",
        default=None,
        help="JSON-lines file, one line per epoch (default: OUT/metrics.jsonl)",
    )
    p.add_argument(
        "--resume",
        default=None,
        help="continue the run saved in this checkpoint (e.g. OUT/last.npz), with its config",
    )
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="precision")
    p.add_argument(
        "--arch",
        default="lenet5",
        help="network preset; `--arch list` prints them all with their parameter counts",
    )
    p.add_argument(
        "--activation",
        choices=tuple(presets.ACTIVATIONS),
        default=None,
        help="LeNet-family presets: the activation (default: the preset's own)",
    )
    p.add_argument(
        "--pool", choices=presets.POOLS, default=None, help="LeNet-family presets: pooling"
    )
    p.add_argument(
        "--batchnorm",
        action="store_true",
        help="LeNet-family presets: batch-norm after each conv and hidden fc",
    )
    p.add_argument(
        "--dropout",
        type=_non_negative_float,
        default=0.0,
        help="LeNet-family presets: dropout probability before each hidden fc",
    )
    p.add_argument(
        "--output",
        choices=presets.OUTPUTS,
        default="fc",
        help="lenet5-classic: a fully connected output (softmax cross-entropy) or LeCun's RBF "
        "units with the paper's loss",
    )
    p.add_argument(
        "--pad32", action="store_true", help="lenet5: pad images to 32x32 (LeCun 1998 input)"
    )
    p.add_argument(
        "--val-size",
        type=_number(int, 0, False),
        default=None,
        help="hold out the last N training images to choose best.npz and to stop early "
        "(default: 1/12 of the training set, 5,000 of 60,000; 0: train on all, best.npz then "
        "has the lowest training loss); the test set never chooses",
    )
    p.add_argument(
        "--patience",
        type=_positive_int,
        default=None,
        help="stop when validation accuracy has not improved for this many epochs",
    )
    p.add_argument(
        "--limit-train", type=_positive_int, default=None, help="use the first N train images"
    )
    p.add_argument(
        "--limit-test", type=_positive_int, default=None, help="use the first N test images"
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=default_workers(),
        help="CPU only: split each batch over this many processes, one BLAS thread each",
    )
    p.add_argument(
        "--eval-batch-size", type=_positive_int, default=2000, help="images per eval batch"
    )
    p.add_argument(
        "--keep-every-epoch", action="store_true", help="also keep OUT/epoch_NNN.npz for each epoch"
    )
    p.add_argument(
        "--cuda-kernels",
        action=argparse.BooleanOptionalAction,
        default=kernels.enabled_by_default(),
        help="CUDA: train with our own kernels (a fused step of about 35 launches) instead of "
        "the array-op layers; default from $LENET_XP_CUDA_KERNELS (off until checked on a GPU)",
    )
    p.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="CUDA: capture the fused training step once as a CUDA graph and replay it per "
        "batch (implies --cuda-kernels)",
    )
    p.add_argument(
        "--stats-every",
        type=_number(int, 0, False),
        default=stats.DEFAULT_EVERY,
        help="sample per-layer statistics (activations, gradients, update ratio) every N "
        "steps into OUT/stats.jsonl; 0: off",
    )
    p.add_argument(
        "--tensorboard",
        default=None,
        metavar="DIR",
        help="also write TensorBoard logs (scalars, histograms, filters) to DIR "
        '(pip install "lenet_xp[tensorboard]")',
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="at the end, write OUT/report/index.html (python -m lenet_xp.report OUT)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar, only errors")
    return p


CONFIG_KEYS = (
    "epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "schedule", "seed",
    "dtype", "pad32", "shift", "val_size", "limit_train", "limit_test", "workers", "arch",
    "activation", "pool", "batchnorm", "dropout", "output", "patience", "augment", "ema",
)  # fmt: skip
