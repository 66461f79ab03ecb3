"""The same layers on every device there is: CPU always, CUDA when CuPy and a GPU answer.

CPU<->GPU parity: the same weights and batch give the same logits, loss and gradients
(float32 within 1e-4, float64 within 1e-10).
"""

import numpy as np
import pytest
from conftest import DATA, DEVICES, needs_cuda, needs_mnist, needs_two_gpus

from lenet_xp import LeNet5, loss_and_grads
from lenet_xp.backend import asnumpy, get_device, to_device, use_device
from lenet_xp.layers import AvgPool2d, BatchNorm2d, Conv2d, Dropout, LeCunTanh, Linear, MaxPool2d

TOL = {"float32": 1e-4, "float64": 1e-10}


def batch(dtype, n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 28, 28)).astype(dtype), rng.integers(0, 10, n)


@pytest.mark.parametrize("device", DEVICES)
def test_training_steps_lower_the_loss_on_device(device):
    from lenet_xp.optim.optimizers import Adam

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


@needs_mnist
@needs_cuda  # listed last, checked first: without a GPU, that is the reason
def test_three_gpu_epochs_reach_the_cpu_accuracy_band(tmp_path):
    import json

    from lenet_xp import train

    accs = {}
    for device in ("cpu", "cuda"):
        args = ["--device", device, "--epochs", "3", "--limit-train", "10000", "--quiet"]
        args += ["--data-dir", str(DATA), "--out", str(tmp_path / device)]
        assert train.main(args) == 0
        last = (tmp_path / device / "metrics.jsonl").read_text().splitlines()[-1]
        accs[device] = json.loads(last)["test_acc"]
    assert accs["cuda"] > 0.95 and abs(accs["cuda"] - accs["cpu"]) < 0.01


@needs_cuda
@pytest.mark.parametrize("kernels_on", [False, True])
@pytest.mark.parametrize("name", ["adam", "adamw", "nesterov"])
def test_optimizer_steps_match_across_devices(name, kernels_on):
    """With our kernels on, Adam runs as one fused kernel per parameter on a GPU; on or off,
    the same numbers as the CPU's."""
    from lenet_xp.layers import Parameter
    from lenet_xp.optim.optimizers import make_optimizer

    rng = np.random.default_rng(0)
    start = rng.standard_normal((7, 5))
    grads = [rng.standard_normal((7, 5)) for _ in range(5)]
    finals = []
    for device in ("cpu", "cuda"):
        param = Parameter(to_device(start.copy(), device))
        optimizer = make_optimizer(name, [param], lr=1e-2, weight_decay=1e-2)
        optimizer.cuda_kernels = kernels_on  # on the CPU: no effect
        for grad in grads:
            param.grad = to_device(grad, device)
            optimizer.step()
        finals.append(asnumpy(param.data))
    np.testing.assert_allclose(finals[1], finals[0], rtol=1e-12, atol=1e-12)


@needs_two_gpus
def test_use_device_puts_new_arrays_on_that_gpu():
    from lenet_xp.backend import import_cupy

    cupy = import_cupy()

    with use_device("cuda:1"):
        assert cupy.zeros(3).device.id == 1
        model = LeNet5(seed=0).to("cuda:1")
        loss, grads = loss_and_grads(model, *(to_device(a, "cuda:1") for a in batch("float32")))
        assert {g.device.id for g in grads.values()} == {1}
    assert cupy.zeros(3).device.id == 0  # the context is left again


@needs_mnist
@needs_two_gpus
def test_a_cuda_1_run_stays_on_device_1(tmp_path):
    """``--device cuda:1``: data, parameters, optimizer state and evaluation all live in
    device 1's memory pool; device 0's pool does not grow by a byte."""
    import json

    from lenet_xp.backend import import_cupy

    cupy = import_cupy()

    from lenet_xp import evaluate, train

    pool = cupy.get_default_memory_pool()

    def pool_bytes(index):
        with cupy.cuda.Device(index):
            return pool.total_bytes()

    for index in (0, 1):  # what is left is in use: the run cannot reuse a cached block
        with cupy.cuda.Device(index):
            pool.free_all_blocks()
    before = pool_bytes(0), pool_bytes(1)
    common = ["--device", "cuda:1", "--data-dir", str(DATA)]
    args = common + ["--epochs", "1", "--limit-train", "2000", "--limit-test", "1000", "--quiet"]
    assert train.main(args + ["--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["device"] == "cuda:1" and record["test_acc"] > 0.3  # 1 epoch, 1,833 images
    assert evaluate.main(common + ["--checkpoint", str(tmp_path / "last.npz")]) == 0
    assert pool_bytes(1) > before[1]  # the run's arrays were on device 1 ...
    assert pool_bytes(0) == before[0]  # ... and not one byte on device 0
