"""One epoch of the fused step (lenet_xp.training.fused) beside one of the array-op layers.

Shared by the CPU test (kernels emulated) and the GPU test (kernels compiled by CuPy): the
same weights, the same permutation and shifts, the same Adam; returns both results.
"""

import numpy as np

from lenet_xp.backend import asnumpy, get_device, host_rng, to_device
from lenet_xp.data.device_split import DeviceSplit, permutation, random_shifts
from lenet_xp.models.lenet5 import LeNet5
from lenet_xp.optim.optimizers import Adam, AdamW
from lenet_xp.optim.schedules import make_schedule
from lenet_xp.train import train_epoch
from lenet_xp.training.fused import FusedStep
from lenet_xp.training.parallel import DataParallel


def make_split(device: str, dtype: str, n: int = 300, seed: int = 0) -> DeviceSplit:
    """``n`` random 28x28 images in MNIST's normalised range, with random labels."""
    rng = np.random.default_rng(seed)
    images = (rng.random((n, 1, 28, 28)) * 3 - 0.4).astype(dtype)
    labels = rng.integers(0, 10, n).astype(np.int64)
    dev = get_device(device)
    return DeviceSplit(to_device(images, dev), to_device(labels, dev), dev)


def lr_table(steps: int, peak: float = 2e-3) -> list[float]:
    schedule = make_schedule("cosine", peak, steps, steps)
    return [schedule(s) for s in range(steps)]


def reference_epoch(split, dtype, batch, shift, adamw=False, seed=1):
    """``(model, (loss, acc))`` after one epoch of the array-op layers and Adam."""
    model = LeNet5(seed=0, dtype=dtype).to(split.device)
    opt = (AdamW if adamw else Adam)(model.parameters(), lr=2e-3, weight_decay=0.01 * adamw)
    steps = -(-len(split) // batch)
    table = lr_table(steps)
    loss, acc, _ = train_epoch(
        DataParallel(model, 1), opt, table.__getitem__, split, batch, host_rng(seed), 0, None,
        shift,
    )  # fmt: skip
    return model, (loss, acc)


def fused_epoch(
    split, dtype, batch, shift, gemm, kernels=None, adamw=False, seed=1, graph=False, epochs=1
):
    """``(model, (loss, acc), fused)`` after one epoch of :class:`FusedStep`."""
    model = LeNet5(seed=0, dtype=dtype).to(split.device)
    opt = (AdamW if adamw else Adam)(model.parameters(), lr=2e-3, weight_decay=0.01 * adamw)
    steps = -(-len(split) // batch)
    table = lr_table(steps) + [1e-3] * (steps * (epochs - 1) + 1)  # then constant
    fused = FusedStep(model, opt, split, batch, table, shift, gemm, kernels)
    if graph:
        fused.capture()
    rng = host_rng(seed)  # the same draws, in the same order, as train_epoch
    order = permutation(len(split), rng, split.device)
    shifts = random_shifts(len(split), shift, rng, split.device) if shift else None
    fused.begin_epoch(order, shifts)
    fused.run_epoch()
    loss_sum, correct = fused.end_epoch()
    return model, (loss_sum / len(split), correct / len(split)), fused


def assert_same_training(ref, fused, rtol, atol):
    (ref_model, (ref_loss, ref_acc)), (model, (loss, acc), _) = ref, fused
    for (name, a), (_, b) in zip(
        ref_model.named_parameters(), model.named_parameters(), strict=True
    ):
        np.testing.assert_allclose(asnumpy(b.data), asnumpy(a.data), rtol, atol, err_msg=name)
    assert abs(loss - ref_loss) <= atol + rtol * abs(ref_loss)
    assert acc == ref_acc
