"""A model's accuracy, loss and confusion on a split (:func:`evaluate`), a trained model rebuilt
from its checkpoint (:func:`load_model`), the test set it was trained for (:func:`test_split`)
and its probabilities for host images (:func:`classify`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from lenet_xp.backend import asnumpy, device_of, use_device
from lenet_xp.data.device_split import DeviceSplit, to_device_split
from lenet_xp.data.images import pad_input
from lenet_xp.data.mnist import load_mnist
from lenet_xp.functional.loss import log_softmax
from lenet_xp.layers import Module
from lenet_xp.models.lenet5 import model_loss
from lenet_xp.models.presets import PresetError, build_from_config
from lenet_xp.optim.averaging import averaged_state
from lenet_xp.storage.checkpoint import CheckpointError, load_checkpoint
from lenet_xp.training.parallel import DataParallel


def evaluate(
    model: Module | DataParallel, split: DeviceSplit, batch_size: int = 2000
) -> tuple[float, float, Any]:
    """``(mean loss, accuracy, confusion (10, 10) host int64)`` of ``model`` on ``split``.

    ``confusion[true, predicted]`` counts images. The model is left in eval mode. Nothing
    is read back to the host until the end (no per-batch synchronisation on a GPU).
    """
    xp = split.device.xp
    model.eval()
    network = model if isinstance(model, Module) else model.model  # its loss (a runner's model)
    loss_sum = xp.zeros((), dtype=xp.float64)
    confusion = xp.zeros(100, dtype=xp.int64)
    cells = xp.arange(100)
    for x, y in split.batches(batch_size):
        logits = model.forward(x)
        loss, _ = model_loss(network, logits, y)
        loss_sum += loss * y.shape[0]
        # Cell true * 10 + predicted of each image (N,), counted by comparing with every cell
        # (N, 100): CuPy's bincount would read its input's min and max on the host (two syncs
        # per batch); this is one deterministic reduction, no atomics.
        codes = y * 10 + logits.argmax(axis=1)
        confusion += (codes[:, None] == cells).sum(axis=0)
    confusion = asnumpy(confusion).reshape(10, 10)
    n = len(split)
    return float(loss_sum) / n, int(confusion.trace()) / n, confusion


def load_model(path: str, device: Any, arch: str | None = None) -> tuple[Module, dict]:
    """``(model on device, meta)`` from a checkpoint written by ``lenet_xp.train``: the
    network its config names (``--arch``, options), rebuilt and loaded (with the averaged
    weights of a run trained with ``--ema``). ``arch``, if given,
    must be the checkpoint's (else :class:`CheckpointError`, one line)."""
    model_state, optim_state, meta = load_checkpoint(path)
    config = meta.get("config", {})
    saved = config.get("arch", "lenet5")
    if arch is not None and arch != saved:
        raise CheckpointError(f"checkpoint {path} holds --arch {saved}, not --arch {arch}")
    try:
        model = build_from_config(config)
    except PresetError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    try:
        model.load_state_dict(averaged_state(model, model_state, optim_state))  # --ema's
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} does not hold a {saved}: {exc}") from None
    return model.to(device), meta


def run_data_dir(config: dict, data_dir: str | None, say: bool = True) -> str | None:
    """The MNIST folder to read for the run a checkpoint's ``config`` describes: ``data_dir``
    if given, else the folder the run was trained on (``config["data_dir"]``) if it is still
    there, else ``None`` (:func:`~lenet_xp.data.mnist.load_mnist`'s default: ``$LENET_XP_DATA``,
    else the cache), with a note on stderr unless ``say`` is false (a rank above 0)."""
    if data_dir is not None:
        return data_dir
    recorded = config.get("data_dir")
    if recorded and not Path(recorded).is_dir():
        if say:
            print(
                f"note: {recorded}, the MNIST folder this run was trained on, is gone; "
                "reading $LENET_XP_DATA or the cache instead (--data-dir chooses)",
                file=sys.stderr,
            )
        return None
    return recorded or None


def test_split(
    meta: dict, device: Any, data_dir: str | None, size: int = 28, mnist: Any = None
) -> DeviceSplit:
    """MNIST's test set on ``device``, prepared as the run in ``meta`` was trained: its
    dtype, and padded to 32x32 for a model of input ``size`` 32. ``mnist``: the data set
    if already loaded (else it is read from :func:`run_data_dir`)."""
    config = meta.get("config", {})
    mnist = load_mnist(run_data_dir(config, data_dir)) if mnist is None else mnist
    dtype = config.get("dtype", "float32")
    return to_device_split(mnist.test_images, mnist.test_labels, device, dtype, size == 32)


def classify(model: Module, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Softmax probabilities ``(N, 10)`` (host, the model's float dtype) of normalised inputs
    ``x (N, 1, 28, 28)`` (``(pixels - MEAN) / STD``, host) on the model's device, in eval
    mode (the model's mode is restored after); padded to 32x32 for a 32x32 model."""
    weight = model.parameters()[0].data
    device, dtype = device_of(weight), weight.dtype
    x = pad_input(x, getattr(model, "input_size", 28))
    was_training = model.training
    model.eval()
    out = []
    try:
        with use_device(device):
            xp = device.xp
            for start in range(0, len(x), batch_size):
                batch = xp.asarray(x[start : start + batch_size], dtype=dtype)
                out.append(asnumpy(xp.exp(log_softmax(model.forward(batch)))))
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 10), dtype)
