"""Named networks for ``--arch``: each preset is one short function here, nothing else to edit.

A preset builds a :class:`~lenet_xp.layers.Sequential` with named layers from
:class:`Options`; the training CLI stores the arch name and options in every checkpoint, so
``evaluate``, ``predict`` and ``plots`` rebuild the same network with :func:`build_from_config`.

Add one: write ``def my_net(o: Options) -> Sequential`` under ``@preset("my-net", "what it
is")``. LeNet-family presets honour ``--activation``, ``--pool``, ``--batchnorm`` and
``--dropout``; the others refuse them with one line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

from lenet_xp.backend import host_rng
from lenet_xp.functional.loss import rbf_loss
from lenet_xp.layers import (
    LENET5_C3_TABLE,
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Dropout,
    Flatten,
    LeakyReLU,
    LeCunTanh,
    Linear,
    MaxPool2d,
    Module,
    PartialConv2d,
    RBFOutput,
    ReLU,
    Sequential,
    Sigmoid,
    Tanh,
    TrainableSubsampling,
)
from lenet_xp.models.lenet5 import LeNet5

ACTIVATIONS: dict[str, Callable[[], Module]] = {
    "relu": lambda: ReLU(inplace=True),
    "leaky_relu": lambda: LeakyReLU(0.01, inplace=True),
    "sigmoid": Sigmoid,
    "tanh": Tanh,
    "lecun_tanh": LeCunTanh,
}
POOLS = ("max", "avg")
OUTPUTS = ("fc", "rbf")


class PresetError(ValueError):
    """An unknown preset or an option it does not take; the message says which."""


@dataclass(frozen=True)
class Options:
    """What a preset may be asked for (``None``: the preset's own choice)."""

    activation: str | None = None
    pool: str | None = None
    batchnorm: bool = False
    dropout: float = 0.0
    output: str = "fc"
    pad32: bool = False  # lenet5 only: images padded to 32x32, conv1 unpadded
    seed: int | None = 0
    dtype: str = "float32"


@dataclass(frozen=True)
class Preset:
    """A registered network: its builder and which of the optional options it takes."""

    name: str
    description: str
    build: Callable[[Options], Module]
    lenet_family: bool  # takes --activation, --pool, --batchnorm, --dropout
    outputs: tuple[str, ...] = ("fc",)  # the --output layers it can end in
    pad32: bool = False  # takes --pad32


PRESETS: dict[str, Preset] = {}


def preset(
    name: str,
    description: str,
    lenet_family: bool = True,
    outputs: tuple[str, ...] = ("fc",),
    pad32: bool = False,
):
    """Register ``fn(options) -> model`` as ``--arch name`` (the model says its input size);
    the other arguments say which options it takes (:class:`Preset`)."""

    def register(fn: Callable[[Options], Module]) -> Callable[[Options], Module]:
        PRESETS[name] = Preset(name, description, fn, lenet_family, outputs, pad32)
        return fn

    return register


# -- building blocks ------------------------------------------------------------------------
class _Builder:
    """Named layers in order, with the options' activation, pooling, batch-norm and dropout."""

    def __init__(self, o: Options, activation: str, pool: str) -> None:
        self.o, self.layers = o, {}
        self.activation, self.pool = o.activation or activation, o.pool or pool
        self.kw = {"rng": host_rng(o.seed), "dtype": o.dtype}
        if self.activation not in ACTIVATIONS:
            raise PresetError(f"unknown activation {self.activation!r}; one of {list(ACTIVATIONS)}")
        if self.pool not in POOLS:
            raise PresetError(f"unknown pool {self.pool!r}; choose max or avg")

    def add(self, name: str, layer: Module) -> None:
        self.layers[name] = layer

    def conv_block(self, i: int, conv: Module, pool: Module | None = None, k: int = 2) -> None:
        """conv [-> batch-norm] -> activation -> pool; with max-pooling the (monotone)
        activation runs after the pool instead: the same values on 4x fewer inputs. A
        trainable subsampling ``pool`` (LeCun's S2, S4) gets an activation of its own after it,
        as in the paper."""
        self.add(f"conv{i}", conv)
        if self.o.batchnorm:
            self.add(f"bn{i}", BatchNorm2d(conv.out_channels, dtype=self.o.dtype))
        act = ACTIVATIONS[self.activation]()
        if pool is None:
            pool = MaxPool2d(k) if self.pool == "max" else AvgPool2d(k)
        if isinstance(pool, MaxPool2d):
            self.add(f"pool{i}", pool)
            self.add(f"act{i}", act)
            return
        self.add(f"act{i}", act)
        self.add(f"pool{i}", pool)
        if not isinstance(pool, AvgPool2d):  # trainable subsampling: squashed again
            self.add(f"act{i}s", ACTIVATIONS[self.activation]())

    def hidden_fc(self, i: int, fan_in: int, fan_out: int) -> None:
        """[dropout ->] fc [-> batch-norm] -> activation."""
        if self.o.dropout:
            self.add(f"drop{i}", Dropout(self.o.dropout, seed=self.o.seed))
        self.add(f"fc{i}", Linear(fan_in, fan_out, **self.kw))
        if self.o.batchnorm:
            self.add(f"bn_fc{i}", BatchNorm1d(fan_out, dtype=self.o.dtype))
        self.add(f"act_fc{i}", ACTIVATIONS[self.activation]())

    def model(self, input_size: int) -> Sequential:
        model = Sequential(input_shape=(1, input_size, input_size), **self.layers)
        first = next(iter(self.layers.values()))
        first.needs_input_grad = False  # the image needs no gradient
        return model


def _lenet(
    o: Options, padding: int, fc_in: int, activation: str, pool: str, size: int = 28
) -> Sequential:
    b = _Builder(o, activation, pool)
    b.conv_block(1, Conv2d(1, 6, 5, padding=padding, **b.kw))
    b.conv_block(2, Conv2d(6, 16, 5, **b.kw))
    b.add("flatten", Flatten())
    b.hidden_fc(1, fc_in, 120)
    b.hidden_fc(2, 120, 84)
    b.add("fc3", Linear(84, 10, **b.kw))
    return b.model(size)


# -- the presets ----------------------------------------------------------------------------
@preset(
    "lenet5", "modern LeNet-5: pad 2, ReLU, max-pool, fc 400-120-84-10 (the default)", pad32=True
)
def lenet5(o: Options) -> Module:
    size = 32 if o.pad32 else 28
    plain = o.activation in (None, "relu") and o.pool in (None, "max")
    if plain and not (o.batchnorm or o.dropout):
        return LeNet5(seed=o.seed, dtype=o.dtype, input_size=size)  # the fused GPU step fits
    return _lenet(o, 2 if size == 28 else 0, 400, "relu", "max", size)


@preset(
    "lenet5-nopad", "LeNet-5 on unpadded 28x28: ReLU, max-pool, fc 256-120-84-10 (reports A, C)"
)
def lenet5_nopad(o: Options) -> Module:
    return _lenet(o, padding=0, fc_in=256, activation="relu", pool="max")


@preset("lenet5-sigmoid-avg", "LeNet-5 with sigmoid and average pooling, pad 2 (report D)")
def lenet5_sigmoid_avg(o: Options) -> Module:
    return _lenet(o, padding=2, fc_in=400, activation="sigmoid", pool="avg")


@preset(
    "lenet5-classic",
    "LeCun 1998: 32x32 in, scaled tanh, trainable subsampling, C3 table, C5, F6, fc or RBF out",
    outputs=OUTPUTS,
)
def lenet5_classic(o: Options) -> Module:
    b = _Builder(o, "lecun_tanh", "max")
    # S2 and S4 are trainable subsampling unless --pool asks for max or average pooling.
    s2 = None if o.pool else TrainableSubsampling(6, 2, **b.kw)
    s4 = None if o.pool else TrainableSubsampling(16, 2, **b.kw)
    b.conv_block(1, Conv2d(1, 6, 5, **b.kw), s2)  # C1 -> S2
    b.conv_block(2, PartialConv2d(6, 16, 5, LENET5_C3_TABLE, **b.kw), s4)  # C3 -> S4
    b.add("conv3", Conv2d(16, 120, 5, **b.kw))  # C5: 120 maps of 5x5, each 1x1
    if o.batchnorm:
        b.add("bn3", BatchNorm2d(120, dtype=o.dtype))
    b.add("act3", ACTIVATIONS[b.activation]())
    b.add("flatten", Flatten())
    b.hidden_fc(1, 120, 84)  # F6
    if o.output == "rbf":
        b.add("rbf", RBFOutput(84, dtype=o.dtype))
    else:
        b.add("fc2", Linear(84, 10, **b.kw))
    model = b.model(32)
    if o.output == "rbf":
        model.loss_fn = rbf_loss
    return model


@preset(
    "compact-cnn",
    "small CNN under a weight budget: conv 16@3x3/2, conv 24@6x6, fc 96-64, batch-norm (report E)",
    lenet_family=False,
)
def compact_cnn(o: Options) -> Module:
    kw = {"rng": host_rng(o.seed), "dtype": o.dtype}
    conv1 = Conv2d(1, 16, 3, stride=2, padding=1, **kw)
    conv1.needs_input_grad = False
    return Sequential(
        input_shape=(1, 28, 28),
        conv1=conv1, pool1=MaxPool2d(2), relu1=ReLU(inplace=True),
        conv2=Conv2d(16, 24, 6, padding=1, **kw), pool2=MaxPool2d(2), relu2=ReLU(inplace=True),
        flatten=Flatten(), fc1=Linear(96, 64, **kw), bn1=BatchNorm1d(64, dtype=o.dtype),
        relu3=ReLU(inplace=True), fc2=Linear(64, 10, **kw),
    )  # fmt: skip


# -- lookup ---------------------------------------------------------------------------------
def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise PresetError(
            f"unknown --arch {name!r}; `--arch list` shows them: {', '.join(PRESETS)}"
        )
    return PRESETS[name]


def build(name: str, options: Options | None = None) -> Module:
    """The network ``name`` built with ``options`` (``Options()``: the preset as described)."""
    p = get_preset(name)
    o = options or Options()
    if not p.lenet_family:
        asked = [f for f in ("activation", "pool", "batchnorm", "dropout") if getattr(o, f)]
        if asked:
            raise PresetError(f"--arch {name} takes no --{asked[0]} (LeNet-family presets do)")
    if o.output not in OUTPUTS:
        raise PresetError(f"unknown --output {o.output!r}; choose fc or rbf")
    if o.output not in p.outputs:
        takes = ", ".join(f"--arch {q.name}" for q in PRESETS.values() if o.output in q.outputs)
        raise PresetError(f"--arch {name} takes no --output {o.output}: use it with {takes}")
    if o.pad32 and not p.pad32:
        takes = ", ".join(f"--arch {q.name}" for q in PRESETS.values() if q.pad32)
        raise PresetError(f"--pad32 is for {takes} ({name} has its own input size)")
    if not 0.0 <= o.dropout < 1.0:
        raise PresetError(f"--dropout must be in [0, 1), got {o.dropout}")
    model = p.build(o)
    model.arch = name
    return model


def options_from_config(config: dict) -> Options:
    """The :class:`Options` stored in a run's config (missing keys: the defaults)."""
    names = {f.name for f in fields(Options)}
    return Options(**{k: v for k, v in config.items() if k in names})


def build_from_config(config: dict) -> Module:
    """The network a checkpoint's ``config`` describes (``arch`` absent, as in checkpoints
    from before presets: ``lenet5``)."""
    name = config.get("arch", "lenet5")
    if name == "custom":
        raise PresetError(
            "it holds a network built in Python: build it again and load the weights with "
            "model.load_state_dict, or resume with lenet_xp.train.fit(model, resume=...)"
        )
    return build(name, options_from_config(config))


def listing() -> str:
    """One line per preset: name, parameters, description (``--arch list``)."""
    rows = []
    for p in PRESETS.values():
        count = build(p.name).num_parameters()
        rows.append(f"{p.name:<20} {count:>7,} params  {p.description}")
    return "\n".join(rows)
