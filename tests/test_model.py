"""LeNet5: size, PyTorch-compatible state_dict, loss_and_grads, and learning a small problem."""

import numpy as np
import pytest
from gradcheck import numerical_grad, rel_error

from lenet_xp import LeNet5, loss_and_grads
from lenet_xp.functional.loss import softmax_cross_entropy

TORCH_SHAPES = {
    "conv1.weight": (6, 1, 5, 5),
    "conv1.bias": (6,),
    "conv2.weight": (16, 6, 5, 5),
    "conv2.bias": (16,),
    "fc1.weight": (120, 400),
    "fc1.bias": (120,),
    "fc2.weight": (84, 120),
    "fc2.bias": (84,),
    "fc3.weight": (10, 84),
    "fc3.bias": (10,),
}


def test_parameter_count_and_names():
    model = LeNet5(seed=0)
    assert model.num_parameters() == 61_706
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == TORCH_SHAPES
    assert all(v.dtype == np.float32 for v in model.state_dict().values())


def test_same_seed_same_weights_and_pytorch_default_bounds():
    a, b, c = LeNet5(seed=3), LeNet5(seed=3), LeNet5(seed=4)
    for name, value in a.state_dict().items():
        np.testing.assert_array_equal(value, b.state_dict()[name])
        fan_in = np.prod(value.shape[1:]) if value.ndim > 1 else None
        if fan_in:
            assert np.abs(value).max() <= 1 / np.sqrt(fan_in)
    assert not np.array_equal(a.fc1.weight.data, c.fc1.weight.data)


def test_state_dict_round_trip_and_errors():
    source, target = LeNet5(seed=1), LeNet5(seed=2)
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    target.load_state_dict({k: v.copy() for k, v in source.state_dict().items()})
    np.testing.assert_array_equal(source.forward(x), target.forward(x))
    bad = dict(source.state_dict())
    bad["fc1.weight"] = np.zeros((120, 399), np.float32)
    with pytest.raises(ValueError, match="fc1.weight"):
        target.load_state_dict(bad)
    with pytest.raises(KeyError, match="conv1.bias"):
        target.load_state_dict({k: v for k, v in source.state_dict().items() if k != "conv1.bias"})


def test_loss_and_grads_match_finite_differences():
    model = LeNet5(seed=0, dtype="float64")
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((4, 1, 28, 28)), rng.integers(0, 10, 4)
    loss, grads = loss_and_grads(model, x, labels)
    assert set(grads) == set(TORCH_SHAPES)
    assert float(loss) == pytest.approx(float(softmax_cross_entropy(model.forward(x), labels)[0]))
    grads = {k: v.copy() for k, v in grads.items()}

    def f():
        return float(softmax_cross_entropy(model.forward(x), labels)[0])

    for name, param in model.named_parameters():
        # Check a random sample of entries of each tensor (all of them is ~61k forwards).
        flat = param.data.reshape(-1)
        idx = rng.choice(flat.size, size=min(flat.size, 12), replace=False)
        picked = flat[idx].copy()
        view = picked  # perturb through a tiny proxy array written back into the tensor

        def f_entry(view=view, idx=idx, flat=flat):
            flat[idx] = view
            return f()

        numeric = numerical_grad(f_entry, view)
        flat[idx] = picked
        assert rel_error(grads[name].reshape(-1)[idx], numeric) <= 1e-6, name


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        LeNet5().forward(np.zeros((2, 28, 28), np.float32))


def test_learns_a_small_synthetic_problem():
    """A few hundred Adam steps drive the loss on 64 fixed random images close to zero."""
    from lenet_xp.optim.optimizers import Adam

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, 64)
    model = LeNet5(seed=0)
    optimizer = Adam(model.parameters(), lr=1e-3)
    first = None
    for _ in range(200):
        loss, _ = loss_and_grads(model, x, labels)
        optimizer.step()
        first = float(loss) if first is None else first
    assert first > 2.0 and float(loss) < 0.01


def test_matches_pytorch_forward_and_backward():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    net = nn.Sequential()
    net.conv1, net.r1, net.p1 = nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2)
    net.conv2, net.r2, net.p2 = nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2)
    net.flat, net.fc1, net.r3 = nn.Flatten(), nn.Linear(400, 120), nn.ReLU()
    net.fc2, net.r4, net.fc3 = nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10)
    net = net.double()
    model = LeNet5(seed=0, dtype="float64")
    net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in model.state_dict().items()})
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((8, 1, 28, 28)), rng.integers(0, 10, 8)
    loss, grads = loss_and_grads(model, x, labels)
    torch_loss = nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(labels))
    torch_loss.backward()
    assert float(loss) == pytest.approx(torch_loss.item(), rel=1e-12)
    for name, param in net.named_parameters():
        np.testing.assert_allclose(grads[name], param.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_astype_converts_parameters_and_outputs():
    model = LeNet5(seed=0).astype("float64")
    assert {v.dtype for v in model.state_dict().values()} == {np.dtype(np.float64)}
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28))
    assert model.forward(x).dtype == np.float64
    np.testing.assert_allclose(
        model.forward(x), LeNet5(seed=0).forward(x.astype(np.float32)), rtol=1e-4, atol=1e-5
    )
