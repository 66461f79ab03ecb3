"""MNIST on disk: find it, download it (checked), read it (checked).

This is the one module that does host-side file I/O with NumPy; everything it returns is a
host ``numpy.ndarray`` of ``uint8``. The trainer moves data to the device and normalises it
with :data:`MEAN` and :data:`STD`.

Where the four files are looked for (:func:`resolve_data_dir`): the ``data_dir`` argument
(CLI ``--data-dir``), else ``$LENET_XP_DATA``, else ``$XDG_CACHE_HOME/lenet_xp/mnist`` or
``~/.cache/lenet_xp/mnist``. Each file may be there as ``name.gz`` or unpacked as ``name``.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import sys
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lenet_xp.storage.fsync import fsync_dir

#: MNIST's pixel mean and standard deviation (pixels in [0, 1]): inputs are ``(x - MEAN) / STD``.
MEAN = 0.1307
STD = 0.3081
#: A blank (0) pixel once normalised: what padding, shifts and distortions fill with.
BACKGROUND = -MEAN / STD

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

#: SHA-256 of the UNPACKED files (what ``gunzip`` gives), keyed by unpacked name.
SHA256 = {
    TEST_IMAGES: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    TEST_LABELS: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    TRAIN_IMAGES: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    TRAIN_LABELS: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
}

#: Tried in turn; each serves ``<name>.gz``. Content is checked against :data:`SHA256`.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

ENV_VAR = "LENET_XP_DATA"
MIRRORS_ENV_VAR = "LENET_XP_MIRRORS"
_IDX_UBYTE = 0x08
_IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}  # ndim -> magic number
_CHUNK = 1 << 16


class DataError(Exception):
    """MNIST is missing or broken. The message is one line: the file, the problem, the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class MNIST:
    """The four MNIST arrays, host ``uint8``.

    ``train_images`` (60000, 28, 28), ``train_labels`` (60000,), ``test_images``
    (10000, 28, 28), ``test_labels`` (10000,); pixels 0..255, labels 0..9.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    def __repr__(self) -> str:
        return (
            f"MNIST(train={self.train_images.shape[0]}, test={self.test_images.shape[0]}, "
            f"image_shape={self.train_images.shape[1:]})"
        )


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The MNIST directory: ``data_dir``, else ``$LENET_XP_DATA``, else the user cache dir."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(cache).expanduser() / "lenet_xp" / "mnist"


def _read_at_most(f, limit: int) -> bytearray:
    """Up to ``limit`` bytes of ``f`` (fewer at its end), read in chunks: memory grows with
    what the file holds, never with what a (possibly corrupt) header claims."""
    data = bytearray()
    while len(data) < limit:
        chunk = f.read(min(_CHUNK << 4, limit - len(data)))
        if not chunk:
            break
        data += chunk
    return data


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an MNIST IDX file (``.gz`` or raw) fully checked.

    Returns a writable ``uint8`` array: (N, rows, cols) for images (magic 0x00000803) or
    (N,) for labels (magic 0x00000801). Raises :class:`DataError` on a missing or unreadable
    file, a bad magic number, a file shorter or longer than its header says, or corrupt gzip.
    """
    path = Path(path)
    fix = "delete it and run again to re-download, or replace it with a good copy"
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4:
                raise DataError(f"{path}: only {len(head)} bytes, not an IDX file; {fix}")
            magic = int.from_bytes(head, "big")
            ndim = head[3]
            if head[:3] != bytes([0, 0, _IDX_UBYTE]) or ndim not in _IDX_MAGIC:
                hint = " (it looks gzip-compressed: name it .gz)" if head[:2] == b"\x1f\x8b" else ""
                raise DataError(
                    f"{path}: bad magic number 0x{magic:08x}{hint}, expected 0x00000803 "
                    f"(images) or 0x00000801 (labels); not an MNIST IDX file; {fix}"
                )
            dims_raw = f.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise DataError(f"{path}: truncated inside the header; {fix}")
            shape = tuple(int.from_bytes(dims_raw[4 * i : 4 * i + 4], "big") for i in range(ndim))
            header, size = 4 + 4 * ndim, math.prod(shape)
            data = _read_at_most(f, size + 1)  # one byte more: trailing bytes show up
            got, extra = min(len(data), size), max(len(data) - size, 0)
            while chunk := f.read(_CHUNK):  # counted, not kept; gzip checks its CRC at the end
                extra += len(chunk)
    except DataError:
        raise
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt gzip data ({e or type(e).__name__}); {fix}") from e
    except FileNotFoundError as e:
        raise DataError(f"{path}: no such file; check the path or --data-dir") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); check its permissions") from e
    if got != size or extra:
        kind = "truncated" if got != size else "trailing bytes"
        what = f"{shape[0]} images of {shape[1]}x{shape[2]}" if ndim == 3 else f"{shape[0]} labels"
        gz = " unpacked" if path.suffix == ".gz" else ""
        raise DataError(
            f"{path}: {kind}: header says {what} ({header + size} bytes) but the{gz} file "
            f"holds {header + got + extra} bytes; {fix}"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)  # writable: a bytearray's


