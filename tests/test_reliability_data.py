"""Input fuzzing: any bytes given to the IDX reader (or the checkpoint reader) either parse
to valid arrays or raise the project's own one-line error, never anything else, and never
allocate what a corrupt header claims. Out-of-range labels are refused before they reach any
device (CuPy wraps an out-of-range index silently instead of raising)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from conftest import DEVICES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lenet_xp.backend import get_device
from lenet_xp.data.device_split import to_device_split
from lenet_xp.data.mnist import DataError, read_idx
from lenet_xp.storage.checkpoint import CheckpointError, load_checkpoint

# Each example overwrites the same file in the test's tmp_path: no fixture state to reset.
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


def _idx(shape: tuple[int, ...], fill: int = 7) -> bytes:
    head = (0x800 + len(shape)).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape)
    return head + bytes([fill]) * int(np.prod(shape))


@st.composite
def idx_files(draw) -> bytes:
    """A valid IDX file (labels or small images), then maybe mutated: bytes flipped, cut,
    appended, or a header dimension replaced by any 32-bit number (e.g. 4 billion)."""
    if draw(st.booleans()):
        shape = (draw(st.integers(0, 40)),)
    else:
        shape = tuple(draw(st.integers(0, 6)) for _ in range(3))
    data = bytearray(_idx(shape, draw(st.integers(0, 255))))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["flip", "cut", "append", "dimension"]))
        if kind == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[draw(st.integers(0, len(data))) :]
        elif kind == "append":
            data += draw(st.binary(min_size=1, max_size=64))
        elif kind == "dimension" and len(data) >= 8:
            at = 4 * draw(st.integers(1, max(1, min(3, len(data) // 4 - 1))))
            data[at : at + 4] = draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big")
    return bytes(data)


def _check_read(folder: Path, unpacked: bytes, stored: bytes, suffix: str) -> None:
    """``read_idx`` of a file holding ``stored`` (``unpacked`` once gunzipped): a uint8 array
    that is exactly the file's data, or one DataError line naming the file."""
    path = folder / f"train-images-idx3-ubyte{suffix}"
    path.write_bytes(stored)
    try:
        array = read_idx(path)
    except DataError as exc:
        assert "\n" not in str(exc) and path.name in str(exc), exc
        return
    assert array.dtype == np.uint8 and array.ndim in (1, 3) and array.flags.writeable
    header = 4 + 4 * array.ndim
    assert unpacked[:4] == (0x800 + array.ndim).to_bytes(4, "big")
    assert array.shape == tuple(
        int.from_bytes(unpacked[4 + 4 * i : 8 + 4 * i], "big") for i in range(array.ndim)
    )
    assert array.tobytes() == unpacked[header:]


@SETTINGS
@given(st.binary(max_size=600))
def test_read_idx_on_arbitrary_bytes(tmp_path, data):
    _check_read(tmp_path, data, data, "")


@SETTINGS
@given(idx_files())
def test_read_idx_on_mutated_idx_files(tmp_path, data):
    _check_read(tmp_path, data, data, "")


@SETTINGS
@given(idx_files(), st.data())
def test_read_idx_on_mutated_gzip_files(tmp_path, data, draw):
    packed = bytearray(gzip.compress(data))
    if draw.draw(st.booleans()):  # damage the compressed stream too
        at = draw.draw(st.integers(0, len(packed) - 1))
        packed[at] ^= draw.draw(st.integers(1, 255))
    try:
        unpacked = gzip.decompress(bytes(packed))
    except Exception:  # noqa: BLE001  read_idx must then refuse it
        unpacked = None
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(bytes(packed))
    if unpacked is None:
        with pytest.raises(DataError):
            read_idx(path)
    else:
        _check_read(tmp_path, unpacked, bytes(packed), ".gz")


def test_a_header_claiming_billions_of_images_is_refused_without_allocating_them(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    good = _idx((3, 28, 28))
    path.write_bytes(good[:4] + (4_000_000_000).to_bytes(4, "big") + good[8:])
    with pytest.raises(DataError, match="truncated: header says 4000000000 images"):
        read_idx(path)


@SETTINGS
@given(st.one_of(st.binary(max_size=400), st.binary(max_size=400).map(lambda b: b"PK\x03\x04" + b)))
def test_load_checkpoint_on_arbitrary_bytes(tmp_path, data):
    path = tmp_path / "last.npz"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


BAD_LABELS = {
    "10": np.array([0, 10, 3], np.int64),
    "255 (uint8)": np.array([0, 255, 3], np.uint8),
    "-1": np.array([-1, 2, 3], np.int64),
    "float": np.array([0.0, 1.0, 2.0]),
    "one short": np.array([0, 1], np.int64),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("labels", list(BAD_LABELS))
def test_bad_labels_never_reach_the_device(device, labels):
    images = np.zeros((3, 28, 28), np.uint8)
    with pytest.raises(DataError) as info:
        to_device_split(images, BAD_LABELS[labels], get_device(device))
    assert "\n" not in str(info.value) and "label" in str(info.value)
    good = to_device_split(images, np.array([0, 9, 3], np.uint8), get_device(device))
    assert good.labels.dtype == np.int64 and len(good) == 3
