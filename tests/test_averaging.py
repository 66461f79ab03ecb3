"""Weight averaging (``ParameterEMA``) and the optimizer's step hook."""

import numpy as np
import pytest
from conftest import DATA, needs_mnist
from reliability_helpers import metrics

from lenet_xp import evaluate as evaluate_cli
from lenet_xp import train as train_cli
from lenet_xp.backend import CPU
from lenet_xp.layers.module import Parameter
from lenet_xp.optim.averaging import ParameterEMA
from lenet_xp.optim.optimizers import make_optimizer
from lenet_xp.storage.checkpoint import load_checkpoint
from lenet_xp.training.evaluation import evaluate, load_model
from lenet_xp.training.parallel import DataParallel


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


def test_the_optimizer_keeps_saves_and_restores_its_average():
    """``make_optimizer(..., ema=d)``: the average follows every step, rides in the optimizer's
    state_dict, and a restored optimizer continues exactly; a state with or without an average
    does not load into an optimizer of the other kind."""

    def run(optimizer, params, steps, rng):
        for _ in range(steps):
            for p in params:
                p.grad = rng.standard_normal(p.data.shape).astype(p.data.dtype)
            optimizer.step()

    params = _params()
    optimizer = make_optimizer("adam", params, 1e-2, ema=0.9)
    run(optimizer, params, 5, np.random.default_rng(0))
    assert optimizer.average.updates == 5
    state = optimizer.state_dict()
    assert state["ema.decay"] == 0.9 and state["ema.updates"] == 5 and "ema.1" in state
    copies = [Parameter(p.data.copy()) for p in params]
    again = make_optimizer("adam", copies, 1e-2, ema=0.9)
    again.load_state_dict(state)
    run(optimizer, params, 3, np.random.default_rng(1))
    run(again, copies, 3, np.random.default_rng(1))
    for a, b in zip(optimizer.average.averages, again.average.averages, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="holds one of a weight average"):
        make_optimizer("adam", _params(), 1e-2).load_state_dict(state)
    plain = make_optimizer("adam", _params(), 1e-2).state_dict()
    with pytest.raises(ValueError, match="holds none"):
        make_optimizer("adam", _params(), 1e-2, ema=0.9).load_state_dict(plain)


@needs_mnist
def test_training_with_ema_tests_keeps_and_resumes_the_average(tmp_path):
    """``train --ema``: the metrics are the averaged network's, which is what ``load_model``
    (evaluate, predict, export) gives from a checkpoint; the trained weights are kept beside it
    for resuming, and a resumed run equals an uninterrupted one."""
    small = ["--device", "cpu", "--data-dir", str(DATA), "--quiet", "--limit-train", "2000"]
    base = small + ["--epochs", "2", "--keep-every-epoch", "--ema", "0.9"]
    straight = tmp_path / "straight"
    assert train_cli.main([*base, "--out", str(straight)]) == 0
    records = metrics(straight / "metrics.jsonl")
    assert len(records) == 2
    model, meta = load_model(str(straight / "last.npz"), CPU)
    split = evaluate_cli.test_split(meta, CPU, str(DATA))
    loss, acc, _ = evaluate(DataParallel(model.eval(), 1), split, 2000)
    assert acc == records[-1]["test_acc"]  # the loss: summed over other worker slices
    assert loss == pytest.approx(records[-1]["test_loss"], rel=1e-6)
    model_state, optim_state, _ = load_checkpoint(straight / "last.npz")
    names = [name for name, _ in model.named_parameters()]
    ema_fc3 = optim_state[f"ema.{names.index('fc3.weight')}"]
    assert ema_fc3.shape == model_state["fc3.weight"].shape
    assert not np.array_equal(model_state["fc3.weight"], ema_fc3)  # both kept
    model.load_state_dict(model_state)  # the trained weights test differently
    assert evaluate(DataParallel(model.eval(), 1), split, 2000)[0] != pytest.approx(loss, rel=1e-4)

    resumed = tmp_path / "resumed"
    resume = ["--resume", str(straight / "epoch_001.npz"), "--out", str(resumed)]
    assert train_cli.main([*small, *resume]) == 0
    assert metrics(resumed / "metrics.jsonl") == records


def test_ema_flag_values(capsys):
    parser = train_cli.build_parser()
    assert parser.parse_args(["--ema", "0.999"]).ema == 0.999
    assert parser.parse_args(["--ema", "0"]).ema is None  # off: how to drop it from a recipe
    parser.set_defaults(**train_cli.RECIPES["best"])
    assert parser.parse_args([]).ema == 0.999 and parser.parse_args(["--ema", "0"]).ema is None
    for bad in ("1", "1.5", "-0.1", "nan", "x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--ema", bad])
        assert "argument --ema" in capsys.readouterr().err
