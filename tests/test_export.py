"""Export: every preset as a checked ONNX graph that computes the model's logits (onnx's
reference evaluator, and onnxruntime when installed), PyTorch-named weights that load into
``torch.nn`` networks, and such weights back into a checkpoint."""

import json

import numpy as np
import pytest
from conftest import DATA, DEVICES, needs_mnist

from lenet_xp import evaluate as evaluation
from lenet_xp import export
from lenet_xp.backend import asnumpy, get_device
from lenet_xp.data.device_split import DeviceSplit
from lenet_xp.data.mnist import MEAN, STD, load_mnist
from lenet_xp.models.onnx import IR_VERSION, OPSET, to_onnx
from lenet_xp.models.presets import Options, build
from lenet_xp.predict import predict
from lenet_xp.storage.checkpoint import load_checkpoint
from lenet_xp.training.evaluation import load_model

onnx = pytest.importorskip("onnx")
from onnx.reference import ReferenceEvaluator  # noqa: E402

try:
    import onnxruntime
except ImportError:  # optional: the reference evaluator alone then
    onnxruntime = None
try:
    import torch
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")

#: Every preset, and each option that changes the graph: (arch, options).
CASES = [
    ("lenet5", {}),
    ("lenet5", {"pad32": True}),
    ("lenet5", {"batchnorm": True, "dropout": 0.3}),
    ("lenet5", {"activation": "leaky_relu", "pool": "avg", "dtype": "float64"}),
    ("lenet5-nopad", {"activation": "tanh"}),
    ("lenet5-sigmoid-avg", {}),
    ("lenet5-classic", {}),
    ("lenet5-classic", {"output": "rbf"}),
    ("lenet5-classic", {"pool": "max", "batchnorm": True, "activation": "sigmoid"}),
    ("compact-cnn", {}),
]
IDS = ["-".join([arch, *(f"{k}={v}" for k, v in o.items())]) for arch, o in CASES]


@pytest.fixture(scope="module")
def digits():
    """20 real MNIST test digits as pixels ``(20, 1, 28, 28)`` float32 in [0, 1]."""
    if not (DATA / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST not found in {DATA}")
    return (load_mnist(DATA, download=False).test_images[:20, None] / np.float32(255)).copy()


@pytest.fixture(scope="module")
def checkpoint(trained_checkpoint):
    """The session's trained LeNet-5 (conftest's: trained once, shared with the serve tests)."""
    return trained_checkpoint


def random_model(arch, options):
    """The preset with its seed's weights and random batch-norm statistics, in eval mode."""
    model = build(arch, Options(**options))
    rng = np.random.default_rng(1)
    for name, value in model.state_dict().items():
        if "running" in name:
            value[...] = rng.uniform(0.5, 1.5, value.shape)
    return model.eval()


def logits_of(model, pixels):
    """The model's own logits (host) for pixels ``(N, 1, 28, 28)`` in [0, 1]."""
    x = (pixels - MEAN) / STD
    if model.input_size == 32:
        x = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)), constant_values=-MEAN / STD)
    dtype = model.parameters()[0].data.dtype
    return asnumpy(model.forward(get_device("cpu").xp.asarray(x, dtype=dtype)))


def run_onnx(proto, pixels):
    """``[(runner, logits, probabilities)]`` from the reference evaluator and onnxruntime."""
    runs = [("reference", *ReferenceEvaluator(proto).run(None, {"pixels": pixels}))]
    if onnxruntime is not None:
        session = onnxruntime.InferenceSession(
            proto.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        runs.append(("onnxruntime", *session.run(None, {"pixels": pixels})))
    return runs


def assert_same(runs, want):
    for runner, logits, probs in runs:
        assert logits.shape == want.shape, runner
        np.testing.assert_allclose(logits, want, atol=1e-4, rtol=1e-5, err_msg=runner)
        assert (logits.argmax(axis=1) == want.argmax(axis=1)).all(), runner
        np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5, err_msg=runner)


@needs_mnist
def test_onnx_on_the_test_set_scores_the_checkpoints_accuracy(checkpoint):
    """The exported graph on MNIST's test digits (as the README's snippet feeds them: pixels
    in [0, 1]) gets the accuracy ``evaluate`` gives the checkpoint, to one digit: all 10,000
    with onnxruntime, the first 1,000 with onnx's (slow) reference evaluator without it."""
    count = 10_000 if onnxruntime is not None else 1_000
    model, meta = load_model(str(checkpoint), get_device("cpu"))
    test = evaluation.test_split(meta, get_device("cpu"), str(DATA))  # not a test: a data split
    test = DeviceSplit(test.images[:count], test.labels[:count], test.device)
    _, accuracy, _ = evaluation.evaluate(model, test)
    mnist = load_mnist(DATA, download=False)
    pixels, labels = mnist.test_images[:count, None] / np.float32(255), mnist.test_labels[:count]
    proto = to_onnx(model)
    if onnxruntime is not None:
        runner = onnxruntime.InferenceSession(
            proto.SerializeToString(), providers=["CPUExecutionProvider"]
        )
    else:
        runner = ReferenceEvaluator(proto)
    logits, _ = runner.run(None, {"pixels": pixels})
    correct = int((logits.argmax(axis=1) == labels).sum())
    assert abs(correct - round(accuracy * count)) <= 1, (correct, accuracy)
    assert correct > 0.9 * count  # a trained model, so the check can fail


