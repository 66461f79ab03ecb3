"""MPI data-parallel training through the real CLI under ``mpiexec`` (the ``mpi`` extra: mpi4py
and the MPICH wheel): 2 and 4 ranks train the single process's run (float64, to 1e-9; float32,
to rounding); SIGTERM
to one rank stops all at one step, rank 0 saves, and resuming (with 2 ranks, or 1 process) ends
with the uninterrupted run's metrics; ``kill -9`` of one rank ends the job within seconds with
the last checkpoint intact; a mismatched launch is one line. On two GPUs (or the CuPy
stand-in's two, ``LENET_XP_FAKE_CUDA=2``): one rank per GPU, the all-reduce through NCCL."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DATA, needs_mnist, needs_two_gpus
from reliability_helpers import metrics, train_cmd, wait_until

from lenet_xp.storage.checkpoint import CheckpointError, load_checkpoint
from lenet_xp.training.distributed.comm import FINISH_GRACE_S
from lenet_xp.training.runlock import RunLock

MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
try:
    import mpi4py  # noqa: F401
except ImportError:
    MPIEXEC = None
pytestmark = [
    needs_mnist,
    pytest.mark.skipif(MPIEXEC is None, reason='no MPI: pip install "lenet_xp[mpi]"'),
]

# 448 training images in global batches of 16: 28 steps per epoch.
RUN = ["--limit-train", "480", "--val-size", "32", "--limit-test", "96", "--batch-size", "16"]
RUN += ["--epochs", "2", "--seed", "5", "--dtype", "float64", "--stats-every", "0"]
STEPS_PER_EPOCH = 28


def mpi_cmd(ranks: int, *flags: str) -> list[str]:
    return [MPIEXEC, "-n", str(ranks), *train_cmd(*flags)]


def run_ranks(ranks: int, *flags: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(mpi_cmd(ranks, *flags), capture_output=True, text=True, timeout=timeout)


def same_run(got: list[dict], expected: list[dict], tol: float = 1e-9) -> None:
    """The records agree to ``tol`` (numbers), exactly otherwise; ``ranks`` aside."""
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected, strict=True):
        mine, theirs = ({k: v for k, v in r.items() if k != "ranks"} for r in (mine, theirs))
        assert mine.keys() == theirs.keys()
        for key, value in mine.items():
            if isinstance(value, float):
                assert math.isclose(value, theirs[key], rel_tol=tol, abs_tol=tol), key
            else:
                assert value == theirs[key], key


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> list[dict]:
    """The run in one process (one worker): what every rank count must reproduce."""
    out = tmp_path_factory.mktemp("single")
    done = subprocess.run(
        train_cmd(*RUN, "--workers", "1", "--out", str(out)), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return metrics(out / "metrics.jsonl")


@pytest.mark.parametrize("ranks", [2, 4])
def test_ranks_train_the_single_process_run(single, tmp_path, ranks):
    done = run_ranks(ranks, *RUN, "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    records = metrics(tmp_path / "metrics.jsonl")
    assert [r["ranks"] for r in records] == [ranks, ranks]
    same_run(records, single)
    # rank 0 alone wrote: one metrics file, the checkpoints, no other rank's files
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".train.lock", "best.npz", "last.npz", "metrics.csv", "metrics.jsonl",
    ]  # fmt: skip


def test_float32_ranks_train_the_single_process_run_to_rounding(tmp_path):
    """In float32 the ranks sum their slices' gradients in another order than one process
    does: the same run to float32 rounding (losses to 1e-5 relative after 56 steps, measured
    at about 1e-7), accuracies exactly."""
    run32 = ["float32" if flag == "float64" else flag for flag in RUN]
    alone = subprocess.run(
        train_cmd(*run32, "--workers", "1", "--out", str(tmp_path / "alone")),
        capture_output=True, text=True,
    )  # fmt: skip
    assert alone.returncode == 0, alone.stderr
    done = run_ranks(2, *run32, "--out", str(tmp_path / "ranks"))
    assert done.returncode == 0, done.stderr
    same_run(
        metrics(tmp_path / "ranks" / "metrics.jsonl"),
        metrics(tmp_path / "alone" / "metrics.jsonl"),
        1e-5,
    )


def _step(path: Path) -> int:
    try:
        return load_checkpoint(path)[2]["step"]
    except (CheckpointError, OSError):  # not there yet
        return -1


def _start_tagged(ranks: int, *flags: str) -> tuple[subprocess.Popen, dict[int, int]]:
    """``mpiexec`` and its ranks' pids (found by a tag in their environment)."""
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, "LENET_XP_TEST_JOB": tag}
    proc = subprocess.Popen(
        mpi_cmd(ranks, *flags), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = {}
        for entry in Path("/proc").iterdir():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"LENET_XP_TEST_JOB={tag}".encode() not in environ:
                continue
            if not (entry / "cmdline").read_bytes().startswith(sys.executable.encode()):
                continue
            rank = next((v for v in environ if v.startswith(b"PMI_RANK=")), None)
            if rank is not None:
                pids[int(rank.split(b"=")[1])] = int(entry.name)
        if len(pids) == ranks:
            return proc, pids
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise TimeoutError("mpiexec did not start its ranks")


@pytest.mark.parametrize("resume_ranks", [2, 1])
def test_sigterm_to_one_rank_stops_all_then_resume_is_exact(single, tmp_path, resume_ranks):
    out = tmp_path / "run"
    # a save every 2 steps keeps the run from reaching epoch 1's end (step 28) before the
    # signal, sent once the test has seen step 6's save, lands
    proc, pids = _start_tagged(2, *RUN, "--out", str(out), "--save-every", "2")
    try:
        assert wait_until(lambda: _step(out / "last.npz") >= 6, proc), proc.communicate()
        os.kill(pids[1], signal.SIGTERM)  # rank 1 only: the flag in the step's all-reduce
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("lenet_xp.train")]
    assert len(lines) == 1 and "stopped by SIGTERM at step" in lines[0], stderr
    meta = load_checkpoint(out / "last.npz")[2]
    assert meta["mid_epoch"] is not None and meta["step"] > 6
    assert f"at step {meta['step']} " in lines[0]
    if resume_ranks == 1:
        cmd = train_cmd("--resume", str(out / "last.npz"))  # the run's --workers: 1 process
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    else:
        done = run_ranks(2, "--resume", str(out / "last.npz"))
    assert done.returncode == 0, done.stderr
    same_run(metrics(out / "metrics.jsonl"), single)


