"""Optimizers and learning-rate schedules: hand-computed steps, dtypes, checkpoints,
convergence, and (when torch is installed) agreement with torch.optim."""

from __future__ import annotations

import io
import math
from itertools import pairwise

import numpy as np
import pytest

from lenet_xp.layers.module import Parameter
from lenet_xp.optim.optimizers import SGD, Adam, AdamW, Optimizer, make_optimizer
from lenet_xp.optim.schedules import (
    ConstantLR,
    CosineLR,
    OneCycleLR,
    StepLR,
    make_schedule,
)

# A two-element parameter starting at W0, stepped with the fixed gradients GRADS.
W0 = [1.0, -2.0]
GRADS = [[0.5, 1.0], [-1.0, 0.25], [2.0, -0.5]]


def run_steps(make: type[Optimizer] | object, **kwargs: object) -> list[list[float]]:
    """Parameter values after each step of GRADS, for ``make([param], **kwargs)``."""
    param = Parameter(np.array(W0, dtype=np.float64))
    optimizer = make([param], **kwargs)
    values = []
    for grad in GRADS:
        param.grad = np.array(grad, dtype=np.float64)
        optimizer.step()
        values.append(param.data.tolist())
    return values


# Expected values worked out by hand from the torch.optim formulas (lr = 0.1 throughout).
HAND_COMPUTED = {
    # w -= lr * g
    "sgd": (
        dict(make=SGD, lr=0.1),
        [[0.95, -2.1], [1.05, -2.125], [0.85, -2.075]],
    ),
    # buf = g, then buf = 0.9 buf + g; w -= lr * buf
    # e.g. w[0]: 1 - 0.05 = 0.95; buf = 0.45 - 1 = -0.55 -> 1.005; buf = -0.495 + 2 -> 0.8545
    "momentum": (
        dict(make=SGD, lr=0.1, momentum=0.9),
        [[0.95, -2.1], [1.005, -2.215], [0.8545, -2.2685]],
    ),
    # g += 0.1 w; buf = g, then buf = 0.9 buf + 0.5 g; w -= lr * buf
    # w[0]: g = 0.6 -> 0.94; g = -0.906, buf = 0.54 - 0.453 = 0.087 -> 0.9313;
    #       g = 2.09313, buf = 0.0783 + 1.046565 = 1.124865 -> 0.8188135
    "momentum+dampening+weight_decay": (
        dict(make=SGD, lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.1),
        [[0.94, -2.08], [0.9313, -2.1541], [0.8188135, -2.1850195]],
    ),
    # buf as for momentum; w -= lr * (g + 0.9 buf)
    # w[0]: 1 - 0.1 * (0.5 + 0.45) = 0.905; buf = -0.55, 0.905 - 0.1 * (-1 - 0.495) = 1.0545
    "nesterov": (
        dict(make=SGD, lr=0.1, momentum=0.9, nesterov=True),
        [[0.905, -2.19], [1.0545, -2.3185], [0.71905, -2.31665]],
    ),
    # g += 0.1 w first: w[0]: g = 0.6, 1 - 0.1 * (0.6 + 0.54) = 0.886
    "nesterov+weight_decay": (
        dict(make=SGD, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
        [[0.886, -2.152], [1.010566, -2.223412], [0.641448646, -2.147305972]],
    ),
    # m = 0.9 m + 0.1 g, v = 0.999 v + 0.001 g^2, w -= lr (m / (1 - 0.9^t)) /
    # (sqrt(v / (1 - 0.999^t)) + 1e-8). Step 1: w[0] = 1 - 0.1 * 0.5 / (0.5 + 1e-8);
    # step 2: m = -0.055, v = 0.00124975, w[0] -= 0.1 (-0.055 / 0.19) / (sqrt(v / 0.001999) + 1e-8)
    "adam": (
        dict(make=Adam, lr=0.1),
        [
            [0.900000002, -2.099999999],
            [0.9366103542405654, -2.183059751227727],
            [0.8946447927181046, -2.2129149252194646],
        ],
    ),
    # as adam with g += 0.1 w: step 1 w[0] = 1 - 0.1 * 0.6 / (0.6 + 1e-8)
    "adam+weight_decay": (
        dict(make=Adam, lr=0.1, weight_decay=0.1),
        [
            [0.9000000016666666, -2.09999999875],
            [0.9252635194456061, -2.1706400355765036],
            [0.8776172608049325, -2.168674265825898],
        ],
    ),
    # w *= 1 - 0.1 * 0.1, then the adam step with the raw g:
    # step 1 w[0] = 0.99 - 0.1 * 0.5 / (0.5 + 1e-8)
    "adamw": (
        dict(make=AdamW, lr=0.1, weight_decay=0.1),
        [
            [0.890000002, -2.079999999],
            [0.9177103542205653, -2.1422597512377273],
            [0.8665676891558989, -2.1506923277170875],
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(HAND_COMPUTED))
def test_matches_hand_computed_steps(case: str) -> None:
    settings, expected = HAND_COMPUTED[case]
    settings = dict(settings)
    values = run_steps(settings.pop("make"), **settings)
    np.testing.assert_allclose(values, expected, rtol=1e-12, atol=0)


def test_gradient_is_not_modified_and_missing_gradients_are_skipped() -> None:
    stepped = Parameter(np.array([1.0, 2.0]))
    frozen = Parameter(np.array([3.0, 4.0]))
    optimizer = SGD([stepped, frozen], lr=0.5, momentum=0.9, weight_decay=0.1)
    grad = np.array([1.0, -1.0])
    stepped.grad = grad.copy()
    optimizer.step()
    np.testing.assert_array_equal(stepped.grad, grad)
    np.testing.assert_array_equal(frozen.data, [3.0, 4.0])
    assert optimizer.steps == 1
    assert "momentum_buffer.1" not in optimizer.state_dict()
    optimizer.zero_grad()
    assert stepped.grad is None and frozen.grad is None


ALL_NAMES = ["sgd", "nesterov", "adam", "adamw"]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_float32_stays_float32_in_place(name: str) -> None:
    rng = np.random.default_rng(0)
    params = [
        Parameter(rng.standard_normal((4, 3)).astype(np.float32)),
        Parameter(rng.standard_normal(3).astype(np.float32)),
    ]
    arrays = [param.data for param in params]
    optimizer = make_optimizer(name, params, lr=0.01, weight_decay=0.01)
    for _ in range(3):
        for param in params:
            param.grad = rng.standard_normal(param.shape).astype(np.float32)
        optimizer.step()
    for param, array in zip(params, arrays, strict=True):
        assert param.data is array
        assert param.data.dtype == np.float32
    for key, value in optimizer.state_dict().items():
        if isinstance(value, np.ndarray):
            assert value.dtype == np.float32, key


def make_params(seed: int = 0) -> list[Parameter]:
    rng = np.random.default_rng(seed)
    return [Parameter(rng.standard_normal((3, 4))), Parameter(rng.standard_normal(5))]


def random_grads(rng: np.random.Generator, params: list[Parameter]) -> list[np.ndarray]:
    return [rng.standard_normal(param.shape) for param in params]


def step_with(optimizer: Optimizer, params: list[Parameter], grads: list[np.ndarray]) -> None:
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad.copy()
    optimizer.step()


def savez_round_trip(state: dict[str, object]) -> dict[str, object]:
    buffer = io.BytesIO()
    np.savez(buffer, **state)
    buffer.seek(0)
    with np.load(buffer) as loaded:
        return {key: loaded[key] for key in loaded.files}


@pytest.mark.parametrize("name", ALL_NAMES)
def test_state_dict_round_trip_continues_identically(name: str) -> None:
    rng = np.random.default_rng(1)
    grads = [random_grads(rng, make_params()) for _ in range(5)]
    params = make_params()
    optimizer = make_optimizer(name, params, lr=0.05, weight_decay=0.01)
    for step_grads in grads[:3]:
        step_with(optimizer, params, step_grads)
    saved = savez_round_trip(optimizer.state_dict())

    resumed_params = [Parameter(param.data.copy()) for param in params]
    resumed = make_optimizer(name, resumed_params, lr=1.0, weight_decay=0.01)
    resumed.load_state_dict(saved)
    assert resumed.steps == 3 and resumed.lr == 0.05
    for step_grads in grads[3:]:
        step_with(optimizer, params, step_grads)
        step_with(resumed, resumed_params, step_grads)
    for param, resumed_param in zip(params, resumed_params, strict=True):
        np.testing.assert_array_equal(param.data, resumed_param.data)


def test_state_dict_is_a_snapshot() -> None:
    params = make_params()
    optimizer = Adam(params, lr=0.1)
    step_with(optimizer, params, random_grads(np.random.default_rng(2), params))
    saved = optimizer.state_dict()
    before = saved["exp_avg.0"].copy()
    step_with(optimizer, params, random_grads(np.random.default_rng(3), params))
    np.testing.assert_array_equal(saved["exp_avg.0"], before)
    assert saved["steps"] == 1 and saved["type"] == "Adam"


def test_load_state_dict_copies_onto_the_parameters_dtype() -> None:
    params = make_params()  # float64
    optimizer = Adam(params, lr=0.1)
    step_with(optimizer, params, random_grads(np.random.default_rng(7), params))
    saved = optimizer.state_dict()
    before = {key: value.copy() for key, value in saved.items() if isinstance(value, np.ndarray)}

    params32 = [Parameter(param.data.astype(np.float32)) for param in params]
    resumed = Adam(params32, lr=0.1)
    resumed.load_state_dict(saved)
    assert resumed.state[0]["exp_avg"].dtype == np.float32
    step_with(resumed, params32, random_grads(np.random.default_rng(8), params))
    for key, value in before.items():  # stepping the loaded optimizer left the source alone
        np.testing.assert_array_equal(saved[key], value)


def test_load_state_dict_rejects_mismatches() -> None:
    params = make_params()
    optimizer = Adam(params, lr=0.1)
    step_with(optimizer, params, random_grads(np.random.default_rng(4), params))
    good = optimizer.state_dict()

    with pytest.raises(ValueError, match="is for Adam, not AdamW"):
        AdamW(make_params(), lr=0.1).load_state_dict(good)
    with pytest.raises(ValueError, match="beta2"):
        Adam(make_params(), lr=0.1, betas=(0.9, 0.99)).load_state_dict(good)
    with pytest.raises(ValueError, match="shape"):
        wrong_shape = {**good, "exp_avg.1": np.zeros(4)}
        Adam(make_params(), lr=0.1).load_state_dict(wrong_shape)
    with pytest.raises(ValueError, match="unexpected key 'momentum_buffer.0'"):
        Adam(make_params(), lr=0.1).load_state_dict({**good, "momentum_buffer.0": np.zeros(5)})
    with pytest.raises(ValueError, match="parameter 2"):
        Adam(make_params(), lr=0.1).load_state_dict({**good, "exp_avg.2": np.zeros(5)})
    with pytest.raises(ValueError, match="missing keys \\['eps'\\]"):
        Adam(make_params(), lr=0.1).load_state_dict({k: v for k, v in good.items() if k != "eps"})
    partial = {k: v for k, v in good.items() if k != "exp_avg_sq.0"}
    target = Adam(make_params(), lr=0.1)
    with pytest.raises(ValueError, match="or none"):
        target.load_state_dict(partial)
    assert target.steps == 0 and target.state == [{}, {}]  # a failed load changes nothing


def test_invalid_arguments() -> None:
    params = make_params()
    with pytest.raises(ValueError, match="learning rate"):
        SGD(params, lr=-0.1)
    with pytest.raises(ValueError, match="Nesterov"):
        SGD(params, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="Nesterov"):
        SGD(params, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match="momentum"):
        SGD(params, lr=0.1, momentum=-0.5)
    with pytest.raises(ValueError, match="beta"):
        Adam(params, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="eps"):
        Adam(params, eps=-1.0)
    with pytest.raises(ValueError, match="empty"):
        Adam([])
    with pytest.raises(TypeError, match="not a Parameter"):
        SGD([np.zeros(3)], lr=0.1)
    optimizer = SGD(params, lr=0.1)
    with pytest.raises(ValueError, match="learning rate"):
        optimizer.lr = -1.0
    params[0].grad = np.zeros((4, 3))
    with pytest.raises(ValueError, match="gradient shape"):
        optimizer.step()
    with pytest.raises(ValueError, match="sgd, nesterov, adam, adamw"):
        make_optimizer("rmsprop", params, lr=0.1)


def test_make_optimizer_settings() -> None:
    params = make_params()
    nesterov = make_optimizer("Nesterov", params, lr=0.1, weight_decay=0.01, momentum=0.8)
    assert isinstance(nesterov, SGD) and nesterov.nesterov
    assert (nesterov.momentum, nesterov.weight_decay) == (0.8, 0.01)
    sgd = make_optimizer("sgd", params, lr=0.1)
    assert isinstance(sgd, SGD) and not sgd.nesterov and sgd.momentum == 0.9
    adam = make_optimizer("adam", params, lr=0.002, weight_decay=0.01)
    assert type(adam) is Adam and (adam.lr, adam.weight_decay) == (0.002, 0.01)
    assert type(make_optimizer("adamw", params, lr=0.1)) is AdamW


CONVERGENCE = {
    "sgd": dict(lr=0.05, momentum=0.0),
    "momentum": dict(lr=0.05, momentum=0.9),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True),
    "adam": dict(lr=0.05),
    "adamw": dict(lr=0.05, weight_decay=0.0),
}


@pytest.mark.parametrize("case", sorted(CONVERGENCE))
def test_minimises_least_squares(case: str) -> None:
    rng = np.random.default_rng(5)
    A = rng.standard_normal((20, 5)) / math.sqrt(20)  # Hessian 2 A^T A: eigenvalues ~0.5..5
    b = rng.standard_normal(20)
    w_best = np.linalg.lstsq(A, b, rcond=None)[0]
    w = Parameter(np.zeros(5))
    settings = CONVERGENCE[case]
    make = Adam if case == "adam" else AdamW if case == "adamw" else SGD
    optimizer = make([w], **settings)
    steps = 600
    schedule = CosineLR(settings["lr"], steps)  # lets Adam settle instead of hovering
    for step in range(steps):
        optimizer.lr = schedule(step)
        w.grad = 2.0 * A.T @ (A @ w.data - b)  # gradient of ||A w - b||^2
        optimizer.step()
    np.testing.assert_allclose(w.data, w_best, atol=1e-4)


# -- schedules --------------------------------------------------------------------------


def test_constant_and_step_schedules() -> None:
    assert [ConstantLR(0.3)(step) for step in (0, 7, 10_000)] == [0.3, 0.3, 0.3]
    step_lr = StepLR(1.0, step_size=10, gamma=0.5)
    assert [step_lr(step) for step in (0, 9, 10, 19, 20, 35)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.125]


def test_cosine_closed_form() -> None:
    cosine = CosineLR(1.0, total_steps=100)
    assert cosine(0) == 1.0
    assert cosine(50) == pytest.approx(0.5, rel=1e-12)
    assert cosine(25) == pytest.approx((1 + math.sqrt(0.5)) / 2, rel=1e-12)
    assert cosine(100) == pytest.approx(0.0, abs=1e-15)
    assert cosine(500) == pytest.approx(0.0, abs=1e-15)  # held at min_lr after the end
    with_floor = CosineLR(1.0, total_steps=100, min_lr=0.1)
    assert with_floor(50) == pytest.approx(0.55, rel=1e-12)
    assert with_floor(100) == pytest.approx(0.1, rel=1e-12)


def test_cosine_warmup_then_monotonic_decay() -> None:
    cosine = CosineLR(1.0, total_steps=110, warmup_steps=10)
    assert [cosine(step) for step in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0], rel=1e-12)
    assert cosine(10) == 1.0
    assert cosine(60) == pytest.approx(0.5, rel=1e-12)
    decay = [cosine(step) for step in range(10, 111)]
    assert all(later < earlier for earlier, later in pairwise(decay))


def test_onecycle_closed_form() -> None:
    onecycle = OneCycleLR(1.0, total_steps=100)  # peak at step 0.3 * 100 - 1 = 29
    assert onecycle(0) == pytest.approx(1.0 / 25, rel=1e-12)
    assert onecycle(29) == pytest.approx(1.0, rel=1e-12)
    # half way down (step 29 + 70 / 2): mean of max_lr and the final 1 / 25 / 1e4
    assert onecycle(64) == pytest.approx((1.0 + 4e-6) / 2, rel=1e-12)
    assert onecycle(99) == pytest.approx(4e-6, rel=1e-12)
    assert onecycle(1000) == onecycle(99)
    lrs = [onecycle(step) for step in range(100)]
    assert all(a < b for a, b in pairwise(lrs[:30]))
    assert all(a > b for a, b in pairwise(lrs[29:]))


def test_onecycle_tiny_runs_do_not_divide_by_zero() -> None:
    # pct_start * total_steps - 1 == 0: torch divides 0 by 0 at step 0; here the peak is step 0
    assert OneCycleLR(1.0, total_steps=10, pct_start=0.1)(0) == 1.0
    assert OneCycleLR(1.0, total_steps=1)(0) == pytest.approx(4e-6, rel=1e-12)


def test_make_schedule() -> None:
    step = make_schedule("step", 1.0, total_steps=90, steps_per_epoch=10)
    assert [step(s) for s in (29, 30, 60, 89)] == pytest.approx([1.0, 0.1, 0.01, 0.01])
    assert make_schedule("step", 1.0, total_steps=2, steps_per_epoch=1)(1) == pytest.approx(0.1)
    assert make_schedule("constant", 0.2, 10, 5)(9) == 0.2
    assert make_schedule("cosine", 0.2, 10, 5) == CosineLR(0.2, 10)
    assert make_schedule("OneCycle", 0.2, 10, 5) == OneCycleLR(0.2, 10)
    with pytest.raises(ValueError, match="constant, step, cosine, onecycle"):
        make_schedule("linear", 0.1, 10, 5)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: make_schedule("cosine", 0.1, 0, 5), "total_steps must be > 0"),
        (lambda: make_schedule("cosine", 0.1, 10, 0), "steps_per_epoch must be > 0"),
        (lambda: CosineLR(0.1, 10.5), "total_steps must be an integer"),
        (lambda: CosineLR(-0.1, 10), "base_lr must be >= 0"),
        (lambda: CosineLR(0.1, 10, min_lr=0.2), "min_lr"),
        (lambda: CosineLR(0.1, 10, warmup_steps=10), "warmup_steps"),
        (lambda: StepLR(0.1, 0), "step_size must be > 0"),
        (lambda: StepLR(0.1, 5, gamma=0.0), "gamma"),
        (lambda: OneCycleLR(0.1, 10, pct_start=1.0), "pct_start"),
        (lambda: OneCycleLR(0.1, 10, div_factor=0.0), "div_factor"),
        (lambda: ConstantLR(0.1)(-1), "step must be >= 0"),
    ],
)
def test_schedule_argument_errors(build: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


# -- agreement with torch (skipped when torch is not installed) --------------------------

TORCH_CASES = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.05)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01)),
    ("AdamW", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
]