def _find(data_dir: Path, name: str) -> Path | None:
    for candidate in (data_dir / f"{name}.gz", data_dir / name):
        if candidate.is_file():
            return candidate
    return None


def _manual_hint(data_dir: Path) -> str:
    names = ", ".join(f"{n}.gz" for n in FILES)
    return (
        f"download {names} yourself and put them (gzipped or unpacked) in {data_dir}, "
        f"or point {ENV_VAR} or --data-dir at a directory that holds them"
    )


def _ensure_writable(data_dir: Path) -> None:
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=data_dir, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DataError(
            f"{data_dir}: data directory is not writable ({e.strerror or e}); pass --data-dir "
            f"or set {ENV_VAR} to a writable directory, or {_manual_hint(data_dir)}"
        ) from e


def _why(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return str(e) or type(e).__name__


class _ChecksumError(Exception):
    pass


def _fetch(url: str, dest: Path, timeout: float, progress: bool, label: str) -> None:
    """Stream ``url`` into ``dest`` (already created) and fsync it."""
    req = urllib.request.Request(url, headers={"User-Agent": "lenet_xp"})
    with urllib.request.urlopen(req, timeout=timeout) as resp, open(dest, "wb") as out:
        total = resp.headers.get("Content-Length")
        with tqdm(
            total=int(total) if total and total.isdigit() else None,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=label,
            disable=not progress,
            leave=False,
        ) as bar:
            while chunk := resp.read(_CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
        out.flush()
        os.fsync(out.fileno())


def _unpacked_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with gzip.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download_mnist(
    data_dir: str | os.PathLike[str],
    mirrors: Sequence[str] = MIRRORS,
    progress: bool = True,
    timeout: float = 30,
    sha256: dict[str, str] | None = None,
) -> list[Path]:
    """Download the MNIST files missing from ``data_dir``; return the paths written.

    Each ``<name>.gz`` is fetched from the first of ``mirrors`` that works, streamed to a
    temporary file in ``data_dir``, its unpacked SHA-256 checked against ``sha256`` (default
    :data:`SHA256`), then fsynced and atomically renamed into place. A failing mirror is
    reported on stderr in one line and the next one is tried; if none works, :class:`DataError`.
    """
    data_dir = Path(data_dir).expanduser()
    digests = SHA256 if sha256 is None else sha256
    _ensure_writable(data_dir)
    written = []
    for name in FILES:
        if _find(data_dir, name) is not None:
            continue
        final = data_dir / f"{name}.gz"
        failures = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + f"/{name}.gz"
            fd, tmp_name = tempfile.mkstemp(dir=data_dir, prefix=f".{name}.gz.", suffix=".part")
            os.close(fd)
            tmp = Path(tmp_name)
            try:
                _fetch(url, tmp, timeout, progress, f"{name}.gz")
                got = _unpacked_sha256(tmp)
                if got != digests[name]:
                    raise _ChecksumError(f"checksum mismatch (unpacked sha256 {got[:12]}...)")
                os.replace(tmp, final)
                fsync_dir(data_dir)
                written.append(final)
                break
            except (
                urllib.error.URLError,
                http.client.HTTPException,
                OSError,
                gzip.BadGzipFile,
                EOFError,
                zlib.error,
                _ChecksumError,
            ) as e:
                why = _why(e)
                if isinstance(e, (gzip.BadGzipFile, EOFError, zlib.error)):
                    why = f"corrupt gzip ({why})"
                failures.append(f"{url}: {why}")
                more = "; trying the next one" if len(failures) < len(mirrors) else ""
                print(f"lenet_xp: mirror failed: {url}: {why}{more}", file=sys.stderr)
            finally:
                tmp.unlink(missing_ok=True)
        else:
            tried = "; ".join(failures) or "no mirrors given"
            raise DataError(
                f"{name}.gz: could not download from any mirror ({tried}); {_manual_hint(data_dir)}"
            )
    return written


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    progress: bool = True,
    *,
    mirrors: Sequence[str] | None = None,
    sha256: dict[str, str] | None = None,
    timeout: float = 30,
) -> MNIST:
    """Load MNIST from :func:`resolve_data_dir` ``(data_dir)``, downloading missing files.

    Returns host ``uint8`` arrays (see :class:`MNIST`). Checks every file (:func:`read_idx`),
    that images are Nx28x28 and labels N, that counts match and labels are in 0..9.
    ``mirrors`` defaults to ``$LENET_XP_MIRRORS`` (comma-separated base URLs), else
    :data:`MIRRORS`.
    """
    if mirrors is None:
        from_env = os.environ.get(MIRRORS_ENV_VAR, "")
        mirrors = tuple(u.strip() for u in from_env.split(",") if u.strip()) or MIRRORS
    root = resolve_data_dir(data_dir)
    missing = [n for n in FILES if _find(root, n) is None]
    if missing and download:
        download_mnist(root, mirrors=mirrors, progress=progress, timeout=timeout, sha256=sha256)
    elif missing:
        names = ", ".join(f"{n}(.gz)" for n in missing)
        raise DataError(f"{root}: missing {names} and download is off; {_manual_hint(root)}")

    def read(name: str, ndim: int) -> tuple[Path, np.ndarray]:
        path = _find(root, name)
        if path is None:  # vanished since the download
            raise DataError(f"{root / name}: missing; {_manual_hint(root)}")
        arr = read_idx(path)
        if arr.ndim != ndim or (ndim == 3 and arr.shape[1:] != (28, 28)):
            want = "images of 28x28" if ndim == 3 else "labels (1-d)"
            raise DataError(
                f"{path}: holds an array of shape {arr.shape}, expected {want}; "
                "is it the right file? delete it and run again to re-download"
            )
        return path, arr

    out = []
    for img_name, lbl_name in ((TRAIN_IMAGES, TRAIN_LABELS), (TEST_IMAGES, TEST_LABELS)):
        img_path, images = read(img_name, 3)
        lbl_path, labels = read(lbl_name, 1)
        if len(images) != len(labels):
            raise DataError(
                f"{img_path} holds {len(images)} images but {lbl_path} holds {len(labels)} "
                "labels; delete both and run again to re-download"
            )
        bad = np.flatnonzero(labels > 9)
        if bad.size:
            raise DataError(
                f"{lbl_path}: label {labels[bad[0]]} at index {bad[0]} is outside 0..9 "
                f"({bad.size} such labels); delete it and run again to re-download"
            )
        out += [images, labels]
    return MNIST(*out)
