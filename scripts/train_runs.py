"""Shared by the README-table scripts: run ``python -m lenet_xp.train`` and read its metrics."""

import subprocess
import sys
from pathlib import Path

from lenet_xp.checkpoint import CheckpointError, load_checkpoint
from lenet_xp.stats import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def finished(out: Path) -> bool:
    """Whether ``out`` holds a run that trained all its epochs (or stopped early)."""
    try:
        meta = load_checkpoint(out / "last.npz")[2]
        records = read_jsonl(out / "metrics.jsonl")
    except (CheckpointError, OSError):
        return False
    done = bool(records) and records[-1]["epoch"] == meta["epoch"] and "mid_epoch" not in meta
    return done and (meta["epoch"] == meta["config"]["epochs"] or records[-1].get("stopped_early"))


def train_run(out: Path, flags: list[str], device: str = "cpu", reuse: bool = False) -> list[dict]:
    """Train with ``flags`` into ``out`` (quietly, from the repository root) and return its
    ``metrics.jsonl`` records; exits with the run's error line if it fails. ``reuse``: a run
    already :func:`finished` there is read, not trained again."""
    if reuse and finished(out):
        return read_jsonl(out / "metrics.jsonl")
    cmd = [sys.executable, "-m", "lenet_xp.train", "--device", device, "--quiet"]
    cmd += ["--out", str(out), *flags]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{out.name} ({' '.join(flags)}): {proc.stderr.strip()}")
    return read_jsonl(out / "metrics.jsonl")


def training_minutes(records: list[dict]) -> float:
    """Minutes of training (``train_seconds``; testing not counted) of a run's records."""
    return sum(r["train_seconds"] for r in records) / 60
