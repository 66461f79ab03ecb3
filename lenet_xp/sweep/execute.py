"""Train one run of a sweep: ``python -m lenet_xp.train`` in a child process, in the run's
folder, resumed from its ``last.npz`` if it has one.

The same function runs in a thread of the local pool and in a Ray task on any node (the
sweep's folder is then on a path every node shares). It stops its child with SIGTERM (the
child saves ``last.npz`` and exits) when asked: ``stop()`` turns true (the sweep got a
signal) or the run's folder gets a ``stopped.json`` (early stopping: :mod:`.asha`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lenet_xp.storage.checkpoint import atomic_write

#: Written into a run's folder by the sweep before each attempt: its flags, seed, where it ran.
RUN_FILE = "run.json"
#: Written into a run's folder to stop it for good (early stopping); the sweep never resumes it.
STOP_FILE = "stopped.json"
#: The child's stderr, kept in the run's folder (its last line is a failed run's error).
LOG_FILE = "train.log"
POLL_SECONDS = 0.2
#: A child still running this long after SIGTERM is killed (it saves within a step).
TERM_GRACE_SECONDS = 60.0


@dataclass(frozen=True)
class Task:
    """Everything one attempt at a run needs (picklable, for Ray): its ``folder``, the run's
    train ``flags`` and ``seed``, the ``device`` to train on, ``extra`` flags that size it to
    its share of the machine (``--workers``) and ``env`` (BLAS threads,
    ``CUDA_VISIBLE_DEVICES``)."""

    folder: str
    flags: tuple[str, ...]
    seed: int
    device: str
    extra: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended: the child's exit status (``None``: it never started), the last
    line of its stderr when it failed, the host it ran on and whether it resumed."""

    status: int | None
    error: str
    host: str
    resumed: bool


def train_run(task: Task, stop: Callable[[], bool] = lambda: False) -> Outcome:
    """Train ``task`` to its end (or until asked to stop); never raises for a failed run."""
    folder = Path(task.folder)
    folder.mkdir(parents=True, exist_ok=True)
    last = folder / "last.npz"
    resumed = last.exists()
    argv = [*task.flags, *task.extra, "--seed", str(task.seed), "--device", task.device]
    argv += ["--quiet", "--out", str(folder)]
    if resumed:
        argv += ["--resume", str(last)]
    host = socket.gethostname()
    record = {"flags": list(task.flags), "seed": task.seed, "host": host, "device": task.device,
              "gpu": task.env.get("CUDA_VISIBLE_DEVICES", ""), "started": time.time()}  # fmt: skip
    _write_json(folder / RUN_FILE, record)
    cmd = [sys.executable, "-m", "lenet_xp.train", *argv]
    with open(folder / LOG_FILE, "ab") as log:
        log_start = log.tell()  # this attempt's lines start here
        try:
            child = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                env={**os.environ, **task.env}, start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            return Outcome(None, f"cannot start {sys.executable}: {exc}", host, resumed)
        stopped = False  # whether the sweep asked the child to stop

        def stop_asked() -> bool:
            nonlocal stopped
            stopped = stopped or stop() or (folder / STOP_FILE).exists()
            return stopped

        try:
            status = _wait(child, stop_asked)
        except BaseException:  # Ray cancelled the task (KeyboardInterrupt): save, then go
            _terminate(child)
            raise
    error = ""
    if status != 0:
        error = _last_line(folder / LOG_FILE, log_start) or f"exit status {status}"
    record.update(status=status, error=error, stopped=stopped, ended=time.time())
    _write_json(folder / RUN_FILE, record)
    return Outcome(status, error, host, resumed)


def _wait(child: subprocess.Popen, stop: Callable[[], bool]) -> int:
    """The child's exit status; SIGTERM once ``stop()`` is true (it saves and exits)."""
    while True:
        try:
            return child.wait(timeout=POLL_SECONDS)
        except subprocess.TimeoutExpired:
            if stop():
                return _terminate(child)


def _terminate(child: subprocess.Popen) -> int:
    """SIGTERM ``child``, which saves ``last.npz`` and exits; SIGKILL if it does not."""
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
    try:
        return child.wait(timeout=TERM_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        return child.wait()


def _last_line(path: Path, start: int) -> str:
    """The last non-empty line of ``path`` from byte ``start`` on (a traceback's last line
    is its message)."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


def _write_json(path: Path, record: dict) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(record, indent=1).encode()), mode=0o644)


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or ``None`` when it is missing or unreadable."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_stop(folder: Path, record: dict) -> None:
    """Stop the run in ``folder`` for good (its :func:`train_run` sees the file)."""
    _write_json(folder / STOP_FILE, record)
