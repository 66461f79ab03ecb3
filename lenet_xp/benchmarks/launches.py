"""Launches per training step of every preset, counted on the strict CuPy stand-in
(``LENET_XP_FAKE_CUDA=1``), where every array operation, raw kernel and graph launch is one
counted launch and a captured graph keeps its nodes: ``scripts/count_launches.py`` prints the
table. On a GPU, CuPy may split an operation into more kernels than the stand-in counts (a
two-pass reduction, a cuBLAS GEMM's split-K): ``python -m lenet_xp.bench --device cuda``
also prints CUPTI's count of what the GPU ran.
"""

from __future__ import annotations

from dataclasses import dataclass

from lenet_xp.backend import get_device, host_rng
from lenet_xp.data.augment import parse_augment
from lenet_xp.data.device_split import DeviceSplit
from lenet_xp.models.presets import PRESETS, Options, build
from lenet_xp.optim import make_optimizer
from lenet_xp.optim.schedules import ConstantLR
from lenet_xp.training.engines import make_engine


@dataclass(frozen=True)
class LaunchCount:
    """One preset's launches per step: the eager layers without and with our kernels
    (``--engine layers`` / ``kernels``) and the nodes of the graph engine's captured step."""

    arch: str
    layers: int
    kernels: int
    graph_nodes: int


def _split(arch: str, batch: int) -> DeviceSplit:
    device = get_device("cuda")
    side = build(arch, _options(arch, "fc")).input_size
    xp = device.xp
    images = xp.zeros((2 * batch + 1, 1, side, side), dtype=xp.float32)
    labels = xp.arange(2 * batch + 1, dtype=xp.int64) % 10
    return DeviceSplit(images, labels, device)


def _options(arch: str, output: str) -> Options:
    return Options(pad32=PRESETS[arch].pad32, output=output)


def count_launches(
    arch: str, batch: int = 128, augment: str = "none", ema: float = 0.0, output: str = "fc"
) -> LaunchCount:
    """:class:`LaunchCount` of ``arch`` at ``batch`` with Adam (``augment``, ``ema``,
    ``output``: as ``train``'s); needs the stand-in (it counts)."""
    from lenet_xp.testing.fake_cupy import runtime

    split = _split(arch, batch)
    counts = {}
    for name in ("layers", "kernels", "graph"):
        model = build(arch, _options(arch, output)).to(split.device)
        optimizer = make_optimizer("adam", model.parameters(), 1e-3, ema=ema or None)
        engine = make_engine(
            name, model, optimizer, split, batch, ConstantLR(1e-3), total_steps=6,
            augment=parse_augment(augment),
        )  # fmt: skip
        rng = host_rng(0)
        if name == "graph":
            engine.train_epoch(rng, 0, None)  # an eager step, the capture, a replay
            counts[name] = len(engine.step.graph.nodes)
        else:
            engine.train_epoch(rng, 0, None)  # warm-up: kernels compiled
            before = runtime.launches()
            engine.train_epoch(rng, 3, None)
            counts[name] = round((runtime.launches() - before) / 3)  # 2 full + 1 short
        engine.close()
    name = arch if output == "fc" else f"{arch} --output {output}"
    return LaunchCount(name, counts["layers"], counts["kernels"], counts["graph"])
