"""``--engine graph``: the layers' own step captured as one CUDA graph, against eager layer
steps, for every preset and option. On a CPU these run on the strict CuPy stand-in
(``LENET_XP_FAKE_CUDA=1``: a capture records operations and refuses cuBLAS, host reads and
freed memory; our kernels run in the CUDA emulator), on a GPU on the GPU.

Sizes: 40 images in batches of 16 (16, 16 and a short 8), so each epoch has an eager first
step, a capture, at least one replay and an eager short batch.
"""

import numpy as np
import pytest
from conftest import ON_STAND_IN, needs_cuda
from graph_check import assert_same, make_split, train

from lenet_xp.models.presets import PRESETS, Options, build

pytestmark = needs_cuda
# float64: to 1e-9, relative and absolute (a bias just before batch-norm has a gradient that is
# zero up to rounding, which Adam turns into steps of about the learning rate: such a
# parameter agrees to about 1e-10 absolute, not relatively).
TOL = {"float64": (1e-9, 1e-9), "float32": (2e-4, 2e-5)}
N = 40


def _options(arch: str, dtype: str, **kw) -> Options:
    return Options(dtype=dtype, pad32=PRESETS[arch].pad32, **kw)


def _padded(arch: str) -> bool:
    """Whether ``arch`` (as :func:`_options` builds it) takes 32 x 32 images."""
    return build(arch, _options(arch, "float32")).input_size == 32


@pytest.mark.parametrize("arch", sorted(PRESETS))
def test_every_preset_with_augment_and_ema_replays_as_eager(arch):
    """Two epochs (the graph captured in the first, replayed in both), shifts, the best
    recipe's distortions and a weight average: the same numbers to 1e-9 in float64."""
    split = make_split(N, "float64", pad32=_padded(arch))
    kw = dict(arch=arch, options=_options(arch, "float64"), epochs=2, shift=1)
    kw.update(augment="default,elastic=8:3", ema=0.999)
    eager = train("layers", split, **kw)
    graph = train("graph", split, **kw)
    assert graph.engine.step.graph is not None
    assert_same(eager, graph, *TOL["float32"])  # the distortion grid is float32 by design
    assert graph.results[-1][2] == 6


@pytest.mark.parametrize("arch", sorted(PRESETS))
def test_every_preset_with_shifts_and_ema_replays_as_eager_to_1e9(arch):
    split = make_split(N, "float64", pad32=_padded(arch))
    kw = dict(arch=arch, options=_options(arch, "float64"), epochs=2, shift=2, ema=0.99)
    eager = train("layers", split, **kw)
    graph = train("graph", split, **kw)
    assert_same(eager, graph, *TOL["float64"])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("optimizer", ["sgd", "nesterov", "adam", "adamw"])
def test_every_optimizer_and_dtype(optimizer, dtype):
    split = make_split(N, dtype)
    kw = dict(optimizer=optimizer, lr=0.05 if "sgd" in optimizer or optimizer == "nesterov"
              else 1e-3, weight_decay=1e-3, epochs=1)  # fmt: skip
    eager = train("layers", split, **kw)
    graph = train("graph", split, **kw)
    assert_same(eager, graph, *TOL[dtype])


@pytest.mark.parametrize(
    "options",
    [
        dict(activation="tanh", pool="avg", batchnorm=True),
        dict(activation="leaky_relu", batchnorm=True, dropout=0.3),
        dict(activation="sigmoid", pool="max", dropout=0.5),
    ],
    ids=["tanh-avg-bn", "leaky-bn-dropout", "sigmoid-dropout"],
)
def test_batchnorm_statistics_and_dropout_masks(options):
    """Batch-norm's running statistics are updated by every replay; dropout draws new
    counter-based masks at every replay (the eager reference draws the same ones)."""
    split = make_split(N, "float64")
    kw = dict(arch="lenet5-nopad", options=Options(dtype="float64", **options), epochs=2)
    eager = train("layers", split, **kw)
    graph = train("graph", split, **kw)
    assert_same(eager, graph, *TOL["float64"])