@pytest.mark.parametrize(("name", "settings"), TORCH_CASES)
def test_optimizers_match_torch(name: str, settings: dict[str, object]) -> None:
    torch = pytest.importorskip("torch")
    ours = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}[name]
    params = make_params()
    torch_params = [torch.tensor(param.data.copy(), requires_grad=True) for param in params]
    optimizer = ours(params, **settings)
    torch_optimizer = getattr(torch.optim, name)(torch_params, **settings)
    rng = np.random.default_rng(6)
    for step in range(5):
        optimizer.lr = torch_optimizer.param_groups[0]["lr"] = settings["lr"] / (step + 1)
        grads = random_grads(rng, params)
        step_with(optimizer, params, grads)
        for torch_param, grad in zip(torch_params, grads, strict=True):
            torch_param.grad = torch.from_numpy(grad.copy())
        torch_optimizer.step()
        for param, torch_param in zip(params, torch_params, strict=True):
            np.testing.assert_allclose(param.data, torch_param.detach().numpy(), rtol=1e-12)


def test_schedules_match_torch() -> None:
    torch = pytest.importorskip("torch")
    total = 50

    def torch_lrs(make_scheduler: object, lr: float) -> list[float]:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
        scheduler = make_scheduler(optimizer)
        lrs = []
        for _ in range(total):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return lrs

    sched = torch.optim.lr_scheduler
    pairs = [
        (StepLR(0.5, 7, gamma=0.3), lambda o: sched.StepLR(o, 7, gamma=0.3), 0.5),
        (CosineLR(0.5, total, min_lr=0.01), lambda o: sched.CosineAnnealingLR(o, total, 0.01), 0.5),
        (
            OneCycleLR(0.5, total, pct_start=0.25, div_factor=10.0, final_div_factor=100.0),
            lambda o: sched.OneCycleLR(
                o, 0.5, total_steps=total, pct_start=0.25, div_factor=10.0,
                final_div_factor=100.0, anneal_strategy="cos", cycle_momentum=False,
            ),
            0.5,
        ),
        (OneCycleLR(0.5, total), lambda o: sched.OneCycleLR(o, 0.5, total, cycle_momentum=False),
         0.5),
    ]  # fmt: skip
    for schedule, make_scheduler, lr in pairs:
        expected = torch_lrs(make_scheduler, lr)
        ours = [schedule(step) for step in range(total)]
        np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-15, err_msg=str(schedule))
