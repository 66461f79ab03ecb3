"""``--arch`` presets: parameter counts, options, one step on every device, state round trips,
arch mismatches, the summary table, and networks built in Python training through ``fit``."""

import json

import numpy as np
import pytest
from conftest import DATA, DEVICES, needs_cuda, needs_mnist

from lenet_xp import evaluate as evaluate_cli
from lenet_xp import train as train_cli
from lenet_xp.backend import asnumpy, to_device
from lenet_xp.layers import (
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Dropout,
    Flatten,
    LeakyReLU,
    Linear,
    MaxPool2d,
    ReLU,
    Sequential,
)
from lenet_xp.models.lenet5 import LeNet5, loss_and_grads
from lenet_xp.models.presets import Options, PresetError, build

COUNTS = {
    "lenet5": 61_706,
    "lenet5-nopad": 44_426,
    "lenet5-sigmoid-avg": 61_706,
    "lenet5-classic": 60_850,  # 60,000 up to F6 + the 84->10 layer's 850
    "compact-cnn": 20_994,
}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_parameter_counts(name):
    assert build(name).num_parameters() == COUNTS[name]


def test_lenet5_classic_counts_as_in_the_paper():
    rbf = build("lenet5-classic", Options(output="rbf"))
    fc = build("lenet5-classic")
    assert rbf.num_parameters() == 60_840  # the figure usually quoted: RBF centres included
    up_to_f6 = sum(
        int(p.data.size) for name, p in fc.named_parameters() if not name.startswith("fc2")
    )
    assert up_to_f6 == 60_000
    by_layer = {
        name: sum(int(p.data.size) for p in layer.parameters())
        for name, layer in fc.named_children()
    }
    assert (by_layer["conv1"], by_layer["pool1"], by_layer["conv2"]) == (156, 12, 1_516)
    assert (by_layer["pool2"], by_layer["conv3"], by_layer["fc1"]) == (32, 48_120, 10_164)