def _alive(pid: int) -> bool:
    try:
        return " Z " not in Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone
        return False


def _signal_rank_1_mid_run(out: Path, signum: int) -> tuple[int, dict[int, int], str, str, float]:
    """Two ranks on a 20-epoch run saving every 5 steps into ``out``; once a checkpoint of
    step 5 or later is there, ``signum`` to rank 1 and wait (at most 60 s) for ``mpiexec``
    to end (it is killed with its ranks if it has not). ``(mpiexec's exit status, the ranks'
    pids by rank, its stdout, its stderr, seconds from the signal to its end)``."""
    flags = [*RUN[:-8], "--epochs", "20", "--dtype", "float64", "--stats-every", "0"]
    proc, pids = _start_tagged(2, *flags, "--out", str(out), "--save-every", "5")
    try:
        assert wait_until(lambda: _step(out / "last.npz") >= 5, proc), proc.communicate()
        os.kill(pids[1], signum)
        signalled = time.monotonic()
        stdout, stderr = proc.communicate(timeout=60)
        return proc.returncode, pids, stdout, stderr, time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_kill9_of_one_rank_ends_the_job_and_keeps_the_checkpoint(tmp_path):
    status, pids, stdout, stderr, seconds = _signal_rank_1_mid_run(tmp_path, signal.SIGKILL)
    assert seconds < 30
    assert status != 0
    said = stdout + stderr  # MPICH's mpiexec says it on its stdout
    assert f"PID {pids[1]}" in said and "signal 9" in said, said
    assert not any(_alive(pid) for pid in pids.values())  # no rank left behind
    assert load_checkpoint(tmp_path / "last.npz")[2]["step"] >= 5  # intact, loadable


def test_a_stopped_rank_ends_the_job_after_the_collective_timeout(tmp_path, monkeypatch):
    """``kill -STOP`` of one rank (as a hung rank or a node lost without a word): the other
    waits ``LENET_XP_COLLECTIVE_TIMEOUT`` seconds in the step's all-reduce, says so in one
    line, and ends the job; no rank is left behind and the last checkpoint is intact."""
    monkeypatch.setenv("LENET_XP_COLLECTIVE_TIMEOUT", "3")
    status, pids, stdout, stderr, seconds = _signal_rank_1_mid_run(tmp_path, signal.SIGSTOP)
    said = f"{pids}\n{stdout}\n{stderr}"
    assert 2 < seconds < 30, said  # its wait may start just before the stop
    assert status != 0, said
    lines = [line for line in stderr.splitlines() if line.startswith("lenet_xp.train")]
    assert len(lines) == 1 and "rank 0 waited 3 s for the other ranks' step" in lines[0], said
    # no rank left behind: the stopped one, continued by the launcher, ends within its own wait
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids.values())
    assert load_checkpoint(tmp_path / "last.npz")[2]["step"] >= 5  # intact, loadable