@needs_mnist
def test_onnx_cli_on_a_trained_checkpoint(checkpoint, digits, tmp_path, capsys):
    path = tmp_path / "model.onnx"
    assert export.main(["--checkpoint", str(checkpoint), "--to", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {path}"
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version == IR_VERSION and proto.opset_import[0].version == OPSET
    assert [i.name for i in proto.graph.input] == ["pixels"]
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities"]
    exported = json.loads(proto.metadata_props[0].value)
    assert exported["arch"] == "lenet5"
    assert "data_dir" in load_checkpoint(checkpoint)[2]["config"]  # the run records its data
    assert "data_dir" not in exported  # ... but a shared model carries no local path
    model, _ = load_model(str(checkpoint), get_device("cpu"))
    want = logits_of(model.eval(), digits)
    assert_same(run_onnx(proto, digits), want)
    labels = load_mnist(DATA, download=False).test_labels[:20]
    assert (want.argmax(axis=1) == labels).sum() >= 15  # a trained model: chance is 2
    predicted, _ = predict(model, digits)
    assert (predicted == want.argmax(axis=1)).all()


@needs_mnist
@pytest.mark.parametrize("arch, options", CASES, ids=IDS)
def test_every_preset_exports_to_plain_onnx_ops(arch, options, digits):
    model = random_model(arch, options)
    proto = to_onnx(model)
    ops = {node.op_type for node in proto.graph.node}
    assert "Dropout" not in ops and ops <= {
        "Sub", "Div", "Pad", "Conv", "MaxPool", "AveragePool", "Mul", "Add", "Relu",
        "LeakyRelu", "Sigmoid", "Tanh", "BatchNormalization", "Flatten", "Gemm",
        "ReduceSumSquare", "Identity", "Softmax",
    }  # fmt: skip
    assert ("Pad" in ops) == (model.input_size == 32)
    batchnorm = any(name.endswith("running_mean") for name in model.state_dict())
    assert ("BatchNormalization" in ops) == batchnorm
    if arch == "lenet5-classic":  # C3 is a Conv with zeros outside the connection table
        (c3,) = [i for i in proto.graph.initializer if i.name == "conv2.weight"]
        dense = onnx.numpy_helper.to_array(c3)
        assert dense.shape == (16, 6, 5, 5) and (np.abs(dense).sum(axis=(2, 3)) > 0).sum() == 60
    assert_same(run_onnx(proto, digits[:10]), logits_of(model, digits[:10]))


@pytest.mark.parametrize("device", DEVICES)
def test_onnx_export_is_the_same_from_any_device(device):
    model = random_model("lenet5-classic", {"output": "rbf"})
    on_cpu = to_onnx(model).SerializeToString()
    assert to_onnx(model.to(get_device(device))).SerializeToString() == on_cpu


# -- PyTorch ----------------------------------------------------------------------------------
def torch_twin(model):
    """A ``torch.nn.Sequential`` with the same layer names as ``model`` (any preset), PyTorch's
    own initial weights: ``bench --torch``'s twin."""
    from lenet_xp.benchmarks.torch_twin import torch_twin as twin

    return twin(model, weights=False)


def load_into_torch(net, path):
    with np.load(path) as data:
        net.load_state_dict({k: torch.from_numpy(data[k]) for k in data.files})  # strict
    return net.eval()


def torch_logits(net, model, pixels):
    x = (pixels - MEAN) / STD
    if model.input_size == 32:
        x = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)), constant_values=-MEAN / STD)
    dtype = torch.float64 if model.parameters()[0].data.dtype == np.float64 else torch.float32
    with torch.no_grad():
        return net.to(dtype)(torch.from_numpy(x).to(dtype)).numpy()