def test_arch_list_prints_every_preset_with_its_count(capsys):
    assert train_cli.main(["--arch", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    for name, count in COUNTS.items():
        line = next(line for line in out if line.startswith(name + " "))
        assert f"{count:,} params" in line and len(line.split("params", 1)[1].strip()) > 20


def test_default_lenet5_is_the_lenet5_class_and_options_change_the_layers():
    assert type(build("lenet5")) is LeNet5  # the fused GPU step applies to it
    model = build(
        "lenet5", Options(activation="leaky_relu", pool="avg", batchnorm=True, dropout=0.25)
    )
    kinds = [type(layer) for layer in model.layers()]
    assert LeakyReLU in kinds and AvgPool2d in kinds and MaxPool2d not in kinds
    assert kinds.count(BatchNorm2d) == 2 and kinds.count(BatchNorm1d) == 2
    assert kinds.count(Dropout) == 2 and model.num_parameters() == 61_706 + 12 + 32 + 240 + 168
    # With average pooling the activation comes before the pool (they do not commute).
    names = [name for name, _ in model.named_children()]
    assert names.index("act1") < names.index("pool1")


def test_options_a_preset_does_not_take_are_one_line(capsys):
    with pytest.raises(PresetError, match="compact-cnn takes no --batchnorm"):
        build("compact-cnn", Options(batchnorm=True))
    with pytest.raises(
        PresetError, match="lenet5 takes no --output rbf: use it with --arch lenet5-classic"
    ):
        build("lenet5", Options(output="rbf"))
    with pytest.raises(PresetError, match="--pad32 is for --arch lenet5 "):
        build("lenet5-classic", Options(pad32=True))
    assert train_cli.main(["--arch", "resnet50", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown --arch 'resnet50'" in err and "--arch list" in err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "name,options",
    [(n, Options()) for n in sorted(COUNTS)]
    + [
        ("lenet5-classic", Options(output="rbf")),
        ("lenet5", Options(activation="tanh", batchnorm=True)),
    ],
)
def test_one_training_step_on_device(name, options, device):
    model = build(name, options).to(device)
    size = model.input_size
    rng = np.random.default_rng(0)
    x = to_device(rng.standard_normal((8, 1, size, size)).astype(np.float32), device)
    y = to_device(rng.integers(0, 10, 8), device)
    loss, grads = loss_and_grads(model, x, y)
    assert np.isfinite(float(loss))
    assert set(grads) == {n for n, _ in model.named_parameters()}
    assert {n for n, g in grads.items() if g is None} <= {"rbf.centres"}  # the rest: trained
    for name_, param in model.named_parameters():
        if param.grad is not None:  # the RBF centres are fixed: no gradient
            assert param.grad.shape == param.data.shape, name_


@needs_cuda
@pytest.mark.parametrize("name", sorted(COUNTS) + ["lenet5-classic-rbf"])
def test_presets_cpu_gpu_parity(name):
    options = Options(dtype="float64", output="rbf" if name.endswith("-rbf") else "fc")
    name = name.removesuffix("-rbf")
    rng = np.random.default_rng(1)
    results = []
    for device in ("cpu", "cuda"):
        model = build(name, options).to(device)
        size = model.input_size
        x = rng.standard_normal((6, 1, size, size)) if not results else results[0][0]
        y = np.arange(6) % 10
        loss, grads = loss_and_grads(model, to_device(x, device), to_device(y, device))
        results.append((x, float(loss), {k: asnumpy(v) for k, v in grads.items() if v is not None}))
    (_, loss_cpu, g_cpu), (_, loss_gpu, g_gpu) = results
    assert abs(loss_cpu - loss_gpu) <= 1e-10
    for key, value in g_cpu.items():
        np.testing.assert_allclose(g_gpu[key], value, rtol=1e-10, atol=1e-10, err_msg=key)


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_state_dict_round_trip(name, tmp_path):
    from lenet_xp.storage.checkpoint import load_checkpoint, save_checkpoint

    model = build(name, Options(seed=3))
    path = tmp_path / "m.npz"
    save_checkpoint(path, model.state_dict(), {"type": "none"}, {"config": {"arch": name}})
    state, _, meta = load_checkpoint(path)
    fresh = build(meta["config"]["arch"], Options(seed=4))
    fresh.load_state_dict(state)
    x = np.random.default_rng(0).standard_normal((3, 1, model.input_size, model.input_size))
    x = x.astype(np.float32)
    model.eval(), fresh.eval()
    np.testing.assert_array_equal(fresh.forward(x.copy()), model.forward(x.copy()))


def test_summary_rows_and_totals():
    model = LeNet5()
    text = model.summary(batch=128)
    rows = {line.split()[0]: line.split() for line in text.splitlines()[2:-1]}
    assert rows["conv1"][2:6] == ["(N,", "6,", "28,", "28)"] and rows["conv1"][-2] == "156"
    conv_macs = 6 * 28 * 28 * 25 + 16 * 10 * 10 * 150
    fc_macs = 400 * 120 + 120 * 84 + 84 * 10
    assert int(rows["conv2"][-1].replace(",", "")) == 16 * 10 * 10 * 150
    total = text.splitlines()[-1]
    assert f"{61_706:,} parameters" in total and f"{conv_macs + fc_macs:,} MACs per image" in total
    activations = 6 * 28 * 28 + 2 * 6 * 14 * 14 + 16 * 100 + 2 * 400 + 400 + 2 * 120 + 2 * 84 + 10
    assert f"{activations * 128 * 4 / 2**20:.1f} MiB per batch of 128" in total


@needs_mnist
def test_training_prints_the_summary_and_refuses_another_arch(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--device", "cpu", "--data-dir", str(DATA), "--epochs", "1", "--limit-train", "1000"]
    args += ["--limit-test", "500", "--arch", "lenet5-nopad", "--out", str(out), "--workers", "1"]
    assert train_cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "total: 44,426 parameters" in printed and "fc1" in printed
    last = str(out / "last.npz")
    assert (
        evaluate_cli.main(["--checkpoint", last, "--device", "cpu", "--data-dir", str(DATA)]) == 0
    )
    assert "test_acc" in capsys.readouterr().out
    assert evaluate_cli.main(["--checkpoint", last, "--device", "cpu", "--arch", "lenet5"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds --arch lenet5-nopad, not --arch lenet5" in err
    resume = ["--resume", last, "--arch", "compact-cnn", "--device", "cpu", "--out", str(out)]
    assert train_cli.main(resume) == 1
    assert "holds --arch lenet5-nopad" in capsys.readouterr().err


@needs_mnist
def test_a_network_built_in_python_trains_checkpoints_and_resumes(tmp_path, capsys):
    def net():
        rng = np.random.default_rng(0)  # layers draw fresh weights unless given a generator
        return Sequential(
            [Conv2d(1, 4, 5, padding=2, rng=rng), MaxPool2d(2), ReLU(), Flatten(),
             Linear(4 * 14 * 14, 10, rng=rng)],
            input_shape=(1, 28, 28),
        )  # fmt: skip

    common = {"device": "cpu", "data_dir": str(DATA), "limit_train": 1000, "limit_test": 500}
    common |= {"quiet": True, "workers": 1, "epochs": 2}
    straight = train_cli.fit(net(), out=str(tmp_path / "s"), keep_every_epoch=True, **common)
    resumed = train_cli.fit(
        net(), out=str(tmp_path / "r"), resume=str(tmp_path / "s" / "epoch_001.npz"), **common
    )
    drop = {"train_seconds", "images_per_second"}
    assert {k: v for k, v in resumed.items() if k not in drop} == {
        k: v for k, v in straight.items() if k not in drop
    }
    assert straight["test_acc"] > 0.4  # chance is 0.1; 0.57 here
    config = json.loads(json.dumps(straight))  # plain numbers
    assert config["epoch"] == 2
    last = str(tmp_path / "s" / "last.npz")
    assert evaluate_cli.main(["--checkpoint", last, "--device", "cpu"]) == 1
    assert "built in Python" in capsys.readouterr().err
    with pytest.raises(TypeError, match="unknown option 'epoch'"):
        train_cli.fit(net(), epoch=3)


@needs_mnist
def test_lenet5_classic_with_rbf_output_trains_over_two_workers(tmp_path, capsys):
    """The fixed RBF centres (no gradient) pass through the shared-memory workers."""
    args = ["--device", "cpu", "--data-dir", str(DATA), "--epochs", "1", "--limit-train", "5000"]
    args += ["--limit-test", "500", "--arch", "lenet5-classic", "--output", "rbf", "--workers", "2"]
    assert train_cli.main(args + ["--quiet", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["test_acc"] > 0.3 and np.isfinite(record["train_loss"])
    from lenet_xp.storage.checkpoint import load_checkpoint

    state, _, meta = load_checkpoint(tmp_path / "last.npz")
    assert meta["config"]["arch"] == "lenet5-classic" and meta["config"]["output"] == "rbf"
    from lenet_xp.layers import DIGIT_BITMAPS

    np.testing.assert_array_equal(state["rbf.centres"], DIGIT_BITMAPS)  # not trained


def test_sequential_refuses_what_is_not_a_layer():
    """A non-layer would otherwise be dropped without a word (children are found by type)."""
    with pytest.raises(TypeError, match="Sequential: 1 is a str, not a layer"):
        Sequential([ReLU(), "relu"])
    with pytest.raises(TypeError, match="Sequential: head is a function"):
        Sequential(ReLU(), head=lambda x: x)