def test_rbf_output_keeps_its_centres_fixed():
    split = make_split(N, "float64", pad32=True)
    options = Options(dtype="float64", output="rbf")
    eager = train("layers", split, arch="lenet5-classic", options=options, optimizer="sgd")
    graph = train("graph", split, arch="lenet5-classic", options=options, optimizer="sgd")
    assert_same(eager, graph, *TOL["float64"])


@pytest.mark.skipif(not ON_STAND_IN, reason="counting host reads needs the CuPy stand-in")
def test_an_epoch_reads_the_device_once_per_check_and_once_at_its_end():
    """Replays never synchronise; the epoch's end reads its sums once. (The Keeper reads
    the loss every ``check_every`` steps, outside the graph: not used here.)"""
    from lenet_xp.testing import count_synchronizations

    split = make_split(64, "float32")
    graph = train("graph", split, batch=16, planned_epochs=2)  # captured in the first epoch
    with count_synchronizations() as syncs:
        loss, acc, done = graph.engine.train_epoch(np.random.default_rng(9), 4, None, 2)
    assert syncs.count == 1 and done == 8 and np.isfinite(loss)


@pytest.mark.skipif(not ON_STAND_IN, reason="breaking a capture on purpose needs the stand-in")
def test_a_value_frozen_at_capture_fails_the_replay_check(monkeypatch):
    """The check that replays equal eager steps catches a host value baked into the graph:
    a step that reads its learning rate on the host (as the array-op optimizer does) trains
    every replay at the capture's rate, and the comparison fails."""
    from lenet_xp.training.graph import GraphStep

    def host_lr_step(self, rows):  # the learning rate as a host scalar: frozen when captured
        x, y = self.batch(rows)
        from lenet_xp.training.workers import forward_backward

        loss, correct = forward_backward(self.model, x, y)
        lr = self.lr_host[self.optimizer.steps]
        for p in self.flat.trainable:
            p.data -= lr * p.grad
        self.loss_sum += loss * rows
        self.correct += correct
        self.clock += 1

    split = make_split(64, "float64")
    kw = dict(optimizer="sgd", lr=0.1, schedule="step", epochs=3, batch=16)
    monkeypatch.setattr(GraphStep, "step", host_lr_step)
    frozen = train("graph", split, **kw)
    monkeypatch.undo()
    eager = train("layers", split, **{**kw, "optimizer": "sgd"})
    # plain SGD without momentum is exactly what host_lr_step does eagerly
    with pytest.raises(AssertionError):
        assert_same(eager, frozen, *TOL["float64"])


@pytest.mark.parametrize("arch", sorted(PRESETS))
def test_the_kernels_engine_equals_the_layers(arch):
    """``--engine kernels``: the layers with our kernels behind their ops and adjacent
    layers fused (conv + max-pool + ReLU, linear + ReLU, the loss) train as the plain
    layers do, to 1e-9 in float64."""
    split = make_split(N, "float64", pad32=_padded(arch))
    kw = dict(arch=arch, options=_options(arch, "float64"), epochs=1, shift=1, ema=0.99)
    assert_same(train("layers", split, **kw), train("kernels", split, **kw), *TOL["float64"])


@pytest.mark.skipif(not ON_STAND_IN, reason="counting launches needs the CuPy stand-in")
@pytest.mark.parametrize(
    ("arch", "limit"),
    [
        ("lenet5", 40),
        ("lenet5-nopad", 40),
        ("lenet5-sigmoid-avg", 60),
        ("lenet5-classic", 60),
        ("lenet5-classic --output rbf", 60),
        ("compact-cnn", 60),
    ],
)
def test_launches_per_step_stay_within_the_targets(arch, limit):
    """``scripts/count_launches.py``'s numbers: LeNet-5 at most 40 launches per step eager
    with our kernels and 40 graph nodes, every other preset at most 60 (lenet5-classic: its
    scaled tanh, trainable subsampling and partial C3 fused; with the RBF output, that layer
    and LeCun's loss one launch each); the layers far more."""
    from lenet_xp.benchmarks.launches import count_launches

    name, _, output = arch.partition(" --output ")
    count = count_launches(name, batch=32, output=output or "fc")
    assert count.kernels <= limit and count.graph_nodes <= limit, count
    assert count.layers > 4 * limit, count
