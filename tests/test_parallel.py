"""DataParallel: worker processes over shared memory compute what one process computes."""

import numpy as np
import pytest

from lenet_xp import LeNet5
from lenet_xp.backend import CPU
from lenet_xp.data.device_split import to_device_split
from lenet_xp.optim.optimizers import Adam, make_optimizer
from lenet_xp.optim.schedules import ConstantLR
from lenet_xp.training.engines import train_epoch
from lenet_xp.training.parallel import DataParallel, WorkerError, forward_backward


def batch(n=37, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, n)


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_match_one_process(workers):
    x, y = batch()
    reference = LeNet5(seed=0)
    ref_loss, ref_correct = forward_backward(reference, x, y)
    ref_grads = {name: p.grad.copy() for name, p in reference.named_parameters()}
    model = LeNet5(seed=0)
    with DataParallel(model, workers, max_batch=64) as runner:
        loss, correct = runner.forward_backward(x, y)
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
        assert int(correct) == int(ref_correct)
        for name, param in model.named_parameters():
            np.testing.assert_allclose(param.grad, ref_grads[name], rtol=1e-4, atol=1e-6)
        reference.eval()
        np.testing.assert_allclose(runner.forward(x), reference.forward(x), rtol=1e-5, atol=1e-5)
        # Optimizer steps in this process reach the workers through the shared parameters.
        optimizer = Adam(model.parameters(), lr=1e-2)
        runner.train()
        for _ in range(3):
            runner.forward_backward(x, y)
            optimizer.step()
        stepped_loss, _ = runner.forward_backward(x, y)
        assert float(stepped_loss) < float(loss)
    # After close the parameters and gradients own their memory again, with their values.
    assert all(p.data.base is None and p.grad.base is None for p in model.parameters())
    assert float(forward_backward(model, x, y)[0]) == pytest.approx(float(stepped_loss), rel=1e-5)


@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("name", ["adam", "adamw", "nesterov", "sgd"])
def test_in_place_batches_and_one_update_give_the_same_bits(workers, name):
    """Each batch gathered straight into the shared memory, and the optimizer's one update
    of the shared flat buffers, train as copies and per-parameter updates do, bit for bit."""
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (300, 28, 28), dtype=np.uint8)
    split = to_device_split(images, rng.integers(0, 10, 300, dtype=np.uint8), CPU)
    runs = []
    for fast in (False, True):
        model = LeNet5(seed=0)
        optimizer = make_optimizer(name, model.parameters(), 1e-3, weight_decay=1e-3)
        with DataParallel(model, workers, max_batch=64) as runner:
            if fast:
                optimizer.flat = runner.flat
                flat_steps = count_calls(runner.flat, "step")
            else:
                runner.batch_buffer = None
            metrics = train_epoch(
                runner, optimizer, ConstantLR(1e-3), split, 64, np.random.default_rng(0), 0, None
            )
        if fast:
            assert flat_steps == [True] * 5  # every step one update
        state = optimizer.state_dict()
        runs.append((metrics, [p.data.tobytes() for p in model.parameters()], state))
    (metrics, params, state), (fast_metrics, fast_params, fast_state) = runs
    assert metrics == fast_metrics and params == fast_params
    assert state.keys() == fast_state.keys()
    assert all(np.array_equal(v, fast_state[k]) for k, v in state.items())


def count_calls(obj, name):
    """A list that gets what ``obj.name`` returns each time it is called."""
    calls, method = [], getattr(obj, name)

    def counted(*args, **kwargs):
        calls.append(method(*args, **kwargs))
        return calls[-1]

    setattr(obj, name, counted)
    return calls


def test_same_result_every_time():
    x, y = batch(64, seed=1)
    results = []
    for _ in range(2):
        model = LeNet5(seed=3)
        with DataParallel(model, 2, max_batch=64) as runner:
            runner.forward_backward(x, y)
            results.append(model.fc1.weight.grad.copy())
    np.testing.assert_array_equal(results[0], results[1])


def test_worker_error_is_reported_and_batch_limit_checked():
    x, y = batch(8)
    with DataParallel(LeNet5(seed=0), 2, max_batch=8) as runner:
        with pytest.raises(ValueError, match="exceeds max_batch"):
            runner.forward_backward(*batch(9))
        y_bad = y.copy()
        y_bad[-1] = 99  # the worker's slice holds an impossible label
        with pytest.raises(WorkerError, match="worker process 1 failed: IndexError"):
            runner.forward_backward(x, y_bad)


