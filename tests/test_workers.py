"""Worker processes never hang a run, and never run the user's script.

A worker is ``kill -9``-ed exactly where :data:`lenet_xp.training.parallel.PAUSE_ENV` stopped it
(SIGSTOP: before or after it reads its set-up, at a training step's start, with its gradients
written but not reported, at the start of the next batch's augmentation grid): the run ends
within seconds with one line naming the worker and its signal, exit status 1, its last
checkpoint intact and its folder unlocked. SIGTERM stops a run whose worker does not answer.
``fit()`` works from a script with no ``if __name__ == "__main__":``, from a file or stdin.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DATA, needs_mnist
from reliability_helpers import temp_files, train_cmd, wait_until

from lenet_xp.storage.checkpoint import load_checkpoint
from lenet_xp.training.parallel import PAUSE_ENV, STOP_GRACE_S
from lenet_xp.training.runlock import RunLock

# 192 training images in batches of 16: 12 steps per epoch; last.npz every 4 steps.
RUN = ["--limit-train", "224", "--val-size", "32", "--limit-test", "64", "--batch-size", "16"]
RUN += ["--epochs", "3", "--seed", "3", "--workers", "2", "--save-every", "4"]
#: Generous on a loaded 2-core machine: a dead worker is seen at once (its socket closes).
BOUND_S = 10.0


def _stopped_child(pid: int) -> int | None:
    """A child process of ``pid`` stopped by a signal (state ``T``), if there is one."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # it ended meanwhile
            continue
        state, ppid = text[text.rindex(")") + 2 :].split()[:2]
        if int(ppid) == pid and state == "T":
            return int(stat.parent.name)
    return None


def _start(out: Path, pause: str, *flags: str) -> tuple[subprocess.Popen, int]:
    """The CLI training into ``out`` with worker 1 told to stop itself at ``pause``; returns
    once it has: ``(the run, the stopped worker's pid)``."""
    env = {**os.environ, PAUSE_ENV: pause}
    cmd = train_cmd(*RUN, *flags, "--out", str(out))
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    found: list[int] = []

    def stopped() -> bool:
        found[:] = [pid] if (pid := _stopped_child(proc.pid)) else []
        return bool(found)

    assert wait_until(stopped, proc), f"the run ended first: {proc.communicate()[1]}"
    return proc, found[0]


def _finish(proc: subprocess.Popen, since: float) -> tuple[str, float]:
    """The run's stderr and the seconds from ``since`` to its end (killed after a minute)."""
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return err, time.monotonic() - since


def _assert_kept(out: Path, err: str, step: int | None) -> None:
    """The run's last checkpoint is whole at ``step`` (``None``: nothing saved), the error
    says so, no temp file is left and ``out`` is free for the next run."""
    last = out / "last.npz"
    if step is None:
        assert not last.exists() and "nothing was saved" in err
    else:
        assert load_checkpoint(last)[2]["step"] == step  # checksum-valid, at the last save
        assert f"the last checkpoint is {last}; resume with --resume {last}" in err
    assert temp_files(out) == []
    with RunLock(out):  # the lock went with the run
        pass


STAGES = {  # pause: (the line's words, the last step saved)
    "boot:1": ("while starting", None),
    "start:1": ("while starting", None),
    "step:10": ("during a training step", 8),
    "handback:10": ("during a training step", 8),
    "prefetch:10": ("while computing the next batch's augmentation grid", 8),
}


@needs_mnist
@pytest.mark.parametrize("pause", list(STAGES))
def test_a_worker_killed_at_any_stage_ends_the_run_with_one_line(tmp_path, pause):
    doing, step = STAGES[pause]
    augment = ["--augment", "light"] if pause.startswith("prefetch") else []
    proc, worker = _start(tmp_path, pause, *augment)
    os.kill(worker, signal.SIGKILL)
    err, seconds = _finish(proc, time.monotonic())
    assert proc.returncode == 1, err
    assert seconds < BOUND_S, f"took {seconds:.1f}s to end after the worker died"
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(
        f"lenet_xp.train: error: worker process 1 (pid {worker}) was killed by SIGKILL "
        f"(out of memory, or kill -9) {doing}; "
    ), err
    _assert_kept(tmp_path, err, step)


@needs_mnist
@pytest.mark.parametrize(
    "pause, signum",
    [("boot:1", signal.SIGTERM), ("step:10", signal.SIGTERM), ("step:10", signal.SIGINT)],
)
def test_a_signal_stops_a_run_whose_worker_does_not_answer(tmp_path, pause, signum):
    """A worker stopped (hung) while starting or inside a step: SIGTERM or SIGINT still ends
    the run, :data:`STOP_GRACE_S` later, exit 143 / 130, the worker killed, the last
    checkpoint kept."""
    proc, worker = _start(tmp_path, pause)
    sent = time.monotonic()
    proc.send_signal(signum)
    err, seconds = _finish(proc, sent)
    assert proc.returncode == 128 + signum, err
    assert STOP_GRACE_S <= seconds < BOUND_S, f"took {seconds:.1f}s (docker kills after 10)"
    assert "Traceback" not in err and err.count("\n") == 1, err
    where = "while starting" if pause == "boot:1" else "in epoch 1"
    assert err.startswith(
        f"lenet_xp.train: stopped by {signal.Signals(signum).name} at once (worker process 1 "
        f"did not answer within {STOP_GRACE_S:g} s) {where}; "
    ), err
    with pytest.raises(ProcessLookupError):  # killed and reaped by the run
        os.kill(worker, 0)
    if pause == "boot:1":
        assert not (tmp_path / "last.npz").exists() and "nothing was saved" in err
    else:
        last = tmp_path / "last.npz"
        assert load_checkpoint(last)[2]["step"] == 8
        assert f"the last complete checkpoint is {last}; resume with --resume {last}" in err
    assert temp_files(tmp_path) == []


