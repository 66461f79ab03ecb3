"""MNIST reading, checking and downloading, against real files and real local HTTP servers."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from lenet_xp.data import mnist
from lenet_xp.data.mnist import FILES, DataError, download_mnist, load_mnist, read_idx

REAL_DIR = Path(os.environ.get("LENET_XP_DATA", "/work/shared/datasets/mnist"))
HAVE_REAL = all((REAL_DIR / f"{n}.gz").is_file() for n in FILES)
needs_real = pytest.mark.skipif(not HAVE_REAL, reason=f"real MNIST .gz files not in {REAL_DIR}")


# ---------------------------------------------------------------- helpers


def idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    """Serialise a uint8 array as IDX (magic 0x801 for 1-d, 0x803 for 3-d unless given)."""
    magic = magic if magic is not None else 0x800 + arr.ndim
    head = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return head + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def synthetic(n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict[str, bytes]:
    """Small valid MNIST-format files, keyed by unpacked name."""
    rng = np.random.default_rng(seed)
    out = {}
    for img, lbl, n in (
        (mnist.TRAIN_IMAGES, mnist.TRAIN_LABELS, n_train),
        (mnist.TEST_IMAGES, mnist.TEST_LABELS, n_test),
    ):
        out[img] = idx_bytes(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        out[lbl] = idx_bytes(rng.integers(0, 10, n, dtype=np.uint8))
    return out


def digests(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def write_dir(d: Path, files: dict[str, bytes], gz: bool = True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        write(d / (f"{name}.gz" if gz else name), data)
    return d


def assert_one_line_naming(err: pytest.ExceptionInfo, *names: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.strip() == msg
    for name in names:
        assert name in msg, msg
    return msg


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextmanager
def serve(directory: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving ``directory``; yields its base URL."""
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def dead_url() -> str:
    """A URL on a port where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.fixture
def synth(tmp_path: Path):
    """(files, digests, URL of a good mirror serving them gzipped)."""
    files = synthetic()
    with serve(write_dir(tmp_path / "good", files)) as url:
        yield files, digests(files), url


def assert_downloaded(d: Path, files: dict[str, bytes]) -> None:
    assert sorted(os.listdir(d)) == sorted(f"{n}.gz" for n in FILES)  # no temp files left
    for name, data in files.items():
        np.testing.assert_array_equal(read_idx(d / f"{name}.gz"), read_idx(write(d / name, data)))
        (d / name).unlink()


# ---------------------------------------------------------------- real files


@needs_real
def test_real_mnist_loads():
    ds = load_mnist(REAL_DIR, download=False)
    assert ds.train_images.shape == (60000, 28, 28) and ds.train_images.dtype == np.uint8
    assert ds.train_labels.shape == (60000,) and ds.train_labels.dtype == np.uint8
    assert ds.test_images.shape == (10000, 28, 28) and ds.test_images.dtype == np.uint8
    assert ds.test_labels.shape == (10000,) and ds.test_labels.dtype == np.uint8
    assert ds.train_labels[0] == 5
    assert ds.train_labels.max() <= 9 and set(np.unique(ds.test_labels)) == set(range(10))
    assert ds.train_images.max() == 255 and ds.train_images.flags.writeable
    assert "60000" in repr(ds)


# ---------------------------------------------------------------- read_idx


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_read_idx_round_trip(tmp_path: Path, suffix: str):
    arr = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    got = read_idx(write(tmp_path / f"img{suffix}", idx_bytes(arr)))
    np.testing.assert_array_equal(got, arr)
    assert got.dtype == np.uint8
    lbl = np.array([0, 9, 3], np.uint8)
    np.testing.assert_array_equal(read_idx(write(tmp_path / f"lbl{suffix}", idx_bytes(lbl))), lbl)


LABELS = np.arange(10, dtype=np.uint8)


@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize(
    "data, words",
    [
        (idx_bytes(LABELS, magic=0x00000804), "bad magic number 0x00000804"),
        (idx_bytes(LABELS, magic=0x00000901), "bad magic number"),  # dtype 0x09, not ubyte
        (idx_bytes(LABELS, magic=0x00000802), "bad magic number"),  # 2-d
        (idx_bytes(LABELS)[:-3], "truncated: header says 10 labels (18 bytes)"),
        (idx_bytes(LABELS) + b"\0\0", "trailing bytes"),
        (idx_bytes(np.zeros((2, 28, 28), np.uint8))[:100], "truncated: header says 2 images"),
        (idx_bytes(LABELS)[:6], "truncated inside the header"),
        (b"", "only 0 bytes"),
    ],
)
def test_read_idx_rejects_bad_contents(tmp_path: Path, suffix: str, data: bytes, words: str):
    path = write(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", data)
    with pytest.raises(DataError) as err:
        read_idx(path)
    msg = assert_one_line_naming(err, path.name, words)
    assert "delete it" in msg


def test_read_idx_corrupt_gzip(tmp_path: Path):
    raw = idx_bytes(np.random.default_rng(1).integers(0, 256, (50, 28, 28), dtype=np.uint8))
    packed = bytearray(gzip.compress(raw))
    mid = len(packed) // 2
    packed[mid : mid + 8] = bytes(b ^ 0xFF for b in packed[mid : mid + 8])
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(bytes(packed))
    with pytest.raises(DataError) as err:
        read_idx(bad)
    assert_one_line_naming(err, bad.name, "corrupt gzip")

    cut = tmp_path / "cut.gz"  # gzip stream that ends early
    cut.write_bytes(gzip.compress(raw)[:-100])
    with pytest.raises(DataError) as err:
        read_idx(cut)
    assert_one_line_naming(err, "cut.gz", "corrupt gzip")

    not_gz = tmp_path / "plain.gz"  # named .gz but stored raw
    not_gz.write_bytes(raw)
    with pytest.raises(DataError) as err:
        read_idx(not_gz)
    assert_one_line_naming(err, "plain.gz", "corrupt gzip")


def test_read_idx_gzip_named_raw_and_missing(tmp_path: Path):
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(gzip.compress(idx_bytes(LABELS)))
    with pytest.raises(DataError) as err:
        read_idx(path)
    assert_one_line_naming(err, path.name, "gzip-compressed")
    with pytest.raises(DataError) as err:
        read_idx(tmp_path / "nope.gz")
    assert_one_line_naming(err, "nope.gz", "no such file")


# ---------------------------------------------------------------- load_mnist checks


def test_load_mnist_mixed_gz_and_raw(tmp_path: Path):
    files = synthetic()
    write_dir(tmp_path, {n: files[n] for n in FILES[:2]}, gz=True)
    write_dir(tmp_path, {n: files[n] for n in FILES[2:]}, gz=False)
    ds = load_mnist(tmp_path, download=False)
    assert ds.train_images.shape == (12, 28, 28) and ds.test_labels.shape == (5,)
    np.testing.assert_array_equal(ds.test_labels, np.frombuffer(files[mnist.TEST_LABELS][8:], "u1"))


def test_load_mnist_label_out_of_range(tmp_path: Path):
    files = synthetic()
    files[mnist.TRAIN_LABELS] = idx_bytes(np.array([1, 2, 11] + [0] * 9, np.uint8))
    write_dir(tmp_path, files)
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path, download=False)
    assert_one_line_naming(err, "train-labels-idx1-ubyte.gz", "label 11 at index 2", "0..9")


def test_load_mnist_count_mismatch(tmp_path: Path):
    files = synthetic()
    files[mnist.TEST_LABELS] = idx_bytes(np.zeros(4, np.uint8))
    write_dir(tmp_path, files)
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path, download=False)
    assert_one_line_naming(err, "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "5 im")


def test_load_mnist_swapped_file(tmp_path: Path):
    files = synthetic()
    files[mnist.TRAIN_IMAGES] = files[mnist.TRAIN_LABELS]
    write_dir(tmp_path, files)
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path, download=False)
    assert_one_line_naming(err, "train-images-idx3-ubyte.gz", "expected images of 28x28")


def test_load_mnist_missing_without_download(tmp_path: Path):
    files = synthetic()
    del files[mnist.TEST_IMAGES]
    write_dir(tmp_path, files)
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path, download=False)
    msg = assert_one_line_naming(err, "t10k-images-idx3-ubyte", str(tmp_path), "LENET_XP_DATA")
    assert "--data-dir" in msg and "train-images" not in msg.split(";")[0]


# ---------------------------------------------------------------- where it looks


def test_resolve_data_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LENET_XP_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert mnist.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert mnist.resolve_data_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    assert mnist.resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("LENET_XP_DATA")
    assert mnist.resolve_data_dir(None) == tmp_path / "xdg" / "lenet_xp" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert mnist.resolve_data_dir() == tmp_path / "home" / ".cache" / "lenet_xp" / "mnist"


def test_load_mnist_uses_env_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LENET_XP_DATA", str(write_dir(tmp_path / "env", synthetic())))
    assert load_mnist(download=False).train_labels.shape == (12,)


# ---------------------------------------------------------------- downloading


@needs_real
def test_download_real_files_with_real_digests(tmp_path: Path, capsys):
    dest = tmp_path / "cache" / "mnist"
    with serve(REAL_DIR) as url:
        written = download_mnist(dest, mirrors=[url], progress=True)
    assert sorted(p.name for p in written) == sorted(f"{n}.gz" for n in FILES)
    for name in FILES:
        assert (dest / f"{name}.gz").read_bytes() == (REAL_DIR / f"{name}.gz").read_bytes()
    assert sorted(os.listdir(dest)) == sorted(f"{n}.gz" for n in FILES)
    assert load_mnist(dest, download=False).train_labels[0] == 5
    assert "mirror failed" not in capsys.readouterr().err


def test_download_skips_dead_mirror(tmp_path: Path, synth, capsys):
    files, sums, good = synth
    dead = dead_url()
    ds = load_mnist(tmp_path / "d", mirrors=[dead, good], sha256=sums, progress=False)
    assert ds.train_images.shape == (12, 28, 28)
    assert_downloaded(tmp_path / "d", files)
    err = capsys.readouterr().err
    assert f"{dead}train-images-idx3-ubyte.gz" in err and "refused" in err.lower()
    assert good not in err


def test_download_skips_404_mirror(tmp_path: Path, synth, capsys):
    files, sums, good = synth
    empty = tmp_path / "empty"
    empty.mkdir()
    with serve(empty) as missing:
        download_mnist(tmp_path / "d", mirrors=[missing, good], progress=False, sha256=sums)
        assert_downloaded(tmp_path / "d", files)
        assert f"{missing}t10k-labels-idx1-ubyte.gz: HTTP 404" in capsys.readouterr().err
        with pytest.raises(DataError) as err:
            download_mnist(tmp_path / "e", mirrors=[missing], progress=False, sha256=sums)
    assert_one_line_naming(err, "train-images-idx3-ubyte.gz", "HTTP 404", "LENET_XP_DATA")
    assert os.listdir(tmp_path / "e") == []


@pytest.mark.parametrize("kind", ["checksum", "gzip"])
def test_download_skips_corrupt_mirror(tmp_path: Path, synth, capsys, kind: str):
    files, sums, good = synth
    bad_dir = tmp_path / "bad"
    if kind == "checksum":  # valid gzip, valid IDX, wrong content
        write_dir(bad_dir, synthetic(seed=7))
    else:  # not gzip at all
        bad_dir.mkdir()
        for name, data in files.items():
            (bad_dir / f"{name}.gz").write_bytes(data)
    with serve(bad_dir) as bad:
        ds = load_mnist(tmp_path / "d", mirrors=[bad, good], sha256=sums, progress=False)
        want = np.frombuffer(files[mnist.TRAIN_LABELS], np.uint8, offset=8)
        np.testing.assert_array_equal(ds.train_labels, want)
        assert_downloaded(tmp_path / "d", files)
        err = capsys.readouterr().err
        assert f"{bad}train-labels-idx1-ubyte.gz" in err
        assert ("checksum mismatch" if kind == "checksum" else "corrupt gzip") in err

        only_bad = tmp_path / "only_bad"
        with pytest.raises(DataError) as exc:
            load_mnist(only_bad, mirrors=[bad], sha256=sums, progress=False)
    msg = assert_one_line_naming(exc, "train-images-idx3-ubyte.gz", str(only_bad), bad)
    assert "LENET_XP_DATA" in msg and "--data-dir" in msg
    for name in FILES:
        assert f"{name}.gz" in msg
    assert os.listdir(only_bad) == []  # no temp or partial final files


def test_download_times_out_on_silent_mirror(tmp_path: Path, synth, capsys):
    files, sums, good = synth
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        download_mnist(tmp_path / "d", [url, good], progress=False, timeout=0.3, sha256=sums)
    assert_downloaded(tmp_path / "d", files)
    assert f"{url}train-images-idx3-ubyte.gz: timed out" in capsys.readouterr().err


def test_download_only_fetches_missing_files(tmp_path: Path, synth):
    files, sums, good = synth
    present = {mnist.TRAIN_IMAGES: files[mnist.TRAIN_IMAGES]}
    write_dir(tmp_path / "d", present, gz=False)
    written = download_mnist(tmp_path / "d", [good], progress=False, sha256=sums)
    assert sorted(p.name for p in written) == sorted(f"{n}.gz" for n in FILES[1:])


def test_download_no_mirrors(tmp_path: Path):
    with pytest.raises(DataError) as err:
        download_mnist(tmp_path, mirrors=[], progress=False)
    assert_one_line_naming(err, "train-images-idx3-ubyte.gz", "no mirrors given", str(tmp_path))


def test_unwritable_dir_under_regular_file(tmp_path: Path, synth):
    _, sums, good = synth
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DataError) as err:
        load_mnist(blocker / "mnist", mirrors=[good], sha256=sums, progress=False)
    assert_one_line_naming(err, str(blocker / "mnist"), "not writable", "LENET_XP_DATA")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_unwritable_dir_chmod(tmp_path: Path, synth):
    _, sums, good = synth
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    try:
        with pytest.raises(DataError) as err:
            download_mnist(ro, [good], progress=False, sha256=sums)
    finally:
        ro.chmod(0o700)
    assert_one_line_naming(err, str(ro), "not writable")
