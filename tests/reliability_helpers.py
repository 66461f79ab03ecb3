"""What the reliability tests share: a tiny real training run through the CLI, its metrics
(timing fields aside), and waiting on a live training process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from conftest import DATA

#: Wall-clock fields: the only ones a resumed run may change.
TIMINGS = {"train_seconds", "images_per_second"}


def train_cmd(*flags: str, data: Path = DATA) -> list[str]:
    """The real CLI on the CPU, quiet, reading MNIST from ``data``."""
    cmd = [sys.executable, "-m", "lenet_xp.train", "--device", "cpu", "--data-dir", str(data)]
    return cmd + ["--quiet", *flags]


def run_train(*flags: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(*flags), capture_output=True, text=True, timeout=timeout)


def metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl without their timing fields."""
    lines = Path(path).read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Poll ``condition`` until it holds (``True``) or ``proc`` ends (``False``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise TimeoutError("the training process made no progress")


def temp_files(folder: Path) -> list[str]:
    """The temp files of interrupted writes (checkpoints, metrics) in ``folder``."""
    return sorted(p.name for p in folder.glob(".*.tmp"))
