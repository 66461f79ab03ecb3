"""Per-layer statistics: the numbers are the ones a direct computation gives, recording them
changes no training number, and the CLI writes (and on resume, rewrites) stats.jsonl."""

import json
import math

import numpy as np
import pytest
from conftest import DATA, DEVICES, needs_mnist

from lenet_xp import train as train_cli
from lenet_xp.backend import asnumpy, get_device, host_rng, to_device
from lenet_xp.models.feature_maps import layer_outputs
from lenet_xp.models.lenet5 import LeNet5
from lenet_xp.optim.optimizers import Adam
from lenet_xp.training.parallel import forward_backward
from lenet_xp.training.stats import LayerStats, read_stats

TIMINGS = {"train_seconds", "images_per_second"}


def _batches(device, steps, n=32):
    rng = host_rng(1)
    for _ in range(steps):
        x = rng.standard_normal((n, 1, 28, 28)).astype("float32")
        yield to_device(x, device), to_device(rng.integers(0, 10, n), device)


@pytest.mark.parametrize("device", DEVICES)
def test_samples_are_what_a_direct_computation_gives(device, tmp_path):
    """Two identical models see the same batches; one is recorded (every 2nd of 4 steps), the
    other measured by hand. The recorded one trains exactly like the other, and its record
    holds the means over the sampled steps (2 and 4) of the hand-made numbers."""
    device = get_device(device)
    recorded, reference = LeNet5(seed=3).to(device), LeNet5(seed=3).to(device)
    opt_a, opt_b = Adam(recorded.parameters(), lr=1e-2), Adam(reference.parameters(), lr=1e-2)
    stats = LayerStats(recorded, tmp_path / "stats.jsonl", every=2)
    expected: dict[str, list[float]] = {}

    def note(key, value):
        expected.setdefault(key, []).append(float(value))

    for step, (x, y) in enumerate(_batches(device, 4), start=1):
        forward_backward(recorded, x, y)
        opt_a.step()
        stats.after_step()
        sampled = step % 2 == 0
        if sampled:
            for name, out in layer_outputs(reference, x):
                if name != "flatten":
                    note(f"{name}/act_mean", out.mean())
                    note(f"{name}/act_std", out.std())
                    note(f"{name}/act_zero", (out == 0).mean())
            before = {n: asnumpy(p.data).copy() for n, p in reference.named_parameters()}
        forward_backward(reference, x, y)
        opt_b.step()
        if sampled:
            for name, p in reference.named_parameters():
                g, w = asnumpy(p.grad), asnumpy(p.data)
                note(f"{name}/grad_mean", g.mean())
                note(f"{name}/grad_std", g.std())
                w0 = before[name]
                note(f"{name}/ratio", np.linalg.norm(w - w0) / np.linalg.norm(w0))
    for (name, a), (_, b) in zip(
        recorded.named_parameters(), reference.named_parameters(), strict=True
    ):
        assert np.array_equal(asnumpy(a.data), asnumpy(b.data)), name  # training untouched
    assert not any("forward" in vars(layer) for layer in recorded.layers())  # unwrapped

    record = stats.end_epoch(1)
    assert read_stats(tmp_path / "stats.jsonl") == [record]
    assert record["samples"] == 2 and record["every"] == 2
    assert list(record["layers"]) == [n for n, _ in recorded.named_children() if n != "flatten"]
    assert list(record["params"]) == [n for n, _ in recorded.named_parameters()]
    for name, values in record["layers"].items():
        for stat, value in values.items():
            assert value == pytest.approx(np.mean(expected[f"{name}/{stat}"]), rel=1e-4, abs=1e-7)
    for name, values in record["params"].items():
        for stat in ("grad_mean", "grad_std"):
            want = np.mean(expected[f"{name}/{stat}"])
            assert values[stat] == pytest.approx(want, rel=1e-4, abs=1e-8)
        ratios = expected[f"{name}/ratio"]
        assert values["update_ratio_mean"] == pytest.approx(np.mean(ratios), rel=1e-4)
        assert values["update_ratio_std"] == pytest.approx(np.std(ratios), rel=1e-3, abs=1e-7)
    assert record["layers"]["relu1"]["act_zero"] > 0.01  # ReLUs zero some outputs
    assert record["layers"]["conv1"]["act_zero"] == 0.0


