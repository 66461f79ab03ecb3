"""A training run's configuration: one typed object, :class:`TrainConfig`, whose fields are
the one table of ``python -m lenet_xp.train``'s options (each field's metadata holds its flag:
help, type, choices). The parser (:func:`build_parser`), ``fit(**options)``
(:meth:`TrainConfig.from_options`) and a resumed checkpoint (:meth:`TrainConfig.resumed`) all
build the same object; nothing below the CLI sees argparse. ``kept`` fields are the run's
configuration a checkpoint stores (:data:`CONFIG_KEYS`): a resumed run reuses them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lenet_xp.backend import host_cores
from lenet_xp.kernels import enabled_by_default
from lenet_xp.models import presets
from lenet_xp.storage.checkpoint import CheckpointError
from lenet_xp.training import stats
from lenet_xp.training.engines import ENGINES

OPTIMIZERS = ("adam", "adamw", "sgd", "nesterov")
#: ``--recipe NAME``: flag values that go together; flags given explicitly still win.
#: ``best``: the best recipe found for the default LeNet-5, chosen on validation accuracy
#: (docs, "Augmentation": what was tried and what it reaches).
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "best": {"augment": "default,elastic=8:3", "shift": 0, "epochs": 80, "ema": 0.999},
}
SCHEDULES = ("cosine", "onecycle", "step", "constant")
#: Kept options that checkpoints written before they existed lack, with the value those
#: runs had (the other missing ones had their flag's default).
_BEFORE_THEY_EXISTED = {"shift": 0, "workers": 1}
#: Kept options a resumed run may change: ``epochs`` (the schedule is planned over the new
#: total), ``workers`` and ``engine`` (how a step runs: the same model and state).
RESUME_MAY_CHANGE = {"epochs", "workers", "engine"}


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
_non_negative_int, _non_negative_float = _number(int, 0, False), _number(float, 0, False)


def _ema_decay(text: str) -> float | None:
    """``--ema``: a decay in [0, 1); 0 turns averaging off (``None``)."""
    decay = _non_negative_float(text)
    if decay >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1 (e.g. 0.999), got {text}")
    return decay or None


def default_workers() -> int:
    """The cores this process may use, at most 4 (LeNet's batches are small)."""
    return min(4, host_cores())


def _default_device() -> str:
    return os.environ.get("LENET_XP_DEVICE", "auto")


def _default_engine() -> str:
    return "kernels" if enabled_by_default() else "layers"


def option(default: Any, help: str, *, kept: bool = False, **flag: Any) -> Any:
    """A field of :class:`TrainConfig`: its ``default`` (a callable: computed when used),
    its flag's ``help`` and argparse settings (``type``, ``choices``, ``metavar``, ``action``),
    and whether checkpoints keep it as the run's configuration."""
    metadata = {"help": help, "kept": kept, "flag": flag}
    if callable(default):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


_switch = {"action": "store_true"}


@dataclass
class TrainConfig:
    """Everything a training run is told, in the order ``train --help`` lists it."""

    device: str = option(
        _default_device,
        "cpu, cuda, cuda:N, or auto (CUDA if CuPy and a GPU answer, else CPU); default from "
        "$LENET_XP_DEVICE",
    )
    epochs: int = option(10, "passes over the training set", kept=True, type=_positive_int)
    batch_size: int = option(128, "images per step", kept=True, type=_positive_int)
    lr: float = option(2e-3, "peak learning rate", kept=True, type=_positive_float)
    optimizer: str = option("adam", "update rule", kept=True, choices=OPTIMIZERS)
    momentum: float = option(0.9, "for sgd/nesterov", kept=True, type=_non_negative_float)
    weight_decay: float = option(
        0.0, "L2 penalty (decoupled for adamw)", kept=True, type=_non_negative_float
    )
    schedule: str = option(
        "cosine",
        "learning-rate schedule over all steps: onecycle (warm-up then cosine decay), cosine "
        "decay, step (x0.1 every third of training) or constant",
        kept=True,
        choices=SCHEDULES,
    )
    shift: int = option(
        2,
        "augment: translate each training image by up to this many pixels at random",
        kept=True,
        type=int,
        choices=range(0, 5),
        metavar="{0..4}",
    )
    recipe: str = option(
        "default",
        "a set of flags that go together; best: "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in RECIPES["best"].items())
        + " (the best found, see the docs); explicit flags win",
        choices=tuple(RECIPES),
    )
    augment: str = option(
        "none",
        "distort training images on the training device: none, light, default, strong, or "
        "key=value,... (rotate, scale, shear, translate, elastic=ALPHA:SIGMA, noise); see "
        "lenet_xp/data/augment/",
        kept=True,
    )
    ema: float | None = option(
        None,
        "average the weights (exponential moving average with this decay, e.g. 0.999): the average"
        " is what is tested, chosen as best.npz and used by evaluate/predict; 0: off",
        kept=True,
        type=_ema_decay,
        metavar="DECAY",
    )
    seed: int = option(0, "seed for weights and batch order", kept=True, type=int)
    data_dir: str | None = option(None, "MNIST folder (else $LENET_XP_DATA, else cache)")
    out: str | None = option(
        None,
        "folder for last.npz, best.npz and metrics.jsonl; one run at a time (default: runs/lenet5;"
        " with --resume: the checkpoint's folder)",
    )
    save_every: int | None = option(
        None,
        "also save OUT/last.npz every N steps, mid-epoch (resumable exactly); SIGTERM and SIGINT "
        "save there too, whatever N",
        type=_positive_int,
    )
    metrics: str | None = option(
        None, "JSON-lines file, one line per epoch (default: OUT/metrics.jsonl)"
    )
    resume: str | None = option(
        None, "continue the run saved in this checkpoint (e.g. OUT/last.npz), with its config"
    )
    dtype: str = option("float32", "precision", kept=True, choices=("float32", "float64"))
    arch: str = option(
        "lenet5",
        "network preset; `--arch list` prints them all with their parameter counts",
        kept=True,
    )
    activation: str | None = option(
        None,
        "LeNet-family presets: the activation (default: the preset's own)",
        kept=True,
        choices=tuple(presets.ACTIVATIONS),
    )
    pool: str | None = option(
        None, "LeNet-family presets: pooling", kept=True, choices=presets.POOLS
    )
    batchnorm: bool = option(
        False,
        "LeNet-family presets: batch-norm after each conv and hidden fc",
        kept=True,
        **_switch,
    )
    dropout: float = option(
        0.0,
        "LeNet-family presets: dropout probability before each hidden fc",
        kept=True,
        type=_non_negative_float,
    )
    output: str = option(
        "fc",
        "lenet5-classic: a fully connected output (softmax cross-entropy) or LeCun's RBF units "
        "with the paper's loss",
        kept=True,
        choices=presets.OUTPUTS,
    )
    pad32: bool = option(
        False, "lenet5: pad images to 32x32 (LeCun 1998 input)", kept=True, **_switch
    )
    val_size: int | None = option(
        None,
        "hold out the last N training images to choose best.npz and to stop early (default: 1/12 "
        "of the training set, 5,000 of 60,000; 0: train on all, best.npz then has the lowest "
        "training loss); the test set never chooses",
        kept=True,
        type=_non_negative_int,
    )
    patience: int | None = option(
        None,
        "stop when validation accuracy has not improved for this many epochs",
        kept=True,
        type=_positive_int,
    )
    limit_train: int | None = option(
        None, "use the first N train images", kept=True, type=_positive_int
    )
    limit_test: int | None = option(
        None, "use the first N test images", kept=True, type=_positive_int
    )
    workers: int = option(
        default_workers,
        "CPU only: split each batch over this many processes, one BLAS thread each",
        kept=True,
        type=_positive_int,
    )
    eval_batch_size: int = option(2000, "images per eval batch", type=_positive_int)
    keep_every_epoch: bool = option(False, "also keep OUT/epoch_NNN.npz for each epoch", **_switch)
    engine: str = option(
        _default_engine,
        "how a training step runs: layers (the array-op layers; on the CPU over --workers "
        "processes), kernels (CUDA: the layers with our CUDA kernels behind their ops) or graph "
        "(CUDA: the layers' whole step captured once as a CUDA graph and replayed, any network); "
        "default from $LENET_XP_CUDA_KERNELS (1: kernels); a resumed run keeps its own",
        kept=True,
        choices=ENGINES,
    )
    stats_every: int = option(
        stats.DEFAULT_EVERY,
        "sample per-layer statistics (activations, gradients, update ratio) every N steps into "
        "OUT/stats.jsonl; 0: off",
        type=_non_negative_int,
    )
    tensorboard: str | None = option(
        None,
        "also write TensorBoard logs (scalars, histograms, filters) to DIR (pip install "
        '"lenet_xp[tensorboard]")',
        metavar="DIR",
    )
    report: bool = option(
        False, "at the end, write OUT/report/index.html (python -m lenet_xp.report OUT)", **_switch
    )
    quiet: bool = option(False, "no progress bar, only errors", **_switch)

    @classmethod
    def from_options(cls, **options: Any) -> TrainConfig:
        """The configuration of ``fit(**options)``: the ``recipe``'s values, then ``options``
        (the flags' names with underscores); :class:`TypeError` for an unknown one."""
        recipe = options.get("recipe", "default")
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; one of {', '.join(RECIPES)}")
        names = {f.name for f in dataclasses.fields(cls)}
        for key in options:
            if key not in names:
                raise TypeError(f"fit() got an unknown option {key!r}; see train --help")
        return cls(**{**RECIPES[recipe], **options})

    def kept(self) -> dict[str, Any]:
        """The run's configuration as checkpoints keep it: ``{option: value}``."""
        return {key: getattr(self, key) for key in CONFIG_KEYS}

    def resumed(self, saved: dict, given: Collection[str]) -> TrainConfig:
        """This configuration resuming a run whose checkpoint keeps ``saved``: its kept
        options are ``saved``'s, but ``--epochs`` if given (the schedule is then planned over
        the new total, as if the run had asked for it from the start) and ``--workers`` if
        given (:data:`RESUME_MAY_CHANGE`);
        :class:`CheckpointError` (one line) for another kept option ``given`` with another
        value than the checkpoint's."""
        for key in CONFIG_KEYS:
            if key in RESUME_MAY_CHANGE or key not in given or key not in saved:
                continue
            if getattr(self, key) != saved[key]:
                flag = "--" + key.replace("_", "-")
                raise CheckpointError(
                    f"checkpoint {self.resume} holds {flag} {saved[key]}, not {flag} "
                    f"{getattr(self, key)}: a resumed run keeps its configuration (only "
                    f"--epochs, --workers and --engine may change); drop {flag}, or start a new "
                    "run in another --out"
                )
        fresh = dataclasses.replace(self, **_BEFORE_THEY_EXISTED)
        values = {key: saved.get(key, getattr(fresh, key)) for key in CONFIG_KEYS}
        for key in RESUME_MAY_CHANGE & set(given):
            values[key] = getattr(self, key)
        return dataclasses.replace(self, **values)

    @property
    def out_dir(self) -> Path:
        """``--out``, else the folder of the ``--resume`` checkpoint, else ``runs/lenet5``."""
        if self.out is not None:
            return Path(self.out)
        return Path(self.resume).parent if self.resume else Path("runs/lenet5")

    def resume_hint(self, checkpoint: Path | str | None) -> str:
        """``resume with --resume CHECKPOINT ...`` and the flags a resumed run needs again, or
        that there is nothing to resume (``checkpoint`` ``None``: the run saved nothing)."""
        if checkpoint is None:
            return "nothing was saved, so there is nothing to resume: start again"
        hint = f"resume with --resume {checkpoint}"
        if Path(checkpoint).parent != self.out_dir:
            hint += f" --out {self.out_dir}"
        for flag, value in (("--metrics", self.metrics), ("--data-dir", self.data_dir)):
            if value:
                hint += f" {flag} {value}"
        if self.device != "auto":
            hint += f" --device {self.device}"
        return hint


