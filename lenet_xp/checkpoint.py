"""Checkpoints: model, optimizer state and run metadata in one ``.npz`` (no pickle).

Keys: ``model/<name>`` (``model.state_dict()``), ``optim/<key>`` (``optimizer.state_dict()``)
and ``meta`` (a JSON string: epoch, step, RNG state, config, metrics). Writes are atomic:
a temp file in the same folder, flushed and fsynced, then renamed over the target, so a crash
or a full disk never leaves a half-written checkpoint under the real name.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from lenet_xp.backend import asnumpy
from lenet_xp.fsync import fsync_dir


class CheckpointError(Exception):
    """A checkpoint could not be written or read; the message is one line."""


def save_checkpoint(
    path: str | os.PathLike[str], model_state: dict, optim_state: dict, meta: dict
) -> Path:
    """Atomically write ``path`` (``.npz``); arrays are copied to the host first."""
    path = Path(path)
    arrays: dict[str, Any] = {f"model/{k}": asnumpy(v) for k, v in model_state.items()}
    arrays.update({f"optim/{k}": _to_host(v) for k, v in optim_state.items()})
    arrays["meta"] = np.array(json.dumps(meta))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:  # a full disk, or Ctrl-C mid-write: never leave the temp file
        Path(tmp_name).unlink(missing_ok=True)
        if not isinstance(exc, OSError):
            raise
        kept = " (the previous checkpoint is kept)" if path.exists() else ""
        raise CheckpointError(
            f"cannot write checkpoint {path}: {exc.strerror or exc}{kept}; free space or use --out"
        ) from None
    fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict, dict, dict]:
    """Read ``(model_state, optim_state, meta)`` from ``path``; host NumPy arrays."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            model_state = {k[6:]: data[k] for k in data.files if k.startswith("model/")}
            optim_state = {k[6:]: _from_host(data[k]) for k in data.files if k.startswith("optim/")}
            meta = json.loads(str(data["meta"]))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt ({exc})") from None
    if not model_state:
        raise CheckpointError(f"checkpoint {path} holds no model weights")
    return model_state, optim_state, meta


def _to_host(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) else asnumpy(value)


def _from_host(value: np.ndarray) -> Any:
    """0-d arrays back to Python scalars (optimizer counters, hyper-parameters)."""
    return value.item() if value.ndim == 0 else value