def test_an_epoch_without_a_sample_records_its_last_gradients(tmp_path):
    """One step, then the epoch ends while the next step's sample is armed (every 2): the
    record holds the last step's gradients, no activations and no update ratio (the weights
    copied for the next step have not moved)."""
    model = LeNet5(seed=0)
    stats = LayerStats(model, tmp_path / "s.jsonl", every=2)
    ((x, y),) = _batches(get_device("cpu"), 1)
    forward_backward(model, x, y)
    stats.after_step()
    assert "forward" in vars(model.conv1)  # armed for step 2
    record = stats.end_epoch(1)
    assert record["samples"] == 1 and "layers" not in record
    grad = model.fc3.weight.grad
    assert record["params"]["fc3.weight"]["grad_std"] == pytest.approx(float(grad.std()))
    assert "update_ratio_mean" not in record["params"]["fc3.weight"]
    stats.close()
    assert not any("forward" in vars(layer) for layer in model.layers())


def test_samples_with_different_statistics_are_all_summarised(tmp_path):
    """A full sample (step 2: activations, update ratios), then one of step 3's gradients
    only: each statistic is averaged over the samples that have it, none is dropped."""
    model = LeNet5(seed=0)
    opt = Adam(model.parameters(), lr=1e-2)
    stats = LayerStats(model, tmp_path / "s.jsonl", every=1)
    grad_means = []
    for step, (x, y) in enumerate(_batches(get_device("cpu"), 3), start=1):
        forward_backward(model, x, y)
        grad_means.append(float(model.fc3.weight.grad.mean()))
        if step < 3:
            opt.step()
            stats.after_step()  # samples step 2 in full (step 1 armed it)
    stats._sample(None)  # step 3: its gradients only
    record = stats.end_epoch(1)
    assert record["samples"] == 2
    assert "act_mean" in record["layers"]["conv1"]
    assert "update_ratio_mean" in record["params"]["fc3.weight"]
    want = np.mean(grad_means[1:])
    assert record["params"]["fc3.weight"]["grad_mean"] == pytest.approx(want, rel=1e-5)
    stats.close()


@needs_mnist
def test_the_cli_records_stats_without_changing_the_run(tmp_path):
    """Two worker processes (the activations are the main process's slice): the metrics equal
    those of a run without statistics; stats.jsonl has one full line per epoch; resuming from
    epoch 1 keeps epoch 1's line and writes epoch 2's again."""
    base = ["--device", "cpu", "--data-dir", str(DATA), "--quiet", "--limit-train", "1300"]
    base += ["--limit-test", "500", "--epochs", "2", "--workers", "2"]

    def metrics(out):
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]

    on, off = tmp_path / "on", tmp_path / "off"
    assert (
        train_cli.main([*base, "--out", str(on), "--stats-every", "2", "--keep-every-epoch"]) == 0
    )
    assert train_cli.main([*base, "--out", str(off), "--stats-every", "0"]) == 0
    assert metrics(on) == metrics(off)
    assert not (off / "stats.jsonl").exists()
    records = read_stats(on / "stats.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    steps = math.ceil((1300 - 1300 // 12) / 128)  # 10 steps an epoch: samples at 2, 4, ...
    assert [r["samples"] for r in records] == [steps // 2, steps // 2]
    model = LeNet5()
    for r in records:
        assert set(r["layers"]) == {n for n, _ in model.named_children()} - {"flatten"}
        assert set(r["params"]) == {n for n, _ in model.named_parameters()}
        values = [
            v for group in ("layers", "params") for d in r[group].values() for v in d.values()
        ]
        assert all(math.isfinite(v) for v in values)
        assert 1e-5 < r["params"]["conv1.weight"]["update_ratio_mean"] < 1

    resume = ["--resume", str(on / "epoch_001.npz"), "--out", str(on), "--data-dir", str(DATA)]
    assert train_cli.main([*resume, "--quiet", "--stats-every", "2"]) == 0
    again = read_stats(on / "stats.jsonl")
    assert [r["epoch"] for r in again] == [1, 2] and again[0] == records[0]
    assert again[1]["params"]["fc1.weight"]["grad_std"] == pytest.approx(
        records[1]["params"]["fc1.weight"]["grad_std"], rel=1e-5
    )  # the same epoch 2, sampled at the same steps


def test_a_negative_interval_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--stats-every", "-1"])
    assert exit_info.value.code == 2
    assert "--stats-every: must be >= 0, got -1" in capsys.readouterr().err
