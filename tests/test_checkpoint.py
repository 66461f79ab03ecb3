"""Checkpoints really written, re-read, rejected when corrupt, and never half-written."""

import json
import pathlib
import random
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
from conftest import DATA, needs_mnist

from lenet_xp import LeNet5, loss_and_grads
from lenet_xp.optim.optimizers import Adam
from lenet_xp.storage.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    digest,
    load_checkpoint,
    save_checkpoint,
)
from lenet_xp.training.evaluation import load_model


def _trained_state():
    model = LeNet5(seed=0)
    optimizer = Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    loss_and_grads(model, rng.standard_normal((4, 1, 28, 28)).astype(np.float32), np.arange(4))
    optimizer.step()
    return model, optimizer


def test_round_trip(tmp_path):
    model, optimizer = _trained_state()
    meta = {
        "epoch": 3,
        "config": {"lr": 1e-3},
        "rng_state": np.random.default_rng(1).bit_generator.state,
    }
    path = save_checkpoint(
        tmp_path / "sub" / "last.npz", model.state_dict(), optimizer.state_dict(), meta
    )
    model_state, optim_state, meta_back = load_checkpoint(path)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(model_state[name], value)
    fresh = Adam(LeNet5(seed=1).parameters(), lr=1e-3)
    fresh.load_state_dict(optim_state)
    assert fresh.steps == optimizer.steps == 1
    assert meta_back == meta
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["last.npz"]  # no temp left


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_corrupt_checkpoints_raise_one_line(tmp_path, damage):
    model, optimizer = _trained_state()
    path = save_checkpoint(tmp_path / "c.npz", model.state_dict(), optimizer.state_dict(), {})
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage":
        path.write_bytes(b"not a zip file at all")
    else:
        path.unlink()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_full_disk_keeps_previous_checkpoint(tmp_path):
    """A write that fails part-way (file-size limit: the OS refuses more bytes, as on a full
    disk) raises CheckpointError and leaves the previous checkpoint intact, with no temp file."""
    model, optimizer = _trained_state()
    path = save_checkpoint(
        tmp_path / "last.npz", model.state_dict(), optimizer.state_dict(), {"epoch": 1}
    )
    before = path.read_bytes()
    code = textwrap.dedent(
        f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
        from lenet_xp import LeNet5
        from lenet_xp.storage.checkpoint import save_checkpoint, CheckpointError
        try:
            save_checkpoint({str(path)!r}, LeNet5(seed=5).state_dict(), {{}}, {{"epoch": 2}})
        except CheckpointError as e:
            print(e)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "cannot write checkpoint" in out.stdout and "previous checkpoint is kept" in out.stdout
    assert path.read_bytes() == before
    assert load_checkpoint(path)[2] == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.npz"]


# ---------------------------------------------------------------- verified checkpoints (issue 13)


def _saved(tmp_path, name="c.npz", meta=None):
    model, optimizer = _trained_state()
    meta = {"epoch": 1, "config": {"arch": "lenet5"}} if meta is None else meta
    return save_checkpoint(tmp_path / name, model.state_dict(), optimizer.state_dict(), meta)


def _arrays(path):
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _one_line(path, *words):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for word in words:
        assert word in message, message
    return message


def test_format_version_and_sha256_are_written_and_cover_everything(tmp_path):
    path = _saved(tmp_path)
    arrays = _arrays(path)
    assert int(arrays["format_version"]) == FORMAT_VERSION == 2
    assert str(arrays["sha256"]) == digest(arrays) and len(str(arrays["sha256"])) == 64
    assert {k for k in arrays if not k.startswith(("model/", "optim/"))} == {
        "meta", "format_version", "sha256",
    }  # fmt: skip


def test_a_changed_array_in_a_valid_zip_fails_the_checksum(tmp_path):
    """Only the SHA-256 can catch this one: the zip is intact, one weight was changed."""
    path = _saved(tmp_path)
    arrays = _arrays(path)
    arrays["model/fc3.bias"] = arrays["model/fc3.bias"] + np.float32(1e-3)
    np.savez(path, **arrays)
    _one_line(path, "corrupt", "SHA-256 does not match")
    arrays = _arrays(_saved(tmp_path))
    arrays["meta"] = np.array(json.dumps({"epoch": 99, "config": {"arch": "lenet5"}}))
    np.savez(path, **arrays)
    _one_line(path, "SHA-256 does not match")


def test_every_flipped_byte_is_caught_or_harmless(tmp_path):
    """Flip one byte at 300 places (among them inside the weights, the metadata and the
    checksum): each load either raises one line naming the file, or (a byte the format does
    not use, e.g. a zip timestamp) returns exactly what was saved. Never wrong numbers."""
    path = _saved(tmp_path)
    good = load_checkpoint(path)
    raw = path.read_bytes()
    weights = good[0]["conv1.weight"].tobytes()
    spots = [raw.find(weights) + 100, raw.find('"epoch"'.encode("utf-32-le")) + 4]
    spots += [raw.find(str(_arrays(path)["sha256"]).encode("utf-32-le")) + 8]
    assert min(spots) > 100  # all found
    spots += random.Random(0).sample(range(len(raw)), 297)
    caught = 0
    for spot in spots:
        flipped = bytearray(raw)
        flipped[spot] ^= 0x5A
        path.write_bytes(bytes(flipped))
        try:
            back = load_checkpoint(path)
        except CheckpointError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc), exc
            caught += 1
            continue
        assert back[2] == good[2] and back[1].keys() == good[1].keys()
        for name, value in good[0].items():
            np.testing.assert_array_equal(back[0][name], value)
    assert caught >= 250  # almost every byte of a checkpoint is content


