"""SIGTERM (``docker stop``) and SIGINT (Ctrl-C) through the real CLI, at several points of
an epoch, with one and two worker processes: the run finishes its step, saves a mid-epoch
``last.npz``, says where it is and how to resume, exits 143 / 130 within seconds, and
``--resume`` then ends with exactly the metrics of a run never stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import DATA, needs_cuda, needs_mnist
from reliability_helpers import metrics, run_train, temp_files, train_cmd, wait_until

from lenet_xp.storage.checkpoint import CheckpointError, load_checkpoint

# 640 training images in batches of 16: 40 steps per epoch, 120 in all. (A step takes well
# under a millisecond: the epoch is long so that the signal, sent once the test has seen a
# save, lands inside the epoch it was meant for.)
RUN = ["--limit-train", "672", "--val-size", "32", "--limit-test", "64", "--batch-size", "16"]
RUN += ["--epochs", "3", "--seed", "3"]
STEPS_PER_EPOCH = 40


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's metrics, per worker count (computed once each)."""
    cache: dict[int, list[dict]] = {}

    def get(workers: int) -> list[dict]:
        if workers not in cache:
            out = tmp_path_factory.mktemp(f"reference{workers}")
            done = run_train(*RUN, "--workers", str(workers), "--out", str(out))
            assert done.returncode == 0, done.stderr
            cache[workers] = metrics(out / "metrics.jsonl")
            assert len(cache[workers]) == 3
        return cache[workers]

    return get


def _step(path):
    try:
        return load_checkpoint(path)[2]["step"]
    except CheckpointError:  # not there yet
        return -1


# Where the signal lands: right after the periodic save (--save-every N) at step 4 (early in
# epoch 1), 40 (epoch 1's last batch: during its evaluation, or just after) or 42 (early in
# epoch 2). The test sees that save once it is complete, so the run reads the signal after the
# next step at the earliest: at 4 and 42 it stops at a step with no periodic save, which it
# saves itself.
END = STEPS_PER_EPOCH
EVERY = {4: 4, END: 4, END + 2: END + 2}
TERM, INT = signal.SIGTERM, signal.SIGINT
# Every point with each signal and each worker count, in 8 runs rather than all 12.
CASES = [(TERM, 1, 4), (TERM, 1, END), (TERM, 1, END + 2), (TERM, 2, 4), (TERM, 2, END + 2)]
CASES += [(INT, 1, END + 2), (INT, 2, 4), (INT, 2, END)]


@needs_mnist
@pytest.mark.parametrize(
    "signum, workers, point",
    CASES,
    ids=[f"{signal.Signals(s).name}-workers{w}-step{p}" for s, w, p in CASES],
)
def test_signal_saves_mid_epoch_and_resume_is_exact(tmp_path, reference, signum, workers, point):
    expected = reference(workers)
    out = tmp_path / "run"
    every = ["--save-every", str(EVERY[point])]
    cmd = train_cmd(*RUN, *every, "--workers", str(workers), "--out", str(out))
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        reached = wait_until(lambda: _step(out / "last.npz") >= point, proc)
        assert reached, f"the run ended before step {point}: {proc.communicate()[1]}"
        sent = time.monotonic()
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)  # a terminal's Ctrl-C: the whole group, workers too
        else:
            os.kill(proc.pid, signum)  # docker stop: the main process only
        _, err = proc.communicate(timeout=60)
        seconds = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err
    assert seconds < 5, f"took {seconds:.1f}s to stop (docker kills after 10s)"
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"lenet_xp.train: stopped by {name} ") and "resume with --resume" in err

    meta = load_checkpoint(out / "last.npz")[2]
    assert meta["step"] >= point and f"step {meta['step']}" in err
    position = meta.get("mid_epoch")
    if position is None:  # it evaluated an epoch, saved its end, stopped: at END the rule; else
        # the signal came late (the test saw the save late, on a busy machine)
        epochs, rest = divmod(meta["step"], STEPS_PER_EPOCH)
        assert rest == 0 and f"after epoch {epochs} (step {meta['step']})" in err, meta
    else:  # the signal's own save, inside the epoch (at END: the test saw epoch 1's end first)
        # (on a busy machine the run may stop exactly on a later periodic save's step)
        epoch, batch = position["epoch"], position["batch"]
        assert f"(epoch {epoch}, batch {batch} of {STEPS_PER_EPOCH})" in err
        assert meta["step"] == (epoch - 1) * STEPS_PER_EPOCH + batch
    assert temp_files(out) == []

    # No --out: a resumed run writes where its checkpoint is.
    resumed = run_train("--resume", str(out / "last.npz"))
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(out / "metrics.jsonl") == expected


@needs_mnist
@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resumed"])
def test_a_signal_while_starting_stops_before_the_first_step(tmp_path, resume):
    """A SIGTERM while the run is still starting (loading data) is acted on before the first
    step: one line, exit 143, nothing written; a resumed run's checkpoint is left as it was."""
    flags = [*RUN, "--workers", "1", "--out", str(tmp_path)]
    checkpoint = tmp_path / "epoch_001.npz"
    if resume:
        assert run_train(*flags, "--keep-every-epoch").returncode == 0
        before = checkpoint.read_bytes()
        flags += ["--resume", str(checkpoint)]
    proc = subprocess.Popen(train_cmd(*flags), stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".train.lock"  # written once the signal handlers are in place
    assert wait_until(lambda: lock.exists() and lock.read_text().strip() == str(proc.pid), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.count("\n") == 1, err
    assert err.startswith("lenet_xp.train: stopped by SIGTERM before training started; ")
    if resume:
        assert f"resume with --resume {checkpoint}" in err
        assert checkpoint.read_bytes() == before
    else:
        assert "nothing was saved" in err and not (tmp_path / "last.npz").exists()


def _gpu_cmd() -> list[str]:
    return [sys.executable, "-m", "lenet_xp.train", "--device", "cuda", "--data-dir", str(DATA)]


@needs_mnist
@needs_cuda
@pytest.mark.parametrize("engine", ["layers", "graph"])
def test_mid_epoch_resume_on_a_gpu_matches_to_rounding(tmp_path, engine):
    """The array-op layers, eager or captured as a CUDA graph (``--engine graph``), stop on
    SIGTERM after a step, save mid-epoch and resume there as on the CPU; GPU sums are not
    bit-reproducible, so the metrics must agree to rounding."""
    flags = [*RUN, "--quiet", "--engine", engine]
    reference = subprocess.run(
        [*_gpu_cmd(), *flags, "--out", str(tmp_path / "ref")], capture_output=True, text=True
    )
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [*_gpu_cmd(), *flags, "--save-every", "4", "--out", str(out)], stderr=subprocess.PIPE
    )
    assert wait_until(lambda: _step(out / "last.npz") >= 4, proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert load_checkpoint(out / "last.npz")[2]["mid_epoch"] is not None
    resumed = subprocess.run(
        [*_gpu_cmd(), "--quiet", "--engine", engine, "--resume", str(out / "last.npz")],
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    expected = metrics(tmp_path / "ref" / "metrics.jsonl")
    for got, want in zip(metrics(out / "metrics.jsonl"), expected, strict=True):
        assert got.keys() == want.keys()
        numbers = {k for k, v in want.items() if isinstance(v, float)}
        assert {k: got[k] for k in want.keys() - numbers} == {
            k: want[k] for k in want.keys() - numbers
        }
        assert {k: got[k] for k in numbers} == pytest.approx(
            {k: want[k] for k in numbers}, rel=1e-5
        )
