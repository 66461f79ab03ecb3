"""An optimizer's update over flat buffers (:class:`lenet_xp.optim.flat.FlatBuffers`, the CPU
``--workers`` path): the same bits as one update per parameter, state that checkpoints and
loads as before, and the per-parameter update wherever the flat one does not apply."""

from __future__ import annotations

import numpy as np
import pytest

from lenet_xp.layers.module import Parameter, flat_views
from lenet_xp.optim.flat import FlatBuffers
from lenet_xp.optim.optimizers import make_optimizer

SHAPES = [(3, 1, 2, 2), (3,), (4, 12), (4,)]
OPTIMIZERS = [
    ("sgd", dict(momentum=0.0)),
    ("sgd", dict(momentum=0.9, weight_decay=0.01)),
    ("nesterov", dict(momentum=0.9)),
    ("adam", dict(weight_decay=0.001)),
    ("adamw", dict(weight_decay=0.01)),
]


def grads_of(step: int, dtype: str) -> list[np.ndarray]:
    rng = np.random.default_rng(100 + step)
    return [rng.standard_normal(shape).astype(dtype) for shape in SHAPES]


class Pair:
    """Two copies of the same parameters and optimizer: ``flat`` with its parameters and
    gradients as views of flat buffers (as the worker processes share them), ``each`` with
    arrays of their own."""

    def __init__(self, name: str, kwargs: dict, dtype: str, ema: float | None = None) -> None:
        rng = np.random.default_rng(0)
        values = [rng.standard_normal(shape).astype(dtype) for shape in SHAPES]
        self.each_params = [Parameter(v.copy()) for v in values]
        self.flat_params = [Parameter(v.copy()) for v in values]
        size = sum(v.size for v in values)
        self.data, self.grad = np.zeros(size, dtype), np.zeros(size, dtype)
        self.data_views = flat_views(self.flat_params, self.data)
        self.grad_views = flat_views(self.flat_params, self.grad)
        for param, view in zip(self.flat_params, self.data_views, strict=True):
            view[...] = param.data
            param.data = view
        make = dict(lr=0.01, ema=ema, **kwargs)
        self.each = make_optimizer(name, self.each_params, **make)
        self.flat = make_optimizer(name, self.flat_params, **make)
        self.buffers = FlatBuffers(self.data, self.grad, self.data_views, self.grad_views)
        self.flat.flat = self.buffers

    def step(self, step: int, dtype: str) -> bool:
        """One step of both with the same gradients: whether ``flat`` updated in one go."""
        for params, views in ((self.each_params, None), (self.flat_params, self.grad_views)):
            for i, (param, grad) in enumerate(zip(params, grads_of(step, dtype), strict=True)):
                if views is None:
                    param.grad = grad
                else:
                    views[i][...] = grad
                    param.grad = views[i]
        self.each.step()
        calls = []
        update = self.flat._update
        self.flat._update = lambda *args: calls.append(args[0].size) or update(*args)
        self.flat.step()
        del self.flat._update
        return calls == [self.data.size]

    def assert_same_bits(self) -> None:
        for a, b in zip(self.each_params, self.flat_params, strict=True):
            assert a.data.tobytes() == b.data.tobytes()
        each, flat = self.each.state_dict(), self.flat.state_dict()
        assert each.keys() == flat.keys()
        for key, value in each.items():
            if isinstance(value, np.ndarray):
                assert value.tobytes() == flat[key].tobytes(), key
            else:
                assert value == flat[key], key


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_one_update_over_the_flat_buffers_gives_the_same_bits(name, kwargs, dtype):
    pair = Pair(name, kwargs, dtype, ema=0.9)
    for step in range(5):
        assert pair.step(step, dtype)
        pair.assert_same_bits()
    # each parameter's state arrays, and the averages, are views of flat ones
    assert all(average.base is not None for average in pair.flat.average.averages)
    for state in pair.flat.state:
        for array in (v for v in state.values() if isinstance(v, np.ndarray)):
            assert array.base is not None


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS[1:])
def test_a_loaded_state_is_taken_over_and_trains_on_alike(name, kwargs):
    source = Pair(name, kwargs, "float32", ema=0.9)
    for step in range(3):
        source.step(step, "float32")
    saved = source.each.state_dict()
    pair = Pair(name, kwargs, "float32", ema=0.9)
    for params in (pair.each_params, pair.flat_params):
        for param, kept in zip(params, source.each_params, strict=True):
            param.data[...] = kept.data
    pair.each.load_state_dict(saved)
    pair.flat.load_state_dict(saved)  # per-parameter arrays of its own: copied into the flat
    for step in range(3, 6):
        assert pair.step(step, "float32")
        pair.assert_same_bits()


def test_where_the_flat_update_does_not_apply_each_parameter_is_updated():
    pair = Pair("adam", {}, "float64")
    pair.step(0, "float64")
    pair.flat_params[1].data = pair.flat_params[1].data.copy()  # no longer a view
    assert not pair.step(1, "float64")
    pair.assert_same_bits()
    pair.flat_params[1].data = pair.data_views[1]
    pair.flat_params[1].data[...] = pair.each_params[1].data
    assert pair.step(2, "float64")  # the views again: one update
    pair.assert_same_bits()


def test_unequal_step_counts_update_each_parameter():
    pair = Pair("adam", {}, "float64")
    for optimizer in (pair.each, pair.flat):
        optimizer.state[0] = {
            "step": 3, "exp_avg": np.full(SHAPES[0], 0.1), "exp_avg_sq": np.full(SHAPES[0], 0.2)
        }  # fmt: skip
    assert not pair.step(0, "float64")  # parameter 0 had three updates, the others none
    pair.assert_same_bits()


def test_a_parameter_without_a_gradient_is_left_alone():
    pair = Pair("sgd", dict(momentum=0.9), "float64")
    before = pair.flat_params[2].data.copy()
    for i, (param, grad) in enumerate(zip(pair.flat_params, grads_of(0, "float64"), strict=True)):
        pair.grad_views[i][...] = grad
        param.grad = None if i == 2 else pair.grad_views[i]
    pair.flat.step()
    assert np.array_equal(pair.flat_params[2].data, before)
    assert not pair.flat.state[2] and pair.flat.state[0]


def test_released_buffers_update_nothing_in_one_go():
    pair = Pair("adam", {}, "float32")
    pair.buffers.release()
    assert not pair.step(0, "float32")
    pair.assert_same_bits()
