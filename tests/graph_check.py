"""Shared by the graph-engine tests: train a network an epoch or two with the eager layers
and with the graph engine (``--engine graph``) from the same start, and compare."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lenet_xp.backend import asnumpy, get_device
from lenet_xp.data.augment import parse_augment
from lenet_xp.data.device_split import to_device_split
from lenet_xp.layers import Dropout
from lenet_xp.models.presets import Options, build
from lenet_xp.optim import make_optimizer
from lenet_xp.optim.schedules import make_schedule
from lenet_xp.training.engines import make_engine


@dataclass
class Trained:
    """What a run ends with: per-epoch ``(loss, accuracy, step)``, the model's state, the
    optimizer's state and the engine."""

    results: list[tuple[float, float, int]]
    model: dict[str, np.ndarray]
    optimizer: dict[str, Any]
    engine: Any


def make_split(n: int, dtype: str, pad32: bool = False, seed: int = 0) -> Any:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    return to_device_split(images, labels, get_device("cuda"), dtype, pad_to_32=pad32)


def train(
    engine_name: str, split: Any, arch: str = "lenet5", options: Options | None = None,
    optimizer: str = "adam", batch: int = 16, epochs: int = 1, shift: int = 0,
    augment: str = "none", ema: float | None = None, lr: float = 1e-3, schedule: str = "cosine",
    weight_decay: float = 0.0, planned_epochs: int | None = None,
) -> Trained:  # fmt: skip
    """Train ``arch`` on ``split`` with ``engine_name`` (``layers`` or ``graph``); with
    dropout, the layers draw the graph engine's counter-based masks from a clock the test
    advances after each step (the same masks; the generator's would differ)."""
    device = split.device
    options = options or Options(dtype=str(split.images.dtype))
    model = build(arch, options).to(device)
    opt = make_optimizer(optimizer, model.parameters(), lr, weight_decay=weight_decay, ema=ema)
    steps_per_epoch = -(-len(split) // batch)
    total = max(epochs, planned_epochs or 0) * steps_per_epoch
    sched = make_schedule(schedule, lr, total, steps_per_epoch)
    notes: list[str] = []
    engine = make_engine(
        engine_name, model, opt, split, batch, sched, total_steps=total, shift=shift,
        augment=parse_augment(augment), note=notes.append,
    )  # fmt: skip
    assert engine.name == engine_name, notes
    on_step = None
    dropouts = [m for m in _modules(model) if isinstance(m, Dropout)]
    if dropouts and engine_name == "layers":
        clock = device.xp.zeros(4, device.xp.int64)
        for stream, layer in enumerate(dropouts):
            layer.use_clock(clock, stream)

        def on_step() -> None:
            clock[...] += 1

    rng = np.random.default_rng(3)
    results, step = [], 0
    for epoch in range(1, epochs + 1):
        loss, acc, step = engine.train_epoch(rng, step, None, epoch, on_step=on_step)
        results.append((loss, acc, step))
    model_state = {k: asnumpy(v).copy() for k, v in model.state_dict().items()}
    optim_state = {
        k: (asnumpy(v).copy() if hasattr(v, "shape") else v) for k, v in opt.state_dict().items()
    }
    return Trained(results, model_state, optim_state, engine)


def _modules(module: Any) -> list[Any]:
    found = [module]
    for _, child in module.named_children():
        found += _modules(child)
    return found


def assert_same(a: Trained, b: Trained, rtol: float, atol: float) -> None:
    """Same per-epoch results and states, to ``rtol``/``atol`` (arrays) and exactly for the
    counts."""
    assert len(a.results) == len(b.results)
    for (la, aa, sa), (lb, ab, sb) in zip(a.results, b.results, strict=True):
        assert sa == sb
        np.testing.assert_allclose(lb, la, rtol=rtol, atol=atol)
        assert abs(aa - ab) <= 1.0 / 40  # at most one image's prediction flips (float32)
    assert a.model.keys() == b.model.keys()
    for name, value in a.model.items():
        np.testing.assert_allclose(b.model[name], value, rtol=rtol, atol=atol, err_msg=name)
    assert a.optimizer.keys() == b.optimizer.keys()
    for name, value in a.optimizer.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_allclose(b.optimizer[name], value, rtol=rtol, atol=atol, err_msg=name)
        else:
            assert b.optimizer[name] == value, name
