"""Checkpoints really written, re-read, rejected when corrupt, and never half-written."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lenet_xp import LeNet5, loss_and_grads
from lenet_xp.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from lenet_xp.optim import Adam


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
        from lenet_xp.checkpoint import save_checkpoint, CheckpointError
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