@needs_mnist
def test_sigterm_while_a_worker_is_dead(tmp_path):
    """The worker dies and SIGTERM arrives while the run is frozen (SIGSTOP), so the run
    wakes up to both: it ends at once with the worker's line."""
    proc, worker = _start(tmp_path, "step:10")
    os.kill(proc.pid, signal.SIGSTOP)
    os.kill(worker, signal.SIGKILL)
    proc.send_signal(signal.SIGTERM)
    woken = time.monotonic()
    os.kill(proc.pid, signal.SIGCONT)
    err, seconds = _finish(proc, woken)
    assert proc.returncode == 1 and seconds < BOUND_S, (seconds, err)
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert f"worker process 1 (pid {worker}) was killed by SIGKILL" in err
    _assert_kept(tmp_path, err, 8)


# The README's fit() example as a user pastes it: no `if __name__ == "__main__":`.
SCRIPT = """\
from lenet_xp.layers import Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential
from lenet_xp.train import fit

net = Sequential(
    [Conv2d(1, 8, 5, padding=2), MaxPool2d(2), ReLU(), Flatten(), Linear(8 * 14 * 14, 10)],
    input_shape=(1, 28, 28),
)
result = fit(net, epochs=1, out="runs/mine", {options})
print("trained epoch", result["epoch"])
"""
OPTIONS = f'limit_train=300, limit_test=50, workers=2, device="cpu", data_dir={str(DATA)!r}'


def _run_script(folder: Path, script: str, stdin: bool) -> subprocess.CompletedProcess:
    """``python mine.py`` (or ``python - < mine.py``) in ``folder``; a hang fails the test."""
    path = folder / "mine.py"
    path.write_text(script)
    cmd = [sys.executable, "-"] if stdin else [sys.executable, str(path)]
    with open(path) as source:
        proc = subprocess.Popen(
            cmd, cwd=folder, stdin=source if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()  # first alone: its resource tracker then frees its shared memory
            output = proc.communicate()
            time.sleep(1)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"{' '.join(cmd)} hung: {output}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@needs_mnist
@pytest.mark.parametrize("stdin", [False, True], ids=["file", "stdin"])
def test_fit_from_a_script_without_a_main_guard_trains_with_workers(tmp_path, stdin):
    done = _run_script(tmp_path, SCRIPT.format(options=OPTIONS), stdin)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "trained epoch 1"
    assert load_checkpoint(tmp_path / "runs/mine/last.npz")[2]["epoch"] == 1


# A layer class defined in the script itself: workers must import the script to rebuild it.
CUSTOM = """\
import numpy as np
from lenet_xp.layers import Flatten, Linear, ReLU, Sequential
from lenet_xp.train import fit


class Twice(ReLU):
    def forward(self, x):
        return 2 * super().forward(x)

    def backward(self, grad):
        return super().backward(2 * grad)


def train():
    net = Sequential([Flatten(), Linear(784, 10), Twice()], input_shape=(1, 28, 28))
    result = fit(net, epochs=1, out="runs/mine", {options})
    print("trained epoch", result["epoch"])

"""


@needs_mnist
@pytest.mark.parametrize("form", ["guarded", "unguarded", "stdin"])
def test_a_layer_class_of_the_script_trains_with_workers_or_names_the_fix(tmp_path, form):
    """Guarded, the script's own class reaches the workers (they import the script); else the
    run fails at once, with one line saying what to change."""
    call = 'if __name__ == "__main__":\n    train()\n' if form == "guarded" else "train()\n"
    started = time.monotonic()
    done = _run_script(tmp_path, CUSTOM.format(options=OPTIONS) + call, form == "stdin")
    if form == "guarded":
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[-1] == "trained epoch 1"
        return
    assert done.returncode == 1 and time.monotonic() - started < 60, done
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("lenet_xp.training.workers.WorkerError: "), done.stderr
    if form == "unguarded":
        assert "worker process 1 could not start: TrainingError: fit() ran in a worker" in last
        assert 'call fit() under `if __name__ == "__main__":`' in last
    else:
        assert "the model's Twice is defined in an interactive session or standard input" in last
        assert "define it in a .py file" in last and "--workers 1" in last
    assert not (tmp_path / "runs/mine/last.npz").exists()
