"""The same layers on every device there is: CPU always, CUDA when CuPy and a GPU answer.

CPU<->GPU parity: the same weights and batch give the same logits, loss and gradients
(float32 within 1e-4, float64 within 1e-10).
"""

import importlib.util

import numpy as np
import pytest

from lenet_xp import LeNet5, loss_and_grads
from lenet_xp.backend import asnumpy, cuda_unavailable_reason, get_device, to_device
from lenet_xp.layers import AvgPool2d, BatchNorm2d, Conv2d, Dropout, LeCunTanh, Linear, MaxPool2d

NO_CUDA = cuda_unavailable_reason() if importlib.util.find_spec("cupy") else "CuPy is not installed"
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(bool(NO_CUDA), reason=f"{NO_CUDA}")),
]
needs_cuda = pytest.mark.skipif(bool(NO_CUDA), reason=f"no usable GPU: {NO_CUDA}")
TOL = {"float32": 1e-4, "float64": 1e-10}


def batch(dtype, n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 28, 28)).astype(dtype), rng.integers(0, 10, n)


@pytest.mark.parametrize("device", DEVICES)
def test_training_steps_lower_the_loss_on_device(device):
    from lenet_xp.optim import Adam

    dev = get_device(device)
    x, y = (to_device(a, dev) for a in batch("float32", 32))
    model = LeNet5(seed=0).to(dev)
    optimizer = Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, grads = loss_and_grads(model, x, y)
        optimizer.step()
        losses.append(float(loss))
    assert all(type(g) is type(x) for g in grads.values())  # gradients live on the device
    assert losses[-1] < 0.5 * losses[0]


@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cpu_gpu_parity_lenet(dtype):
    x, y = batch(dtype)
    cpu_model = LeNet5(seed=0, dtype=dtype)
    gpu_model = LeNet5(seed=0, dtype=dtype).to("cuda")
    cpu_loss, cpu_grads = loss_and_grads(cpu_model, x, y)
    gpu_loss, gpu_grads = loss_and_grads(gpu_model, to_device(x, "cuda"), to_device(y, "cuda"))
    tol = TOL[dtype]
    np.testing.assert_allclose(
        asnumpy(gpu_model.forward(to_device(x, "cuda"))), cpu_model.forward(x), rtol=tol, atol=tol
    )
    assert abs(float(gpu_loss) - float(cpu_loss)) <= tol
    for name, grad in cpu_grads.items():
        np.testing.assert_allclose(asnumpy(gpu_grads[name]), grad, rtol=tol, atol=tol, err_msg=name)


@needs_cuda
@pytest.mark.parametrize(
    "make,shape",
    [
        (
            lambda: Conv2d(3, 4, 3, 2, 1, rng=np.random.default_rng(0), dtype="float64"),
            (2, 3, 7, 8),
        ),
        (lambda: Linear(5, 3, rng=np.random.default_rng(0), dtype="float64"), (4, 5)),
        (lambda: MaxPool2d(3, 2), (2, 3, 7, 8)),
        (lambda: AvgPool2d(2), (2, 3, 6, 8)),
        (lambda: LeCunTanh(), (2, 3, 4, 5)),
        (lambda: BatchNorm2d(3, dtype="float64"), (4, 3, 5, 5)),
    ],
)
def test_cpu_gpu_parity_layers(make, shape):
    x = np.random.default_rng(1).standard_normal(shape)
    g_out = None
    results = []
    for device in ("cpu", "cuda"):
        layer = make().to(device)
        y = layer.forward(to_device(x, device))
        g_out = np.random.default_rng(2).standard_normal(y.shape) if g_out is None else g_out
        grad_x = layer.backward(to_device(g_out, device))
        grads = [asnumpy(p.grad) for p in layer.parameters()]
        results.append((asnumpy(y), asnumpy(grad_x), grads))
    (y_c, gx_c, gp_c), (y_g, gx_g, gp_g) = results
    np.testing.assert_allclose(y_g, y_c, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gx_g, gx_c, rtol=1e-10, atol=1e-10)
    for a, b in zip(gp_g, gp_c, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


@needs_cuda
def test_dropout_on_gpu_masks_on_device():
    layer = Dropout(0.5, seed=0)
    y = layer.forward(to_device(np.ones((100, 100), np.float32), "cuda"))
    kept = asnumpy(y) != 0
    assert abs(kept.mean() - 0.5) < 0.05 and np.allclose(asnumpy(y)[kept], 2.0)


@needs_cuda
def test_three_gpu_epochs_reach_the_cpu_accuracy_band(tmp_path):
    import json
    import os
    from pathlib import Path

    from lenet_xp import train

    data = os.environ.get(
        "LENET_XP_DATA", str(Path(__file__).resolve().parents[2] / "shared/datasets/mnist")
    )
    accs = {}
    for device in ("cpu", "cuda"):
        args = ["--device", device, "--epochs", "3", "--limit-train", "10000", "--quiet"]
        args += ["--data-dir", data, "--out", str(tmp_path / device)]
        assert train.main(args) == 0
        last = (tmp_path / device / "metrics.jsonl").read_text().splitlines()[-1]
        accs[device] = json.loads(last)["test_acc"]
    assert accs["cuda"] > 0.95 and abs(accs["cuda"] - accs["cpu"]) < 0.01


@needs_cuda
@pytest.mark.parametrize("name", ["adam", "adamw", "nesterov"])
def test_optimizer_steps_match_across_devices(name):
    """Adam runs as one fused kernel per parameter on a GPU: same numbers as the CPU's."""
    from lenet_xp.layers import Parameter
    from lenet_xp.optim import make_optimizer

    rng = np.random.default_rng(0)
    start = rng.standard_normal((7, 5))
    grads = [rng.standard_normal((7, 5)) for _ in range(5)]
    finals = []
    for device in ("cpu", "cuda"):
        param = Parameter(to_device(start.copy(), device))
        optimizer = make_optimizer(name, [param], lr=1e-2, weight_decay=1e-2)
        for grad in grads:
            param.grad = to_device(grad, device)
            optimizer.step()
        finals.append(asnumpy(param.data))
    np.testing.assert_allclose(finals[1], finals[0], rtol=1e-12, atol=1e-12)