@pytest.mark.parametrize("keep", [0, 10, 100, 30_000, -22, -1])
def test_a_truncated_checkpoint_is_one_line(tmp_path, keep):
    path = _saved(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[:keep])
    _one_line(path)


def test_a_foreign_npz_or_a_non_npz_file_is_one_line(tmp_path):
    other = tmp_path / "other_project.npz"
    np.savez(other, weights=np.zeros((3, 3)), bias=np.ones(3))
    _one_line(other, "not a lenet_xp checkpoint")
    text = tmp_path / "notes.npz"
    text.write_text("epoch 3: loss 0.1\n")
    _one_line(text, "not an .npz (zip) file")
    folder = tmp_path / "folder.npz"
    folder.mkdir()
    _one_line(folder, "cannot read")


def test_a_checkpoint_from_a_newer_format_is_one_line(tmp_path):
    path = _saved(tmp_path)
    arrays = _arrays(path)
    arrays["format_version"] = np.array(FORMAT_VERSION + 1, dtype=np.int64)
    arrays["sha256"] = np.array(digest(arrays))
    np.savez(path, **arrays)
    _one_line(path, f"format {FORMAT_VERSION + 1}", "newer", "upgrade lenet_xp")


class _Payload:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_loading_never_unpickles(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.npz"
    arrays = _arrays(_saved(tmp_path))
    arrays["model/conv1.weight"] = np.array([_Payload(marker)], dtype=object)
    np.savez(path, **arrays)  # NumPy pickles object arrays
    _one_line(path, "pickled Python objects", "never loads")
    assert not marker.exists()
    np.load(path, allow_pickle=True)["model/conv1.weight"]  # the payload is live:
    assert marker.exists()  # it was only never run by load_checkpoint


def _old_format(path):
    """Rewrite ``path`` exactly as the release before format 2 wrote checkpoints: the same
    ``np.savez`` of model/, optim/ and meta, no format_version, no sha256 (and a meta
    without the keys format 2 added)."""
    arrays = _arrays(path)
    meta = json.loads(str(arrays["meta"]))
    meta.pop("history", None)
    old = {k: v for k, v in arrays.items() if k.startswith(("model/", "optim/"))}
    old["meta"] = np.array(json.dumps(meta))
    with open(path, "wb") as f:
        np.savez(f, **old)
    with zipfile.ZipFile(path) as archive:
        assert not {"sha256.npy", "format_version.npy"} & set(archive.namelist())
    return path


def test_an_old_format_checkpoint_still_loads(tmp_path):
    path = _saved(tmp_path)
    model_state, optim_state, meta = load_checkpoint(path)
    old = load_checkpoint(_old_format(path))
    assert old[2] == meta and old[1].keys() == optim_state.keys()
    for name, value in model_state.items():
        np.testing.assert_array_equal(old[0][name], value)


@needs_mnist
def test_an_old_format_checkpoint_resumes_exactly(tmp_path):
    """A run resumed from a format-1 epoch checkpoint (with the metrics file it left) ends
    with the metrics of the uninterrupted run."""
    from lenet_xp import train as train_cli

    run = ["--device", "cpu", "--data-dir", str(DATA), "--quiet", "--limit-train", "160"]
    run += ["--val-size", "32", "--limit-test", "64", "--batch-size", "32", "--workers", "1"]
    assert train_cli.main(run + ["--epochs", "2", "--out", str(tmp_path / "a")]) == 0
    assert (
        train_cli.main(run + ["--epochs", "2", "--keep-every-epoch", "--out", str(tmp_path)]) == 0
    )
    old = _old_format(tmp_path / "epoch_001.npz")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n")  # as when it was written
    assert train_cli.main(run + ["--resume", str(old), "--out", str(tmp_path)]) == 0

    def strip(p):
        return [{k: v for k, v in json.loads(line).items() if "second" not in k} for line in p]

    expected = strip((tmp_path / "a" / "metrics.jsonl").read_text().splitlines())
    assert strip((tmp_path / "metrics.jsonl").read_text().splitlines()) == expected


def test_a_checkpoint_of_another_arch_is_one_line(tmp_path):
    path = _saved(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_model(str(path), "cpu", arch="lenet5-classic")
    assert str(info.value).count("\n") == 0 and "holds --arch lenet5" in str(info.value)
    meta = {"epoch": 1, "config": {"arch": "compact-cnn"}}  # LeNet-5 weights, another arch
    mislabelled = _saved(tmp_path, "m.npz", meta)
    with pytest.raises(CheckpointError) as info:
        load_model(str(mislabelled), "cpu")
    assert str(mislabelled) in str(info.value) and "does not hold a compact-cnn" in str(info.value)


def test_atomic_write_leaves_the_old_file_and_no_temp_file_when_writing_fails(tmp_path):
    """The write path of checkpoints, exported weights and ONNX files: a failure half-way
    (here a full disk, raised after some bytes went out) keeps the previous file whole."""
    import errno

    from lenet_xp.storage.checkpoint import atomic_write

    path = tmp_path / "model.onnx"
    atomic_write(path, lambda f: f.write(b"first version"), mode=0o644)
    assert path.read_bytes() == b"first version"
    assert path.stat().st_mode & 0o777 == 0o644

    def fill_the_disk(f):
        f.write(b"half of the second")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, fill_the_disk)
    assert path.read_bytes() == b"first version"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
