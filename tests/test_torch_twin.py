"""``bench --torch``'s PyTorch side for every preset: each network's PyTorch twin
(``lenet_xp.benchmarks.torch_twin``) computes our forward, loss and every gradient, on the
CPU in float64 (PyTorch 2.13, the ``bench`` extra)."""

import numpy as np
import pytest

from lenet_xp.backend import host_rng
from lenet_xp.models.lenet5 import model_loss
from lenet_xp.models.presets import PRESETS, Options, build

torch = pytest.importorskip("torch")
from lenet_xp.benchmarks.torch_twin import torch_loss, torch_twin  # noqa: E402

CASES = [(arch, {}) for arch in sorted(PRESETS)] + [
    ("lenet5-classic", {"output": "rbf"}),
    ("lenet5-classic", {"pool": "max", "activation": "sigmoid"}),
    ("lenet5", {"batchnorm": True, "activation": "leaky_relu", "pool": "avg"}),
]
IDS = ["-".join([arch, *(f"{k}={v}" for k, v in o.items())]) for arch, o in CASES]


def _ours(model, x, labels):
    logits = model.forward(x)
    loss, grad = model_loss(model, logits, labels)
    model.backward(grad)
    grads = {name: p.grad for name, p in model.named_parameters()}
    return logits, float(loss), grads


@pytest.mark.parametrize("arch, options", CASES, ids=IDS)
def test_the_torch_twin_computes_our_forward_and_gradients(arch, options):
    model = build(arch, Options(dtype="float64", pad32=PRESETS[arch].pad32, **options))
    rng = host_rng(11)
    side = model.input_size
    x = rng.standard_normal((6, 1, side, side))
    labels = rng.integers(0, 10, 6)
    net = torch_twin(model)
    net.train()
    logits, loss, grads = _ours(model, x, labels)
    tx = torch.from_numpy(x).requires_grad_(False)
    t_logits = net(tx)
    t_loss = torch_loss(model)(t_logits, torch.from_numpy(labels))
    t_loss.backward()
    np.testing.assert_allclose(t_logits.detach().numpy(), logits, rtol=1e-10, atol=1e-10)
    assert abs(t_loss.item() - loss) < 1e-10
    t_params = dict(net.named_parameters())
    for name, grad in grads.items():
        t_grad = t_params[name].grad
        if grad is None:  # RBF's fixed centres
            assert t_grad is None, name
            continue
        t_grad = t_grad.numpy()
        layer = getattr(model, name.split(".")[0])
        if name.endswith("weight") and hasattr(layer, "table"):  # the dense C3, masked
            out_index, in_index = layer._out_index, layer._in_index
            outside = np.ones(t_grad.shape[:2], bool)
            outside[out_index, in_index] = False
            assert not t_grad[outside].any(), "a kernel outside the table got a gradient"
            t_grad = t_grad[out_index, in_index]
        np.testing.assert_allclose(t_grad, grad, rtol=1e-9, atol=1e-11, err_msg=name)
