"""The benchmark CLI on a small slice: every engine of the device times an epoch, the
time-to-accuracy race runs, and PyTorch's side runs where it is installed."""

import importlib.util

import pytest
from conftest import DATA, needs_cuda, needs_mnist

from lenet_xp import bench
from lenet_xp.benchmarks import torch_reference as bench_torch

HAS_TORCH = importlib.util.find_spec("torch") is not None


@needs_mnist
def test_bench_prints_every_engine_and_the_race(capsys):
    args = ["--device", "cpu", "--epochs", "1", "--limit-train", "2560", "--no-profile"]
    args += ["--torch", "--time-to", "0.5", "--race-epochs", "1", "--data-dir", str(DATA)]
    args += ["--augment", "default", "--ema", "0.999"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("   128")}
    assert "layers" in rows
    assert float(rows["layers"][2]) > 0  # epoch seconds
    assert float(rows["layers+aug"][2]) > 0
    assert "augmentation (default) + EMA 0.999 at batch 128:" in out
    cost_line = next(line for line in out.splitlines() if line.startswith("augmentation ("))
    cost = float(cost_line.split(": ")[1].split(" %")[0])  # one pair of epochs: their ratio
    aug, plain = float(rows["layers+aug"][2]), float(rows["layers"][2])  # printed to 1 ms
    low, high = (aug - 5e-4) / (plain + 5e-4), (aug + 5e-4) / (plain - 5e-4)
    assert 100 * (low - 1) - 0.05 <= cost <= 100 * (high - 1) + 0.05, cost_line
    assert "median of 1 pair of epochs" in cost_line
    if HAS_TORCH:
        assert "torch" in rows and float(rows["torch"][-1]) == pytest.approx(1.0)
    else:
        assert "not timed: batch 128: torch: PyTorch is not installed" in out
    race = out.split("time to 50.0 % test accuracy")[1].splitlines()
    layers = next(line.split() for line in race if line.startswith("layers"))
    assert layers[3] == "1" and float(layers[4].rstrip("%")) >= 50  # reached in one epoch


@needs_mnist
def test_bench_times_weight_averaging_alone(capsys):
    args = ["--device", "cpu", "--epochs", "1", "--limit-train", "2560", "--no-profile"]
    assert bench.main([*args, "--ema", "0.99", "--data-dir", str(DATA)]) == 0
    out = capsys.readouterr().out
    assert "\nEMA 0.99 at batch 128:" in out and "layers+aug" in out


def test_bench_rejects_a_bad_device_and_a_tiny_slice(capsys):
    assert bench.main(["--device", "tpu"]) == 1
    assert "lenet_xp.bench: error: bad device 'tpu'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--limit-train", "100"])
    assert "--limit-train must hold 20 batches" in capsys.readouterr().err


def test_no_cupti_count_without_a_gpu():
    assert bench_torch.cupti_launches(lambda: None) is None


@needs_mnist
@needs_cuda
@pytest.mark.parametrize("arch", ["lenet5", "lenet5-classic"])
def test_bench_on_cuda_times_every_engine_of_a_preset(capsys, arch):
    """``bench --device cuda --arch A``: the layers, the layers with our kernels and the
    captured graph each time an epoch of the preset (on the stand-in: a smoke test); PyTorch's
    twin of the preset is timed too, or (a PyTorch without CUDA, as beside the stand-in) not,
    saying why."""
    args = ["--device", "cuda", "--epochs", "1", "--limit-train", "640", "--batch-sizes", "32"]
    args += ["--no-profile", "--torch", "--arch", arch, "--data-dir", str(DATA)]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("    32")}
    assert {"layers", "kernels", "graph"} <= set(rows), out
    assert all(float(rows[name][2]) > 0 for name in ("layers", "kernels", "graph"))
    assert f"--arch {arch}" in out.splitlines()[0]
    assert "torch" in rows or "not timed: batch 32: torch: " in out, out


@needs_mnist
@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed")
def test_bench_times_the_torch_twin_of_another_preset(capsys):
    """``bench --torch --arch lenet5-classic`` on the CPU: PyTorch trains the same network
    (tests/test_torch_twin.py checks its numbers) beside ours, in one table."""
    args = ["--device", "cpu", "--epochs", "1", "--limit-train", "640", "--batch-sizes", "32"]
    args += ["--no-profile", "--torch", "--arch", "lenet5-classic", "--data-dir", str(DATA)]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("    32")}
    assert {"layers", "torch"} <= set(rows), out
    assert float(rows["torch"][2]) > 0 and float(rows["torch"][-1]) == pytest.approx(1.0)


def test_the_profile_names_the_blocks_that_run_fused(monkeypatch):
    """The per-layer profile times what training runs: with the compiled CPU kernels,
    ``conv -> max-pool -> ReLU`` as one block each way; without them, the layers."""
    pytest.importorskip("numba")
    from lenet_xp import native
    from lenet_xp.backend import CPU
    from lenet_xp.benchmarks.timing import load_train_split, profile_layers

    split, _ = load_train_split(CPU, str(DATA), limit=64)
    names = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("LENET_XP_NATIVE", setting)
        native.reread()
        rows = profile_layers(split, 16, steps=2)
        assert all(f > 0 and b > 0 for name, f, b in rows if name != "flatten")
        names[setting] = [name for name, _, _ in rows]
    native.reread()
    assert names["1"][:3] == ["conv1+pool1+relu1", "conv2+pool2+relu2", "flatten"]
    assert names["0"][:4] == ["conv1", "pool1", "relu1", "conv2"]


def test_two_source_trees_alternate_their_epochs(capsys):
    """``benchmarks.tree_ab``: two trees (here the same one twice) train in processes of
    their own, epochs alternating; each tree's epochs and the paired ratio are printed."""
    from pathlib import Path

    from lenet_xp.benchmarks import tree_ab

    root = str(Path(tree_ab.__file__).resolve().parents[2])
    tree_ab.main([f"old={root}", f"new={root}", "--rounds", "2", "--workers", "2",
                  "--limit-train", "1280"])  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:3]}
    assert set(rows) == {"old", "new"} and all(len(v) == 3 for v in rows.values())
    assert all(float(t) > 0 for v in rows.values() for t in v)
    ratio = float(lines[3].split(": ")[1].split()[0])
    assert 0.2 < ratio < 5 and lines[3].startswith("new / old: ")