#: The options a checkpoint keeps as the run's configuration (a resumed run reuses them).
CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["kept"])


class _EngineAlias(argparse.BooleanOptionalAction):
    """``--cuda-kernels`` / ``--cuda-graph`` (and their ``--no-`` forms): the engine flags of
    0.1, kept as aliases of ``--engine`` for one release."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        self.engine = kwargs.pop("engine")
        super().__init__(option_strings, "engine", default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        now = getattr(namespace, "engine", None)
        now = now if isinstance(now, str) else _default_engine()  # not set yet: the default
        if not option.startswith("--no-"):
            # --cuda-graph implies --cuda-kernels: --cuda-kernels does not undo it
            namespace.engine = "graph" if now == "graph" else self.engine
        elif now == self.engine:  # --no-cuda-X turns X off, nothing else
            namespace.engine = "layers" if self.engine == "kernels" else _default_engine()
        else:  # set all the same: given, so a resume takes it over the checkpoint's engine
            namespace.engine = now


def build_parser() -> argparse.ArgumentParser:
    """``python -m lenet_xp.train``'s parser: a flag per field of :class:`TrainConfig`."""
    p = argparse.ArgumentParser(
        prog="python -m lenet_xp.train",
        description="Train LeNet-5 on MNIST with NumPy (CPU) or CuPy (CUDA).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(flag, default=default, help=f.metadata["help"], **f.metadata["flag"])
    for engine in ("kernels", "graph"):
        p.add_argument(
            f"--cuda-{engine}",
            action=_EngineAlias,
            engine=engine,
            help=f"same as --engine {engine} (--no-cuda-{engine}: not it); the old name, "
            "kept for one release",
        )
    return p


def parse_flags(argv: Sequence[str] | None) -> tuple[TrainConfig, frozenset[str]]:
    """The configuration ``argv`` asks for (the recipe's values, then the flags given), and
    the options it sets explicitly (not by default). Exits with status 2 for a bad flag."""
    parser = build_parser()
    recipe = parser.parse_args(argv).recipe
    parser.set_defaults(**RECIPES[recipe])
    config = TrainConfig(**vars(parser.parse_args(argv)))
    unset = object()  # argparse fills in a default only where the namespace has no value yet
    namespace = argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), unset))
    parsed = vars(build_parser().parse_args(argv, namespace=namespace))
    return config, frozenset(key for key, value in parsed.items() if value is not unset)