@needs_mnist
@needs_torch
@pytest.mark.parametrize("arch, options", CASES, ids=IDS)
def test_weights_load_into_torch_and_come_back(arch, options, digits, tmp_path):
    """--to weights.npz: torch's load_state_dict takes it (strict) and computes the same
    logits; --from turns it back into a checkpoint that evaluate/predict load unchanged."""
    model = random_model(arch, options)
    ckpt, weights, back = tmp_path / "ckpt.npz", tmp_path / "w.npz", tmp_path / "back.npz"
    from lenet_xp.storage.checkpoint import save_checkpoint

    config = {"arch": arch, **options}
    save_checkpoint(ckpt, model.state_dict(), {}, {"config": config, "epoch": 3})
    assert export.main(["--checkpoint", str(ckpt), "--to", str(weights)]) == 0
    net = load_into_torch(torch_twin(model), weights)
    want = logits_of(model, digits[:10])
    np.testing.assert_allclose(torch_logits(net, model, digits[:10]), want, atol=1e-4, rtol=1e-5)

    flags = [
        f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in options.items()
    ]
    args = ["--from", str(weights), "--to", str(back), "--arch", arch, *flags]
    assert export.main(args) == 0
    again, meta = load_model(str(back), get_device("cpu"))
    assert meta["config"]["arch"] == arch
    for name, value in model.state_dict().items():
        assert np.array_equal(asnumpy(again.state_dict()[name]), asnumpy(value)), name
        assert again.state_dict()[name].dtype == value.dtype, name


@needs_mnist
@needs_torch
def test_a_torch_lenet5_imports_and_predicts_the_same(digits, tmp_path, capsys):
    nn, F = torch.nn, torch.nn.functional

    class LeNet5(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 6, 5, padding=2), nn.Conv2d(6, 16, 5)
            self.fc1, self.fc2, self.fc3 = (
                nn.Linear(400, 120),
                nn.Linear(120, 84),
                nn.Linear(84, 10),
            )

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv1(x)), 2)
            x = F.max_pool2d(F.relu(self.conv2(x)), 2).flatten(1)
            return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    torch.manual_seed(0)
    net = LeNet5().eval()
    weights, ckpt = tmp_path / "torch.npz", tmp_path / "ckpt.npz"
    np.savez(weights, **{k: v.numpy() for k, v in net.state_dict().items()})
    assert export.main(["--from", str(weights), "--to", str(ckpt)]) == 0  # --arch lenet5
    with torch.no_grad():
        want = net(torch.from_numpy((digits - MEAN) / STD)).numpy()
    model, _ = load_model(str(ckpt), get_device("cpu"))
    np.testing.assert_allclose(logits_of(model.eval(), digits), want, atol=1e-4, rtol=1e-5)
    digits_back, _ = predict(str(ckpt), digits)
    assert (digits_back == want.argmax(axis=1)).all()
    # and the other way: our export loads into the user's class
    assert export.main(["--checkpoint", str(ckpt), "--to", str(tmp_path / "again.npz")]) == 0
    load_into_torch(LeNet5(), tmp_path / "again.npz")


# -- errors: one line each ----------------------------------------------------------------
def test_a_layer_without_an_onnx_form_is_named():
    from lenet_xp.layers import Flatten, Module, Sequential
    from lenet_xp.models.onnx import ExportError

    class Square(Module):
        def forward(self, x):
            return x * x

    model = Sequential(input_shape=(1, 28, 28), flatten=Flatten(), square=Square())
    with pytest.raises(ExportError, match=r"^layer square \(Square\) has no ONNX form$"):
        to_onnx(model)


@needs_torch
def test_bad_inputs_are_one_line_each(tmp_path, capsys):
    classic = build("lenet5-classic")
    ckpt, weights = tmp_path / "c.npz", tmp_path / "w.npz"
    from lenet_xp.storage.checkpoint import save_checkpoint

    save_checkpoint(ckpt, classic.state_dict(), {}, {"config": {"arch": "lenet5-classic"}})
    assert export.main(["--checkpoint", str(ckpt), "--to", str(weights)]) == 0
    capsys.readouterr()
    with np.load(weights) as data:
        state = dict(data)
    state["conv2.weight"][0, 5] = 1.0  # C3 map 0 does not see S2 map 5
    np.savez(tmp_path / "dense.npz", **state)
    (tmp_path / "junk.npz").write_text("junk")
    out = ["--to", str(tmp_path / "x.npz")]
    cases = [
        (["--checkpoint", str(tmp_path / "none.npz"), *out], "does not exist"),
        (["--from", str(weights), *out], "does not fit --arch lenet5"),
        (["--from", str(tmp_path / "dense.npz"), *out, "--arch", "lenet5-classic"],
         "conv2.weight has non-zero kernels outside the connection table"),
        (["--from", str(tmp_path / "junk.npz"), *out], "junk.npz: not a weights"),
        (["--from", str(weights), *out, "--arch", "nope"], "unknown --arch 'nope'"),
    ]  # fmt: skip
    for args, message in cases:
        assert export.main(args) == 1
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("lenet_xp.export: error: ") and message in line, line
    assert not (tmp_path / "x.npz").exists()
    with pytest.raises(SystemExit):
        export.main(["--checkpoint", str(ckpt), "--to", "model.txt"])
    assert "name a .onnx or a .npz file" in capsys.readouterr().err
