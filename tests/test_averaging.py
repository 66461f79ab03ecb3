"""Weight averaging (``ParameterEMA``) and the optimizer's step hook."""

import numpy as np
import pytest

from lenet_xp.averaging import ParameterEMA
from lenet_xp.layers.module import Parameter
from lenet_xp.optim import SGD


def _params() -> list[Parameter]:
    rng = np.random.default_rng(0)
    return [Parameter(rng.standard_normal((3, 4)).astype(np.float32)), Parameter(np.ones(5))]


def test_update_follows_the_closed_form_with_its_warm_up():
    params = _params()
    ema = ParameterEMA(params, decay=0.9)
    expected = [p.data.astype(np.float64) for p in params]
    rng = np.random.default_rng(1)
    for n in range(30):
        for p in params:
            p.data[...] = rng.standard_normal(p.data.shape)
        ema.update()
        d = min(0.9, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * p.data for e, p in zip(expected, params, strict=True)]
    for average, e, p in zip(ema.averages, expected, params, strict=True):
        assert average.dtype == p.data.dtype  # float32 stays float32
        np.testing.assert_allclose(average, e, rtol=1e-5, atol=1e-6)
    assert ema.updates == 30


def test_applied_swaps_in_place_and_restores_even_on_error():
    params = _params()
    ema = ParameterEMA(params, decay=0.5)
    buffers = [p.data for p in params]
    trained = [p.data.copy() for p in params]
    ema.averages = [a + 1.0 for a in ema.averages]
    with ema.applied():
        for p, t, buffer in zip(params, trained, buffers, strict=True):
            assert p.data is buffer  # in place: views of the buffer see the averages
            np.testing.assert_array_equal(p.data, t + 1.0)
    for p, t in zip(params, trained, strict=True):
        np.testing.assert_array_equal(p.data, t)
    with pytest.raises(RuntimeError), ema.applied():
        raise RuntimeError("evaluation failed")
    for p, t in zip(params, trained, strict=True):
        np.testing.assert_array_equal(p.data, t)


def test_state_dict_round_trip_and_mismatches():
    params = _params()
    ema = ParameterEMA(params, decay=0.99)
    for _ in range(3):
        params[0].data += 1.0
        ema.update()
    state = ema.state_dict()
    ema.averages[0][...] = 0.0  # the state is a snapshot
    again = ParameterEMA(_params(), decay=0.99)
    again.load_state_dict(state)
    assert again.updates == 3
    np.testing.assert_array_equal(again.averages[0], state["0"])
    with pytest.raises(ValueError, match="decay"):
        ParameterEMA(_params(), decay=0.9).load_state_dict(state)
    with pytest.raises(ValueError, match="parameter 1"):
        ParameterEMA(_params(), decay=0.99).load_state_dict(state | {"1": np.zeros(4)})
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="decay"):
            ParameterEMA(params, decay=bad)


def test_the_optimizer_calls_its_post_hooks_after_each_step():
    params = _params()
    optimizer = SGD(params, lr=0.1)
    seen = []
    optimizer.register_step_post_hook(lambda opt: seen.append((opt.steps, params[1].data[0])))
    for p in params:
        p.grad = np.ones_like(p.data)
    optimizer.step()
    optimizer.step()
    assert seen == [(1, pytest.approx(0.9)), (2, pytest.approx(0.8))]  # after the update
