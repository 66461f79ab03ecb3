"""Resuming with another ``--epochs``: a finished run trains the extra epochs, its schedule
planned over the new total; a resume with nothing left says so; any other change to the
run's configuration is one line."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest
from conftest import DATA, needs_cuda, needs_mnist
from reliability_helpers import metrics, train_cmd, wait_until

from lenet_xp import train as train_cli
from lenet_xp.optim.schedules import make_schedule
from lenet_xp.storage.checkpoint import CheckpointError, load_checkpoint

# 192 training images in batches of 16: 12 steps per epoch.
RUN = ["--limit-train", "224", "--val-size", "32", "--limit-test", "64", "--batch-size", "16"]
RUN += ["--workers", "1", "--seed", "3"]
SMALL = ["--device", "cpu", "--data-dir", str(DATA), "--quiet", *RUN]
STEPS_PER_EPOCH = 12


def _resume(checkpoint, *flags: str) -> int:
    """``train --resume checkpoint`` (not quiet: its notes are what is tested)."""
    return train_cli.main(
        ["--resume", str(checkpoint), "--device", "cpu", "--data-dir", str(DATA), *flags]
    )


@needs_mnist
def test_resuming_a_finished_run_with_more_epochs_trains_them(tmp_path, capsys):
    """With a schedule that does not depend on the total, 1 epoch then 1 more is exactly a
    2-epoch run; the checkpoint then plans 2 epochs."""
    constant = [*SMALL, "--schedule", "constant"]
    assert train_cli.main([*constant, "--epochs", "2", "--out", str(tmp_path / "straight")]) == 0
    assert train_cli.main([*constant, "--epochs", "1", "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    last = tmp_path / "run" / "last.npz"
    assert _resume(last, "--epochs", "2") == 0
    err = capsys.readouterr().err
    assert (
        "note: --epochs 2 (the checkpoint's run planned 1, 1 done): the constant learning-rate "
        "schedule is planned over 2 epochs, as if the run had asked for them from the start; "
        "it goes on from step 12 at lr 2.00e-03\n"
    ) in err
    assert metrics(tmp_path / "run" / "metrics.jsonl") == metrics(
        tmp_path / "straight" / "metrics.jsonl"
    )
    assert load_checkpoint(last)[2]["config"]["epochs"] == 2


@needs_mnist
def test_fit_with_more_epochs_continues_the_schedule_planned_over_the_new_total(tmp_path):
    options = {"device": "cpu", "data_dir": str(DATA), "quiet": True, "out": str(tmp_path)}
    options |= {"limit_train": 224, "val_size": 32, "limit_test": 64, "batch_size": 16}
    options |= {"workers": 1}
    assert train_cli.fit(epochs=2, **options)["epoch"] == 2
    record = train_cli.fit(epochs=3, resume=str(tmp_path / "last.npz"), **options)
    assert record["epoch"] == 3
    cosine = make_schedule("cosine", 2e-3, 3 * STEPS_PER_EPOCH, STEPS_PER_EPOCH)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lrs == [2e-3, make_schedule("cosine", 2e-3, 24, 12)(12), cosine(24)]


# A run that stops early: its learning rate too small for the validation accuracy to move.
EARLY = ["--epochs", "4", "--patience", "1", "--lr", "1e-9", "--schedule", "constant"]
NOTHING_LEFT = {  # first run's flags, the resume's flags, why there is nothing left
    "as-planned": (["--epochs", "1"], [], "it ended after epoch 1 of --epochs 1"),
    "fewer": (["--epochs", "2"], ["--epochs", "1"], "it ended after epoch 2 of --epochs 1"),
    "early-stop": (EARLY, [], "it stopped early after epoch 2, by --patience 1"),
}


@needs_mnist
@pytest.mark.parametrize("case", list(NOTHING_LEFT))
def test_a_resume_with_nothing_left_says_so_and_changes_nothing(tmp_path, capsys, case):
    first, again, why = NOTHING_LEFT[case]
    assert train_cli.main([*SMALL, *first, "--out", str(tmp_path)]) == 0
    last = tmp_path / "last.npz"
    before = last.read_bytes(), (tmp_path / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert _resume(last, *again) == 0
    out, err = capsys.readouterr()
    assert err.splitlines()[-1] == (
        f"lenet_xp.train: nothing to train: {last} is a finished run ({why}); to train more, "
        "resume with a larger --epochs"
    )
    assert "parameters" not in out  # no model summary: nothing was built
    assert (last.read_bytes(), (tmp_path / "metrics.jsonl").read_bytes()) == before


@needs_mnist
def test_changing_the_configuration_on_resume_is_one_line(tmp_path, capsys):
    assert train_cli.main([*SMALL, "--epochs", "1", "--out", str(tmp_path)]) == 0
    last = tmp_path / "last.npz"
    for flag, saved, value in [
        ("--batch-size", 16, "32"), ("--dtype", "float32", "float64"),
        ("--arch", "lenet5", "lenet5-classic"),
    ]:  # fmt: skip
        capsys.readouterr()
        assert _resume(last, "--epochs", "2", flag, value) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, err
        assert err == (
            f"lenet_xp.train: error: checkpoint {last} holds {flag} {saved}, not {flag} {value}: "
            "a resumed run keeps its configuration (only --epochs, --workers and --engine may "
            "change); drop "
            f"{flag}, or start a new run in another --out"
        )
    with pytest.raises(CheckpointError, match="holds --lr 0.002, not --lr 0.1"):
        train_cli.fit(resume=str(last), lr=0.1, device="cpu", data_dir=str(DATA), quiet=True)
    # The same values again are no change.
    assert _resume(last, "--quiet", "--epochs", "2", *RUN) == 0
    assert load_checkpoint(last)[2]["epoch"] == 2


@needs_mnist
def test_another_workers_on_resume_goes_on_to_rounding(tmp_path, capsys):
    """A run moved to a machine with other cores: ``--workers`` may change on resume, with a
    note; in float64 the run ends as the uninterrupted one to 1e-9 (the order of the gradient
    sums differs), and the checkpoint keeps the new value."""
    run64 = [*SMALL, "--dtype", "float64", "--schedule", "constant"]
    assert train_cli.main([*run64, "--epochs", "2", "--out", str(tmp_path / "straight")]) == 0
    assert train_cli.main([*run64, "--epochs", "1", "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    last = tmp_path / "run" / "last.npz"
    assert _resume(last, "--epochs", "2", "--workers", "2") == 0
    err = capsys.readouterr().err
    assert "note: --workers 2 (the checkpoint's run used 1): the same weights and optimizer" in err
    moved, straight = (metrics(tmp_path / d / "metrics.jsonl") for d in ("run", "straight"))
    assert moved[0] == straight[0] and moved[1].keys() == straight[1].keys()
    for key, value in moved[1].items():
        if isinstance(value, float):
            assert value == pytest.approx(straight[1][key], rel=1e-9, abs=1e-12), key
        else:
            assert value == straight[1][key], key
    assert load_checkpoint(last)[2]["config"]["workers"] == 2


@needs_mnist
def test_a_stop_inside_the_extra_epochs_resumes_them(tmp_path):
    """A mid-epoch checkpoint of an extended run plans the new total too: resumed without
    --epochs, it finishes them."""
    assert train_cli.main([*SMALL, "--epochs", "1", "--out", str(tmp_path)]) == 0
    last = tmp_path / "last.npz"
    # A save every 2 steps keeps the run from reaching epoch 2's end (step 24) before the
    # signal, sent once the test has seen step 14's save, lands.
    cmd = train_cmd("--resume", str(last), "--epochs", "5", "--save-every", "2")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert wait_until(lambda: load_checkpoint(last)[2]["step"] >= 14, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    meta = load_checkpoint(last)[2]
    assert meta["mid_epoch"] is not None and meta["config"]["epochs"] == 5
    assert (
        train_cli.main(
            ["--resume", str(last), "--device", "cpu", "--data-dir", str(DATA), "--quiet"]
        )
        == 0
    )
    assert [r["epoch"] for r in metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]


@needs_cuda
@needs_mnist
def test_a_resumed_run_keeps_its_engine_unless_given(tmp_path):
    """``--engine`` is kept in checkpoints: a resume without it runs the checkpoint's engine,
    one with it the engine given (which later resumes keep)."""
    run = ["--device", "cuda", "--data-dir", str(DATA), "--quiet", "--out", str(tmp_path)]
    run += ["--limit-train", "72", "--val-size", "8", "--limit-test", "16", "--batch-size", "16"]
    assert train_cli.main([*run, "--epochs", "1", "--engine", "graph"]) == 0
    last = tmp_path / "last.npz"
    gpu = ["--device", "cuda", "--quiet"]
    assert _resume_on(last, *gpu, "--epochs", "2") == 0
    assert _resume_on(last, *gpu, "--epochs", "3", "--engine", "layers") == 0
    assert _resume_on(last, *gpu, "--epochs", "4") == 0
    assert _resume_on(last, *gpu, "--epochs", "5", "--cuda-graph") == 0  # the old alias
    assert _resume_on(last, *gpu, "--epochs", "6", "--no-cuda-graph") == 0  # and its --no-
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    engines = [(r["epoch"], r["engine"]) for r in records if "engine" in r]
    assert engines == [
        (1, "graph"), (2, "graph"), (3, "layers"), (4, "layers"), (5, "graph"), (6, "layers"),
    ]  # fmt: skip
    assert load_checkpoint(last)[2]["config"]["engine"] == "layers"


def _resume_on(checkpoint, *flags: str) -> int:
    return train_cli.main(["--resume", str(checkpoint), "--data-dir", str(DATA), *flags])
