"""The run's configuration (one dataclass built from the flags, ``fit()`` and checkpoints) and
the engine a run trains with (``--engine``; ``--cuda-kernels``/``--cuda-graph`` as aliases):
which GPU kernels run is the engine's choice, per model and optimizer, not a process switch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import needs_cuda

from lenet_xp import kernels
from lenet_xp.backend import CPU, get_device
from lenet_xp.data.device_split import to_device_split
from lenet_xp.models.lenet5 import LeNet5
from lenet_xp.optim import Adam
from lenet_xp.optim.schedules import ConstantLR
from lenet_xp.storage.checkpoint import CheckpointError
from lenet_xp.training.config import CONFIG_KEYS, TrainConfig, build_parser, parse_flags
from lenet_xp.training.engines import ENGINES, make_engine


@pytest.mark.parametrize(
    ("argv", "engine"),
    [
        ([], "layers"),
        (["--engine", "graph"], "graph"),
        (["--cuda-kernels"], "kernels"),
        (["--cuda-graph"], "graph"),
        (["--cuda-graph", "--cuda-kernels"], "graph"),  # --cuda-graph implied --cuda-kernels
        (["--cuda-kernels", "--no-cuda-kernels"], "layers"),
        (["--engine", "kernels", "--no-cuda-graph"], "kernels"),
        (["--engine", "graph", "--no-cuda-graph"], "layers"),
        (["--no-cuda-graph"], "layers"),  # given: a resume runs it, not the checkpoint's
        (["--no-cuda-kernels"], "layers"),
    ],
)
def test_engine_flag_and_its_old_aliases(monkeypatch, argv, engine):
    monkeypatch.delenv("LENET_XP_CUDA_KERNELS", raising=False)
    config, given = parse_flags(argv)
    assert config.engine == engine
    assert ("engine" in given) == bool(argv)


def test_the_environment_still_chooses_the_default_engine(monkeypatch):
    monkeypatch.setenv("LENET_XP_CUDA_KERNELS", "1")
    assert parse_flags([])[0].engine == "kernels"
    assert parse_flags(["--no-cuda-kernels"])[0].engine == "layers"


def test_an_unknown_engine_is_a_bad_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_flags(["--engine", "fast"])
    assert exit_.value.code == 2
    assert "--engine: invalid choice: 'fast'" in capsys.readouterr().err


def test_the_parser_and_the_dataclass_are_one_table():
    """Every field is a flag with the field's default; the kept ones are the checkpoint's."""
    defaults = vars(build_parser().parse_args([]))
    config = TrainConfig()
    assert defaults == dataclasses.asdict(config)
    assert list(config.kept()) == list(CONFIG_KEYS)
    assert {"epochs", "lr", "arch", "augment", "ema", "engine"} <= set(CONFIG_KEYS)
    assert not {"device", "out", "quiet", "resume"} & set(CONFIG_KEYS)


def test_fit_options_build_the_same_config():
    config = TrainConfig.from_options(recipe="best", epochs=3, engine="graph")
    assert (config.epochs, config.engine, config.ema, config.shift) == (3, "graph", 0.999, 0)
    with pytest.raises(TypeError, match="unknown option 'epoch'"):
        TrainConfig.from_options(epoch=3)
    with pytest.raises(ValueError, match="unknown recipe 'fastest'"):
        TrainConfig.from_options(recipe="fastest")


def test_a_resumed_config_is_the_checkpoints():
    saved = {**TrainConfig(lr=0.01, epochs=4).kept()}
    del saved["shift"]  # a checkpoint from before --shift existed: those runs had no shift
    resumed = TrainConfig(resume="run/last.npz", epochs=6).resumed(saved, {"epochs"})
    assert (resumed.lr, resumed.epochs, resumed.shift) == (0.01, 6, 0)
    assert resumed.out_dir.as_posix() == "run"
    with pytest.raises(CheckpointError, match="holds --lr 0.01, not --lr 0.5"):
        TrainConfig(resume="run/last.npz", lr=0.5).resumed(saved, {"lr"})


def _engine_for(name: str, device, notes: list[str]):
    model = LeNet5(seed=0).to(device)
    optimizer = Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (256, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 256, dtype=np.uint8)
    split = to_device_split(images, labels, device)
    engine = make_engine(
        name, model, optimizer, split, 64, ConstantLR(1e-3), total_steps=8, note=notes.append
    )
    return engine, model, optimizer


def test_on_the_cpu_every_engine_is_the_layers():
    assert not hasattr(kernels, "set_enabled")  # no process-wide switch left to flip
    for name in ENGINES:
        notes: list[str] = []
        engine, model, optimizer = _engine_for(name, CPU, notes)
        try:
            assert engine.name == "layers"
            assert not model.cuda_kernels and not optimizer.cuda_kernels
            loss, acc, step = engine.train_epoch(np.random.default_rng(0), 0, None)
            assert step == 4 and np.isfinite(loss) and 0 <= acc <= 1
        finally:
            engine.close()
        assert notes == (["--engine graph applies to CUDA devices; training on cpu"]
                         if name == "graph" else [])  # fmt: skip
    with pytest.raises(ValueError, match="unknown engine 'fast'"):
        _engine_for("fast", CPU, [])


@needs_cuda
def test_which_gpu_kernels_run_is_each_engines_own():
    """A kernels engine turns our kernels on for its model and optimizer only: a model
    trained by the layers in the same process keeps the array ops."""
    device = get_device("cuda")
    fused, fused_model, fused_optimizer = _engine_for("kernels", device, [])
    layers, model, optimizer = _engine_for("layers", device, [])
    try:
        assert fused.name == "kernels" and layers.name == "layers"
        assert fused_model.cuda_kernels and fused_model.layers()[0].cuda_kernels
        assert fused_optimizer.cuda_kernels
        assert not model.cuda_kernels and not model.layers()[0].cuda_kernels
        assert not optimizer.cuda_kernels
        for engine in (fused, layers):
            loss, _, step = engine.train_epoch(np.random.default_rng(0), 0, None)
            assert step == 4 and np.isfinite(loss)
    finally:
        fused.close()
        layers.close()
