"""``python -m lenet_xp.export``: a checkpoint to ONNX or to PyTorch-named weights, and back.

* ``--checkpoint PATH --to model.onnx``: the network as an ONNX graph (see
  :mod:`lenet_xp.models.onnx`; needs ``pip install "lenet_xp[onnx]"``).
* ``--checkpoint PATH --to weights.npz``: the weights under PyTorch's names and layouts, one
  array each, for ``torch_net.load_state_dict({k: torch.from_numpy(v) ...})``.
* ``--from weights.npz --to ckpt.npz --arch NAME [options]``: such weights (from here or from
  PyTorch) as a checkpoint that ``evaluate`` and ``predict`` read; ``--to model.onnx`` works
  from ``--from`` too.

PyTorch names are ``model.state_dict()``'s (``conv1.weight (6, 1, 5, 5)``, ``fc1.weight
(120, 400)``, batch-norm's ``running_mean``, ...), except that a partially connected
convolution (``lenet5-classic``'s C3) is stored as the dense ``(out, in, k, k)`` weight of an
``nn.Conv2d``, zero outside its connection table.
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from lenet_xp.backend import asnumpy
from lenet_xp.layers import Module, PartialConv2d
from lenet_xp.models import presets
from lenet_xp.models.onnx import ExportError, save_onnx
from lenet_xp.storage.checkpoint import CheckpointError, atomic_write, save_checkpoint
from lenet_xp.training.evaluation import load_model


def _partial_convs(model: Module, prefix: str = "") -> list[tuple[str, PartialConv2d]]:
    found = []
    for name, child in model.named_children():
        if isinstance(child, PartialConv2d):
            found.append((prefix + name, child))
        else:
            found += _partial_convs(child, f"{prefix}{name}.")
    return found


def torch_state_dict(model: Module) -> dict[str, np.ndarray]:
    """``model``'s parameters and buffers as host arrays under PyTorch's names and layouts
    (dtype kept; partial convolutions as dense ``(out, in, k, k)`` weights)."""
    state = {name: asnumpy(value) for name, value in model.state_dict().items()}
    for name, conv in _partial_convs(model):
        state[f"{name}.weight"] = asnumpy(conv.dense_weight())
    return state


def load_torch_state_dict(model: Module, state: dict[str, Any], source: str = "weights") -> None:
    """Load ``state`` (PyTorch names, as :func:`torch_state_dict` writes) into ``model``;
    :class:`ExportError` (one line naming ``source``) if it does not fit."""
    state = dict(state)
    for name, conv in _partial_convs(model):
        try:
            state[f"{name}.weight"] = conv.sparse_weight(
                np.asarray(state.get(f"{name}.weight", ()))
            )
        except ValueError as exc:
            raise ExportError(f"{source}: {name}.weight {exc}") from None
    try:
        model.load_state_dict(state)
    except (KeyError, ValueError) as exc:
        arch = getattr(model, "arch", type(model).__name__)
        raise ExportError(
            f"{source} does not fit --arch {arch} with these options: {exc.args[0]}"
        ) from None


def save_torch_weights(model: Module, path: str | os.PathLike[str]) -> Path:
    """Write :func:`torch_state_dict` of ``model`` to ``path`` (``.npz``, no pickle), atomically."""
    path = Path(path)
    try:  # mode 0644: mkstemp's 0600 is for secrets; weights are for sharing
        state = torch_state_dict(model)
        atomic_write(path, lambda f: np.savez(f, **state), mode=0o644)
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def read_weights(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The arrays of a weights ``.npz`` by name; :class:`ExportError` (one line) if unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise ExportError(f"{path}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ExportError(f"{path}: not a weights .npz ({exc})") from None


def import_weights(
    path: str | os.PathLike[str], config: dict, state: dict[str, np.ndarray] | None = None
) -> Module:
    """The network ``config`` describes (``arch`` and preset options, as a checkpoint's
    config), with the PyTorch-named weights in ``path`` loaded (on the CPU); ``state``: those
    weights when already read (:func:`read_weights`), so the file is not read twice."""
    state = read_weights(path) if state is None else state
    try:
        model = presets.build_from_config(config)
    except presets.PresetError as exc:
        raise ExportError(str(exc)) from None
    load_torch_state_dict(model, state, str(path))
    return model


def _config(args: argparse.Namespace, state: dict[str, np.ndarray]) -> dict:
    floats = [v.dtype for v in state.values() if v.dtype.kind == "f"]
    dtype = args.dtype or (str(floats[0]) if floats else "float32")
    keys = ("arch", "activation", "pool", "batchnorm", "dropout", "output", "pad32")
    return {key: getattr(args, key) for key in keys} | {"dtype": dtype}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lenet_xp.export", description=__doc__.split("\n")[0]
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a .npz written by lenet_xp.train")
    source.add_argument("--from", dest="weights", help="PyTorch-named weights (.npz)")
    p.add_argument(
        "--to", required=True, help="model.onnx, or .npz: weights (from --checkpoint) or a "
        "checkpoint (from --from)"
    )  # fmt: skip
    o = p.add_argument_group("with --from: the network the weights belong to (as in train)")
    o.add_argument("--arch", default="lenet5", help="network preset")
    o.add_argument("--activation", choices=tuple(presets.ACTIVATIONS), default=None)
    o.add_argument("--pool", choices=presets.POOLS, default=None)
    o.add_argument("--batchnorm", action="store_true")
    o.add_argument("--dropout", type=float, default=0.0)
    o.add_argument("--output", choices=presets.OUTPUTS, default="fc")
    o.add_argument("--pad32", action="store_true")
    o.add_argument(
        "--dtype", choices=("float32", "float64"), default=None, help="default: the file's"
    )
    args = p.parse_args(argv)
    target = Path(args.to)
    if target.suffix not in (".onnx", ".npz"):
        p.error(f"--to {args.to}: name a .onnx or a .npz file")
    try:
        if args.checkpoint:
            model, meta = load_model(args.checkpoint, "cpu")
        else:
            state = read_weights(args.weights)
            meta = {"config": _config(args, state), "imported_from": args.weights}
            model = import_weights(args.weights, meta["config"], state)
        if target.suffix == ".onnx":
            save_onnx(model, target, meta)
        elif args.checkpoint:
            save_torch_weights(model, target)
        else:
            save_checkpoint(target, model.state_dict(), {}, meta)
    except (CheckpointError, ExportError) as exc:
        print(f"lenet_xp.export: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
