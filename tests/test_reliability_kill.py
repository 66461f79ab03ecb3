"""``kill -9`` at any instant: the real training process is killed at 24 moments, half of
them at random times, half the instant a checkpoint's temp file appears (so during a write).
After every kill there is one complete ``last.npz`` that loads and passes its checksum (the
old one or the new one, never a torn one); the next run deletes the temp files a kill left;
and resuming after all those kills ends with exactly the metrics of a run never killed."""

from __future__ import annotations

import os
import random
import subprocess
import time

from conftest import needs_mnist
from reliability_helpers import metrics, run_train, temp_files, train_cmd

from lenet_xp.storage.checkpoint import load_checkpoint

# 128 training images in batches of 16: 8 steps per epoch, 24 in all, each one saved (and
# best.npz and epoch_NNN.npz at epoch ends), so a random kill often lands in a write.
RUN = ["--limit-train", "160", "--val-size", "32", "--limit-test", "64", "--batch-size", "16"]
RUN += ["--epochs", "3", "--seed", "5", "--workers", "1", "--save-every", "1"]
RUN += ["--keep-every-epoch"]
KILLS = 24


def _kill_during_write(proc: subprocess.Popen, out) -> None:
    """Wait (busy) until a checkpoint temp file shows up in ``out``, then kill at once."""
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if any(e.name.endswith(".tmp") for e in os.scandir(out)):
                break
        except FileNotFoundError:  # --out not created yet
            pass
    proc.kill()


@needs_mnist
def test_kill_9_at_any_instant_then_resume_is_exact(tmp_path):
    started = time.monotonic()
    done = run_train(*RUN, "--out", str(tmp_path / "reference"))
    assert done.returncode == 0, done.stderr
    whole_run = time.monotonic() - started  # random kills land within such a span
    expected = metrics(tmp_path / "reference" / "metrics.jsonl")

    chance = random.Random(13)  # a fixed schedule of kill times: reproducible
    folder, kills, torn_writes, finished = 0, 0, 0, 0
    out, last_step, left_behind = tmp_path / "run0", -1, set()
    while kills < KILLS:
        resume = ["--resume", str(out / "last.npz")] if (out / "last.npz").exists() else []
        proc = subprocess.Popen(
            train_cmd(*RUN, *resume, "--out", str(out)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if kills % 2:
            _kill_during_write(proc, out)
        else:
            time.sleep(chance.uniform(0.05, 1.0) * whole_run)
            proc.kill()
        proc.wait(timeout=60)
        if proc.returncode == 0:  # it finished first: check it, then start again elsewhere
            assert metrics(out / "metrics.jsonl") == expected
            finished += 1
            folder += 1
            out, last_step, left_behind = tmp_path / f"run{folder}", -1, set()
            continue
        kills += 1
        if (out / "last.npz").exists():  # the old checkpoint or the new one, never torn
            meta = load_checkpoint(out / "last.npz")[2]  # raises on a torn or damaged file
            if meta["step"] > last_step:  # a run got to train: it removed the earlier temps
                assert not left_behind & set(temp_files(out)), left_behind
            assert meta["step"] >= last_step
            last_step = meta["step"]
        left_behind = set(temp_files(out))
        torn_writes += bool(left_behind)

    resume = ["--resume", str(out / "last.npz")] if (out / "last.npz").exists() else []
    done = run_train(*RUN, *resume, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert metrics(out / "metrics.jsonl") == expected
    assert temp_files(out) == []
    print(f"{KILLS} kills, {torn_writes} of them mid-write; {finished} runs finished first")
    assert torn_writes >= 3, f"only {torn_writes} of {KILLS} kills interrupted a write"
