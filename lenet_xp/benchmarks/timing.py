"""What ``python -m lenet_xp.bench`` times: an epoch of each engine (and of PyTorch, with
``--torch``), one step's launches, time to a target accuracy, each layer's share of a step,
peak memory; and the training split it times them on."""

from __future__ import annotations

import math
import os
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lenet_xp.backend import (
    Device,
    host_rng,
    synchronize,
)
from lenet_xp.benchmarks import torch_reference as bench_torch
from lenet_xp.data.device_split import DeviceSplit, to_device_split
from lenet_xp.data.mnist import DataError, load_mnist
from lenet_xp.functional.loss import softmax_cross_entropy
from lenet_xp.layers.fusion import FusedBlock
from lenet_xp.models.lenet5 import LeNet5
from lenet_xp.models.presets import Options, build
from lenet_xp.optim.optimizers import Adam, make_optimizer
from lenet_xp.optim.schedules import ConstantLR, make_schedule
from lenet_xp.training.engines import make_engine


def load_train_split(
    device: Device, data_dir: str | None, limit: int = 60_000, pad32: bool = False
) -> tuple[DeviceSplit, str]:
    """MNIST's first ``limit`` training images on ``device`` (padded to 32 x 32 if
    ``pad32``), or random images as many."""
    try:
        mnist = load_mnist(data_dir, download=False)
        images, labels = mnist.train_images[:limit], mnist.train_labels[:limit]
        source = "MNIST"
    except DataError:
        rng = host_rng(0)
        images = rng.integers(0, 256, (limit, 28, 28), dtype="uint8")
        labels = rng.integers(0, 10, limit, dtype="uint8")
        source = "random images (MNIST not found)"
    return to_device_split(images, labels, device, pad_to_32=pad32), source


def preset_model(arch: str) -> Any:
    """Preset ``arch`` as ``train --arch`` builds it (seed 0, float32)."""
    return build(arch, Options())


def our_epoch(
    split: DeviceSplit, batch_size: int, workers: int, tune_allocator: bool = True,
    augment: Any = None, ema_decay: float | None = None, arch: str = "lenet5",
) -> tuple[Any, Any]:  # fmt: skip
    """``(run_one_epoch, close)`` for lenet_xp's training loop (images distorted as
    ``augment``, an :class:`~lenet_xp.data.augment.Augment`, and the weights averaged with
    ``ema_decay``, if given), after a 20-step warm-up; ``arch``: the preset."""
    model = preset_model(arch).to(split.device)
    optimizer = make_optimizer("adam", model.parameters(), 1e-3, ema=ema_decay or None)
    rng, n_warm = host_rng(0), 20 * batch_size
    warmup = DeviceSplit(split.images[:n_warm], split.labels[:n_warm], split.device)
    engine = make_engine(
        "layers", model, optimizer, warmup, batch_size, ConstantLR(1e-3), total_steps=0,
        augment=augment, workers=workers, max_batch=batch_size, tune_allocator=tune_allocator,
    )  # fmt: skip
    engine.train_epoch(rng, 0, None)
    engine.split = split  # then the whole split, timed

    def epoch() -> None:
        engine.train_epoch(rng, 0, None)

    return epoch, engine.close


def profile_layers(
    split: DeviceSplit, batch_size: int, steps: int = 30
) -> list[tuple[str, float, float]]:
    """Mean milliseconds per step of the forward and backward of each layer, or of each
    block of layers that runs fused (named ``"conv1+pool1+relu1"``: on the CPU with the
    compiled kernels, :mod:`lenet_xp.layers.fusion`), as training runs them
    (device-synchronised)."""
    model = LeNet5(seed=0).to(split.device)
    x, y = split.images[:batch_size], split.labels[:batch_size]
    names = {id(layer): name for name, layer in model.named_children()}
    run = model.plan(x)  # the layers, or the blocks they fuse into
    labels = [
        "+".join(names[id(layer)] for layer in step.layers)
        if isinstance(step, FusedBlock)
        else names[id(step)]
        for step in run
    ]
    fwd, bwd = dict.fromkeys(labels, 0.0), dict.fromkeys(labels, 0.0)

    def timed(fn: Any, arg: Any) -> tuple[Any, float]:
        synchronize(split.device)
        start = time.perf_counter()
        out = fn(arg)
        synchronize(split.device)
        return out, time.perf_counter() - start

    for step in range(steps + 3):
        h = x
        for label, part in zip(labels, run, strict=True):
            h, dt = timed(part.forward, h)
            fwd[label] += dt * (step >= 3)
        loss, g = softmax_cross_entropy(h, y)
        for label, part in zip(reversed(labels), reversed(run), strict=True):
            g, dt = timed(part.backward, g)
            bwd[label] += dt * (step >= 3)
    return [(n, 1e3 * fwd[n] / steps, 1e3 * bwd[n] / steps) for n in labels]