def test_a_collective_timeout_that_is_not_a_number_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("LENET_XP_COLLECTIVE_TIMEOUT", "soon")
    done = run_ranks(2, *RUN, "--out", str(tmp_path), timeout=120)
    assert done.returncode == 1
    assert "LENET_XP_COLLECTIVE_TIMEOUT='soon' is not a number of seconds" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_batch_smaller_than_the_ranks_is_one_line(tmp_path):
    done = run_ranks(2, *RUN[:6], "--batch-size", "1", "--out", str(tmp_path), timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines == [
        "lenet_xp.train: error: --batch-size 1 is the global batch, split over 2 ranks: "
        "it must be at least 2 (or launch fewer ranks)"
    ]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_ranks_launched_with_other_flags_is_one_line(tmp_path):
    first = train_cmd(*RUN, "--out", str(tmp_path))
    cmd = [MPIEXEC, "-n", "1", *first, "--lr", "0.01", ":", "-n", "1", *first, "--lr", "0.02"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "lenet_xp.train: error: rank 1 was launched with other flags than rank 0 (lr: 0.01 on "
        "rank 0, 0.02 there): start every rank with the same command and environment"
    ]


#: Under mpiexec -n 2: rank 1 changes one weight, then both ranks compare their parameters.
DIVERGED = """
import sys
from lenet_xp.backend import get_device
from lenet_xp.training.distributed.comm import DistributedError, world
from lenet_xp.training.distributed.engine import AgreedStop, RankParallel
from lenet_xp.training.interrupt import StopSignals
from lenet_xp.models.presets import build_from_config

ranks = world()
model = build_from_config({"arch": "lenet5", "seed": 0, "dtype": "float64"}).to(get_device("cpu"))
runner = RankParallel(ranks, model, 1, 16, StopSignals(), AgreedStop())
runner.agree_stop(1)  # the same weights: passes
if ranks.rank == 1 and sys.argv[1] == "perturb":
    model.parameters()[0].data[0, 0, 0, 0] += 1e-12
try:
    runner.agree_stop(2)
except DistributedError as exc:
    print(f"rank {ranks.rank}: {exc}")
runner.close()
"""


@pytest.mark.parametrize("perturb", [False, True])
def test_ranks_holding_other_parameters_are_found(perturb):
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-c", DIVERGED, "perturb" if perturb else "no"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    why = "rank 1's parameters differ from rank 0's before epoch 2"
    # both ranks say it (their lines may interleave in mpiexec's output), or neither does
    assert done.stdout.count(why) == (2 if perturb else 0), done.stdout


#: Under mpiexec -n 2: each rank's first dropout layer draws a mask; rank 0 prints whether
#: the two ranks' masks are the same.
MASKS = """
import numpy as np
from lenet_xp.backend import get_device
from lenet_xp.layers import Dropout
from lenet_xp.models.presets import build_from_config
from lenet_xp.training.distributed.comm import world
from lenet_xp.training.distributed.engine import AgreedStop, RankParallel
from lenet_xp.training.interrupt import StopSignals

ranks = world()
config = {"arch": "lenet5", "seed": 0, "dtype": "float64", "dropout": 0.5}
model = build_from_config(config).to(get_device("cpu"))
runner = RankParallel(ranks, model, 1, 16, StopSignals(), AgreedStop())
drop = next(layer for layer in model.modules() if isinstance(layer, Dropout))
masks = ranks.allgather(drop.forward(np.ones((8, 84))) > 0)
if ranks.rank == 0:
    print("same" if (masks[0] == masks[1]).all() else "differ", masks[0].mean())
runner.close()
"""


def test_the_ranks_draw_their_own_dropout_masks():
    """Every rank holds the same seed; rank 1 forks its dropout stream (it drew rank 0's
    masks for its own slice: every slice's image ``i`` lost the same units)."""
    done = subprocess.run(
        [MPIEXEC, "-n", "2", sys.executable, "-c", MASKS], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    verdict, kept = done.stdout.split()
    assert verdict == "differ" and 0.3 < float(kept) < 0.7, done.stdout


def test_an_out_in_use_stops_every_rank_with_one_line(tmp_path):
    with RunLock(tmp_path):  # another run holds --out
        started = time.monotonic()
        done = run_ranks(2, *RUN, "--out", str(tmp_path), timeout=120)
        assert time.monotonic() - started < FINISH_GRACE_S  # not by the end's abort
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"lenet_xp.train: error: --out {tmp_path} is in use by another training run "
        f"(pid {os.getpid()}); wait for it to finish, stop it, or choose another --out"
    ]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_resumed_over_ranks_a_gone_data_folder_is_said_once(tmp_path):
    """A run trained on a folder since removed, resumed over 2 ranks without --data-dir:
    rank 0 alone says where it reads instead ($LENET_XP_DATA), and the run goes on."""
    copy = tmp_path / "mnist"
    shutil.copytree(DATA, copy)
    out = tmp_path / "run"
    one = subprocess.run(train_cmd(*RUN, "--epochs", "1", "--out", str(out), data=copy))
    assert one.returncode == 0
    shutil.rmtree(copy)
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "lenet_xp.train", "--device", "cpu"]
    cmd += ["--quiet", "--resume", str(out / "last.npz"), "--epochs", "2"]
    env = {**os.environ, "LENET_XP_DATA": str(DATA)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    note = f"note: {copy}, the MNIST folder this run was trained on, is gone; reading "
    assert done.stderr.count(note) == 1, done.stderr
    assert [r["epoch"] for r in metrics(out / "metrics.jsonl")] == [1, 2]


@needs_two_gpus
def test_two_gpu_ranks_train_the_single_gpu_run(tmp_path):
    """One rank per GPU (cuda:0, cuda:1 by local rank), the all-reduce through NCCL (on the
    stand-in: its communicator, over MPI): the single-GPU run's metrics."""
    on_gpu = [*RUN, "--device", "cuda", "--no-cuda-kernels", "--no-cuda-graph"]
    cmd = train_cmd(*on_gpu, "--out", str(tmp_path / "one"))
    alone = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr
    done = run_ranks(2, *on_gpu, "--out", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr
    records = metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["device"] for r in records] == ["cuda:0", "cuda:0"]  # rank 0's
    same_run(records, metrics(tmp_path / "one" / "metrics.jsonl"), tol=1e-7)


@needs_two_gpus
@pytest.mark.parametrize("engine", ["graph", "kernels"])
def test_two_gpu_ranks_train_the_single_gpu_run_of_the_graph_engine(tmp_path, engine):
    """``--engine graph`` over two GPU ranks: each captures its slice's two halves of the
    step around the NCCL all-reduce; the metrics are the single-GPU graph run's, an epoch's
    short last batch included (--limit-train 476: 444 = 27 * 16 + 12 training images)."""
    flags = [*RUN[:1], "476", *RUN[2:], "--device", "cuda", "--engine", engine]
    alone = subprocess.run(
        train_cmd(*flags, "--out", str(tmp_path / "one")), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert alone.returncode == 0, alone.stderr
    done = run_ranks(2, *flags, "--out", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr
    assert "note:" not in done.stderr, done.stderr  # no fallback to the layers
    records = metrics(tmp_path / "two" / "metrics.jsonl")
    expected = metrics(tmp_path / "one" / "metrics.jsonl")
    assert [r["engine"] for r in records] == [engine, engine]
    same_run(records, expected, tol=1e-9)


@needs_two_gpus
def test_sigterm_to_one_gpu_rank_of_the_graph_engine_stops_all_then_resume_is_exact(tmp_path):
    """The graph engine's ranks read their summed stop requests every ``READ_EVERY`` (50)
    steps: SIGTERM to rank 1 during epoch 2 (steps 29-56) stops both at step 50, mid-epoch,
    with a checkpoint from which two ranks finish the uninterrupted run."""
    from lenet_xp.training.distributed.graph import READ_EVERY

    flags = [
        ("3" if flag == "2" and RUN[i - 1] == "--epochs" else flag) for i, flag in enumerate(RUN)
    ]
    flags += ["--device", "cuda", "--engine", "graph"]
    whole = run_ranks(2, *flags, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "run"
    proc, pids = _start_tagged(2, *flags, "--out", str(out), "--save-every", "6")
    try:
        assert wait_until(lambda: _step(out / "last.npz") >= 30, proc), proc.communicate()
        os.kill(pids[1], signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, stderr
    meta = load_checkpoint(out / "last.npz")[2]
    assert meta["step"] == READ_EVERY and meta["mid_epoch"]["batch"] == 50 - STEPS_PER_EPOCH
    assert f"stopped by SIGTERM at step {READ_EVERY} (epoch 2, batch 22 " in stderr, stderr
    done = run_ranks(2, "--resume", str(out / "last.npz"), *flags[-4:])
    assert done.returncode == 0, done.stderr
    same_run(metrics(out / "metrics.jsonl"), metrics(tmp_path / "whole" / "metrics.jsonl"))


def test_the_one_mechanism_bench_runs_and_prints_its_table(capsys):
    """``python -m lenet_xp.training.distributed.bench`` (tiny): one process, two workers and
    two ranks train, and it prints each median and the ratios."""
    from lenet_xp.training.distributed import bench

    args = ["--rounds", "1", "--limit-train", "512", "--batch-size", "64"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    for name in ("one", "workers", "mpi"):
        line = next(line for line in out.splitlines() if line.strip().startswith(f"{name}:"))
        assert float(line.split("median")[1].split()[0].replace(",", "")) > 0
    assert "mpi / workers:" in out and "speed-up over one process: workers" in out