def test_a_killed_worker_is_reported():
    x, y = batch(8)
    with DataParallel(LeNet5(seed=0), 2, max_batch=8) as runner:
        runner.forward_backward(x, y)
        runner._links[0].proc.kill()
        runner._links[0].proc.wait()
        with pytest.raises(WorkerError, match="worker process 1 .*was killed by SIGKILL"):
            runner.forward_backward(x, y)


def test_each_worker_draws_its_own_dropout_masks():
    """Two copies of one image in a batch split over two processes: with the same masks in
    both slices the batch loss would equal one process's loss on the first copy."""
    from lenet_xp.layers import Dropout, Flatten, Linear, Sequential

    def net():
        rng = np.random.default_rng(0)
        return Sequential(Flatten(), Dropout(0.5, seed=7), Linear(784, 10, rng=rng))

    x, y = batch(n=1)
    single, _ = forward_backward(net(), x, y)  # slice 0's masks: the seed's first draw
    with DataParallel(net(), 2, max_batch=4) as runner:
        both, _ = runner.forward_backward(np.concatenate([x, x]), np.concatenate([y, y]))
    assert float(both) != pytest.approx(float(single), rel=1e-6)
    again, _ = forward_backward(net(), x, y)
    assert float(again) == float(single)  # seeded: the check itself is deterministic


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_distort_their_own_slices_as_one_process_would(workers):
    """With a Distortion, each process gathers its own slice at the whole batch's grid: the
    loss and gradients are one process's on the whole distorted batch."""
    from lenet_xp.data.augment import Distortion, parse_augment

    x, y = batch()
    ids = np.random.default_rng(1).permutation(1000)[: len(y)]
    distortion = Distortion(parse_augment("default,elastic=8:3,noise=0.1"), seed=2, epoch=1)
    reference = LeNet5(seed=0)
    ref_loss, ref_correct = forward_backward(reference, distortion(x, ids), y)
    model = LeNet5(seed=0)
    with DataParallel(model, workers, max_batch=64) as runner:
        loss, correct = runner.forward_backward(x, y, distortion, ids)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    assert int(correct) == int(ref_correct)
    grads = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        np.testing.assert_allclose(param.grad, grads[name].grad, rtol=1e-4, atol=1e-6)
    plain = LeNet5(seed=0)
    forward_backward(plain, x, y)  # undistorted: other gradients, so the check can fail
    assert not np.allclose(plain.conv1.weight.grad, model.conv1.weight.grad, rtol=1e-2)


def test_prefetched_grids_give_the_same_steps_whatever_comes_next():
    """With ``next_ids``, worker 1 computes the next batch's grid while the main process
    steps: the steps are still one process's on each whole distorted batch, when the next
    call brings those ids, when it brings others (the prefetch is dropped), and when an
    evaluation comes in between."""
    from lenet_xp.data.augment import Distortion, parse_augment

    x, y = batch(32)
    order = np.random.default_rng(3).permutation(1000)
    distortion = Distortion(parse_augment("default,elastic=8:3,noise=0.1"), seed=4, epoch=2)
    reference, model = LeNet5(seed=0), LeNet5(seed=0)
    calls = [  # (ids, the next ids announced)
        (order[:32], order[32:64]),
        (order[32:64], order[64:96]),  # as announced
        (order[100:132], order[132:164]),  # not as announced: computed here instead
        (order[132:164], order[164:196]),  # as announced, then an evaluation in between
        (order[164:196], None),
    ]
    with DataParallel(model, 2, max_batch=64) as runner:
        for step, (ids, next_ids) in enumerate(calls):
            ref_loss, _ = forward_backward(reference, distortion(x, ids), y)
            loss, _ = runner.forward_backward(x, y, distortion, ids, next_ids)
            assert (runner._prefetched is not None) == (next_ids is not None)  # one in flight
            assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5), step
            for (name, param), ref in zip(
                model.named_parameters(), reference.parameters(), strict=True
            ):
                np.testing.assert_allclose(param.grad, ref.grad, rtol=1e-4, atol=1e-6, err_msg=name)
            if step == 3:
                np.testing.assert_allclose(runner.forward(x), reference.forward(x), atol=1e-6)


def test_waits_poll_only_where_each_process_has_a_physical_core(monkeypatch):
    """Polling before sleeping is for processes on cores of their own; with more processes
    than physical cores (hyperthreads, or an oversubscribed machine) the waits sleep."""
    from lenet_xp.training import parallel

    x, y = batch(8)
    for cores, spins in ((2, True), (1, False)):
        monkeypatch.setattr(parallel, "host_cores", lambda physical=False, n=cores: n)
        with DataParallel(LeNet5(seed=0), 2, max_batch=8) as runner:
            assert (runner._spin_s > 0) == spins
            loss, _ = runner.forward_backward(x, y)  # and the step runs either way
            assert np.isfinite(float(loss))