def timed(fn: Any, device: Device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def peak_memory_mib(device: Device) -> float:
    """Peak resident set size of this process (CPU), or the CuPy pool's bytes (GPU), in MiB."""
    if device.kind == "cuda":
        return device.xp.get_default_memory_pool().total_bytes() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def machine_line(device: Device) -> str:
    if device.kind == "cuda":
        props = device.xp.cuda.runtime.getDeviceProperties(device.index)
        return f"{props['name'].decode()} (CuPy {device.xp.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPUs, NumPy {device.xp.__version__}"


@dataclass
class Timed:
    """An engine (or PyTorch) as timed here: ``epoch()`` one timed pass, ``one_step()`` a
    single step (for counting launches), ``issued`` the launches per step our code issues
    (fused engines)."""

    name: str
    epoch: Callable[[], Any]
    one_step: Callable[[], Any]
    close: Callable[[], Any] = lambda: None
    issued: int | None = None


def gpu_engine(
    name: str, split: DeviceSplit, batch_size: int, epochs: int, arch: str = "lenet5",
    augment: Any = None, ema_decay: float | None = None,
) -> Timed:  # fmt: skip
    """Engine ``name`` (``kernels``: the layers with our kernels; ``graph``: their step
    captured as a CUDA graph) training preset ``arch`` with Adam, after a warm-up epoch;
    ``one_step`` is one step of it (a graph replay for ``graph``)."""
    model = preset_model(arch).to(split.device)
    optimizer = make_optimizer("adam", model.parameters(), 1e-3, ema=ema_decay or None)
    steps = (epochs + 3) * -(-len(split) // batch_size) + 10
    why: list[str] = []
    engine = make_engine(
        name, model, optimizer, split, batch_size, ConstantLR(1e-3), total_steps=steps,
        augment=augment, note=why.append,
    )  # fmt: skip
    if engine.name != name:
        engine.close()
        raise RuntimeError(why[0] if why else f"the {name} engine cannot run here")
    rng = host_rng(0)
    engine.train_epoch(rng, 0, None)  # warm-up (and the capture)
    epoch = lambda: engine.train_epoch(rng, 0, None)  # noqa: E731
    if name == "graph":
        one_step = lambda: engine.step.run(batch_size)  # noqa: E731
    else:
        x, y = split.images[:batch_size], split.labels[:batch_size]

        def one_step() -> None:
            engine.runner.forward_backward(x, y)
            optimizer.step()

    return Timed(name, epoch, one_step, engine.close)


def torch_engine(name: str, split: DeviceSplit, batch_size: int, arch: str = "lenet5") -> Timed:
    run = bench_torch.TorchRun(split, batch_size, graph=name == "torch-graph", arch=arch)
    run.epoch(20 * batch_size)  # warm-up
    return Timed(name, run.epoch, lambda: run.epoch(batch_size))


#: The race recipe: batch 128, Adam, cosine decay from 3e-3 over RACE_EPOCHS epochs, no
#: augmentation, on all 60,000 training images (the README gives what it reaches).
RACE_BATCH, RACE_LR = 128, 3e-3


def time_to_accuracy(
    name: str, split: DeviceSplit, test: DeviceSplit, target: float, epochs: int
) -> tuple[float, float, int, float]:
    """Train engine ``name`` from scratch with the race recipe, testing after each epoch:
    ``(setup s, training s until test accuracy >= target, epochs, accuracy reached)``;
    training seconds are ``inf`` if ``epochs`` do not reach ``target``."""
    batch = RACE_BATCH
    steps = epochs * -(-len(split) // batch)
    schedule = make_schedule("cosine", RACE_LR, steps, steps // epochs)
    start = time.perf_counter()
    if name.startswith("torch"):
        run = bench_torch.TorchRun(split, batch, name == "torch-graph", schedule)

        def epoch() -> None:
            run.epoch()

        def accuracy() -> float:
            return run.accuracy(test)
    else:
        model = LeNet5(seed=0).to(split.device)
        optimizer = Adam(model.parameters(), lr=RACE_LR)
        rng, step = host_rng(0), [0]
        engine = make_engine(
            name, model, optimizer, split, batch, schedule, total_steps=steps, max_batch=2000
        )

        def epoch() -> None:
            *_, step[0] = engine.train_epoch(rng, step[0], None)

        def accuracy() -> float:
            return engine.evaluate(test, 2000)[1]

    synchronize(split.device)
    setup = time.perf_counter() - start
    seconds, acc = 0.0, 0.0
    for n_epochs in range(1, epochs + 1):
        seconds += timed(epoch, split.device)
        acc = accuracy()
        if acc >= target:
            return setup, seconds, n_epochs, acc
    return setup, math.inf, epochs, acc
