"""Checkpoints: model, optimizer state and run metadata in one ``.npz`` (no pickle).

Keys: ``model/<name>`` (``model.state_dict()``), ``optim/<key>`` (``optimizer.state_dict()``),
``meta`` (a JSON string: epoch, step, RNG state, config, metrics), ``format_version`` (0-d
int64, :data:`FORMAT_VERSION`) and ``sha256`` (0-d str: :func:`digest` of all the others).

Writes are atomic: a temp file in the same folder, flushed and fsynced, then renamed over
the target, so a crash or a full disk never leaves a half-written checkpoint under the real
name. Reads are checked: each ``.npy`` member is parsed here (an object array, i.e. a pickle,
is refused, never loaded), then the format version and the SHA-256. A file without
``format_version`` is format 1 (written before checksums existed) and loads as before.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lenet_xp.backend import asnumpy
from lenet_xp.storage.fsync import fsync_dir

#: The layout :func:`save_checkpoint` writes (1: no ``format_version``/``sha256`` keys).
FORMAT_VERSION = 2
#: Temp files of an interrupted write are named ``.<target name>.<random>`` + this suffix.
TEMP_SUFFIX = ".tmp"
_MAX_BYTES = 1 << 31  # a checkpoint claiming more (unpacked) is corrupt or not ours
_UNREADABLE = "use another checkpoint (best.npz, epoch_NNN.npz) or train again"


class CheckpointError(Exception):
    """A checkpoint could not be written or read; the message is one line."""


def digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 (hex) over every array of ``arrays`` but ``"sha256"``: name, dtype, shape
    and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        if name != "sha256":
            a = np.ascontiguousarray(arrays[name])
            h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def save_checkpoint(
    path: str | os.PathLike[str], model_state: dict, optim_state: dict, meta: dict,
    also: Sequence[str | os.PathLike[str]] = (),
) -> Path:  # fmt: skip
    """Atomically write ``path`` (``.npz``); arrays are copied to the host first (once). The
    same checkpoint goes to each of ``also`` first, then to ``path``."""
    arrays: dict[str, Any] = {f"model/{k}": asnumpy(v) for k, v in model_state.items()}
    arrays.update({f"optim/{k}": np.asarray(_to_host(v)) for k, v in optim_state.items()})
    arrays["meta"] = np.array(json.dumps(meta))
    arrays["format_version"] = np.array(FORMAT_VERSION, dtype=np.int64)
    arrays["sha256"] = np.array(digest(arrays))
    for target in [*map(Path, also), Path(path)]:
        try:
            atomic_write(target, lambda f: np.savez(f, **arrays))
        except OSError as exc:  # a full disk: the previous file, if any, is untouched
            kept = " (the previous checkpoint is kept)" if target.exists() else ""
            raise CheckpointError(
                f"cannot write checkpoint {target}: {exc.strerror or exc}{kept}; free space or "
                "use --out"
            ) from None
    return Path(path)


def atomic_write(path: Path, write: Callable[[BinaryIO], object], mode: int | None = None) -> None:
    """Write a file atomically and durably: ``write(f)`` fills a temp file beside ``path``,
    which is fsynced, renamed over ``path``, then the folder fsynced. On any error (a full
    disk, Ctrl-C mid-write) the temp file is removed, ``path`` is untouched and the error
    propagates. ``mode``: the file's permissions (default: mkstemp's 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict, dict, dict]:
    """Read ``(model_state, optim_state, meta)`` from ``path``; host NumPy arrays.

    Raises :class:`CheckpointError` (one line naming ``path``) for a missing, non-npz,
    truncated or damaged file, a checksum mismatch, a newer format, or an ``.npz`` that is
    not a lenet_xp checkpoint."""
    path = Path(path)
    arrays = _read_npz(path)
    _check_version_and_digest(path, arrays)
    if "meta" not in arrays or not any(k.startswith("model/") for k in arrays):
        names = ", ".join(sorted(arrays)[:4]) or "nothing"
        raise CheckpointError(
            f"{path} is not a lenet_xp checkpoint (it holds {names}; no meta or model/ "
            "arrays); pass a last.npz, best.npz or epoch_NNN.npz written by lenet_xp.train"
        )
    try:
        meta = json.loads(str(arrays["meta"].item()))
        if not isinstance(meta, dict):
            raise ValueError(f"meta is a {type(meta).__name__}, not an object")
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path} has unreadable metadata ({exc})") from None
    model_state = {k[6:]: v for k, v in arrays.items() if k.startswith("model/")}
    optim_state = {k[6:]: _from_host(v) for k, v in arrays.items() if k.startswith("optim/")}
    return model_state, optim_state, meta


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every member of the ``.npz`` at ``path``, parsed by :func:`_parse_npy` (no pickle)."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            claimed = sum(info.file_size for info in infos)
            if claimed > _MAX_BYTES:
                raise ValueError(f"its members claim {claimed} bytes")
            return {_member(info.filename): _parse_npy(archive.read(info)) for info in infos}
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    except _PickledError as exc:
        raise CheckpointError(
            f"{path} holds {exc} (pickled Python objects), which lenet_xp never loads; "
            "it is not a lenet_xp checkpoint"
        ) from None
    except Exception as exc:  # noqa: BLE001  any parse failure means a damaged file
        if not _starts_like_zip(path):
            raise CheckpointError(
                f"{path} is not a checkpoint: not an .npz (zip) file; pass a last.npz, best.npz "
                "or epoch_NNN.npz written by lenet_xp.train"
            ) from None
        why = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({why}); {_UNREADABLE}"
        ) from None


class _PickledError(Exception):
    """A member is an object array: loading it would unpickle."""


def _member(filename: str) -> str:
    if not filename.endswith(".npy"):
        raise ValueError(f"member {filename!r} is not an .npy array")
    return filename[:-4]


def _parse_npy(raw: bytes) -> np.ndarray:
    """One ``.npy`` file's bytes as an array: the header read with NumPy's (literal-only)
    parser, the data size checked against it, object dtypes refused."""
    stream = io.BytesIO(raw)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    if dtype.hasobject:
        raise _PickledError(f"an object array of shape {shape}")
    count, offset = math.prod(shape), stream.tell()
    if count * dtype.itemsize != len(raw) - offset:
        raise ValueError(f"{len(raw) - offset} data bytes for shape {shape} of {dtype}")
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran else "C").copy()


def _starts_like_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _check_version_and_digest(path: Path, arrays: dict[str, np.ndarray]) -> None:
    version = arrays.get("format_version")
    if version is None:
        return  # format 1: written before versions and checksums
    if version.shape != () or version.dtype.kind not in "iu" or int(version) < 2:
        raise CheckpointError(f"checkpoint {path} has an invalid format_version; {_UNREADABLE}")
    if int(version) > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format {int(version)}, newer than this lenet_xp reads "
            f"(up to {FORMAT_VERSION}); upgrade lenet_xp to load it"
        )
    stored = arrays.get("sha256")
    if stored is None or stored.shape != () or str(stored.item()) != digest(arrays):
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its SHA-256 does not match its contents; {_UNREADABLE}"
        )


def _to_host(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) else asnumpy(value)


def _from_host(value: np.ndarray) -> Any:
    """0-d arrays back to Python scalars (optimizer counters, hyper-parameters)."""
    return value.item() if value.ndim == 0 else value
