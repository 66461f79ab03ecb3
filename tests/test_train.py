"""The training and evaluation CLIs on real MNIST subsets, plus every bad input."""

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, DEVICES, needs_mnist, needs_no_cuda  # test_plots, test_predict: too

from lenet_xp import evaluate as evaluate_cli
from lenet_xp import train as train_cli

SMALL = ["--device", "cpu", "--data-dir", str(DATA), "--quiet", "--limit-train", "2000"]
TIMINGS = {"train_seconds", "images_per_second"}


def read_metrics(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def without_timings(records):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


@needs_mnist
def test_cli_end_to_end_then_evaluate(tmp_path):
    """The real command in a subprocess: trains, writes metrics and checkpoints; evaluate agrees."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lenet_xp.train", "--device", "cpu", "--data-dir", str(DATA)]
    cmd += [
        "--epochs",
        "2",
        "--limit-train",
        "6000",
        "--out",
        str(out),
        "--metrics",
        str(out / "m.jsonl"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch")]
    assert len(lines) == 2 and "test_acc" in lines[-1]
    records = read_metrics(out / "m.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    expected_keys = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr"}
    assert expected_keys | TIMINGS | {"device"} <= set(records[0])
    assert records[-1]["test_acc"] > 0.9  # chance is 0.1
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert (out / "last.npz").exists() and (out / "best.npz").exists()

    ev = subprocess.run(
        [sys.executable, "-m", "lenet_xp.evaluate", "--checkpoint", str(out / "last.npz"),
         "--device", "cpu", "--data-dir", str(DATA), "--batch-size", "777"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    acc_line = next(line for line in ev.stdout.splitlines() if line.startswith("test_acc"))
    assert f"{100 * records[-1]['test_acc']:.2f}%" in acc_line
    matrix = [line.split()[1:] for line in ev.stdout.splitlines()[-10:]]
    assert sum(int(c) for row in matrix for c in row) == 10_000


@needs_mnist
def test_same_seed_same_metrics(tmp_path):
    runs = []
    for name in ("a", "b"):
        args = SMALL + ["--epochs", "2", "--seed", "7", "--out", str(tmp_path / name)]
        assert train_cli.main(args + ["--metrics", str(tmp_path / f"{name}.jsonl")]) == 0
        runs.append(without_timings(read_metrics(tmp_path / f"{name}.jsonl")))
    assert runs[0] == runs[1]
    other = SMALL + ["--epochs", "1", "--seed", "8", "--out", str(tmp_path / "c")]
    assert train_cli.main(other + ["--metrics", str(tmp_path / "c.jsonl")]) == 0
    assert without_timings(read_metrics(tmp_path / "c.jsonl"))[0] != runs[0][0]


@needs_mnist
def test_resume_matches_uninterrupted_run(tmp_path):
    base = SMALL + ["--epochs", "2", "--limit-test", "1000", "--keep-every-epoch"]
    assert (
        train_cli.main(
            base + ["--out", str(tmp_path / "straight"), "--metrics", str(tmp_path / "s.jsonl")]
        )
        == 0
    )
    # Resume from the checkpoint written after epoch 1, as if the run had stopped there.
    (tmp_path / "r.jsonl").write_text((tmp_path / "s.jsonl").read_text().splitlines()[0] + "\n")
    resume = ["--resume", str(tmp_path / "straight" / "epoch_001.npz"), "--device", "cpu"]
    resume += ["--data-dir", str(DATA), "--quiet", "--out", str(tmp_path / "resumed")]
    assert train_cli.main(resume + ["--metrics", str(tmp_path / "r.jsonl")]) == 0
    straight = without_timings(read_metrics(tmp_path / "s.jsonl"))
    resumed = without_timings(read_metrics(tmp_path / "r.jsonl"))
    assert resumed == straight and len(straight) == 2


@needs_mnist
def test_nan_loss_stops_with_one_line_and_keeps_checkpoint(tmp_path, capsys):
    args = SMALL + ["--epochs", "1", "--optimizer", "sgd", "--lr", "1e12", "--schedule", "constant"]
    assert train_cli.main(args + ["--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "loss became" in err and "--lr" in err
    assert not (tmp_path / "last.npz").exists()  # a diverged model is not saved over good weights


@needs_mnist
@pytest.mark.parametrize("device", DEVICES)
def test_confusion_matrix_equals_numpy_bincount(device):
    """The on-device count (no host sync per batch) gives exactly NumPy's bincount of
    ``true * 10 + predicted``, over batches that do not divide the set, for a model trained
    just enough to fill many cells."""
    from lenet_xp import LeNet5, loss_and_grads
    from lenet_xp.backend import asnumpy, get_device
    from lenet_xp.data.device_split import to_device_split
    from lenet_xp.data.mnist import load_mnist
    from lenet_xp.optim.optimizers import Adam

    dev = get_device(device)
    mnist = load_mnist(DATA, download=False)
    train = to_device_split(mnist.train_images[:2048], mnist.train_labels[:2048], dev)
    test = to_device_split(mnist.test_images[:3000], mnist.test_labels[:3000], dev)
    model = LeNet5(seed=0).to(dev)
    optimizer = Adam(model.parameters(), lr=2e-3)
    for x, y in train.batches(128):
        loss_and_grads(model, x, y)
        optimizer.step()

    loss, acc, confusion = evaluate_cli.evaluate(model, test, batch_size=777)
    predicted = np.concatenate(
        [asnumpy(model.forward(x).argmax(axis=1)) for x, _ in test.batches(777)]
    )
    true = asnumpy(test.labels)
    expected = np.bincount(true * 10 + predicted, minlength=100).reshape(10, 10)
    assert isinstance(confusion, np.ndarray) and confusion.dtype == np.int64
    np.testing.assert_array_equal(confusion, expected)
    assert np.count_nonzero(confusion) >= 20 and confusion.sum() == 3000  # not a trivial matrix
    assert acc == (predicted == true).mean() and 0.5 < acc < 1


def _one_line_error(capsys, fragment):
    err = capsys.readouterr().err.strip()
    assert err.startswith("lenet_xp.") and "\n" not in err and "Traceback" not in err, err
    assert fragment in err, err


def test_bad_device_is_one_line(tmp_path, capsys):
    assert train_cli.main(["--device", "tpu", "--out", str(tmp_path)]) == 1
    _one_line_error(capsys, "use cpu, cuda, cuda:N or auto")


@pytest.mark.parametrize(
    "flag,value",
    [("--epochs", "0"), ("--lr", "nan"), ("--batch-size", "-3"), ("--optimizer", "rmsprop")],
)
def test_nonsense_flags_exit_2(flag, value, capsys):
    with pytest.raises(SystemExit) as info:
        train_cli.main([flag, value])
    assert info.value.code == 2
    assert flag in capsys.readouterr().err


@needs_mnist
def test_truncated_data_file_is_one_line(tmp_path, capsys):
    for name in os.listdir(DATA):
        if name.endswith(".gz"):
            shutil.copy(DATA / name, tmp_path / name)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    raw = gzip.decompress(labels.read_bytes())
    labels.write_bytes(gzip.compress(raw[:-100]))
    assert (
        train_cli.main(
            [
                "--device",
                "cpu",
                "--data-dir",
                str(tmp_path),
                "--quiet",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 1
    )
    _one_line_error(capsys, "train-labels-idx1-ubyte")


def test_missing_data_offline_says_where_to_put_files(tmp_path, capsys, monkeypatch):
    # A mirror where nothing listens (as offline): the message says where the files go.
    monkeypatch.setenv("LENET_XP_MIRRORS", "http://127.0.0.1:9/")
    assert train_cli.main(["--device", "cpu", "--data-dir", str(tmp_path / "d"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "LENET_XP_DATA" in err and str(tmp_path / "d") in err


def test_corrupt_resume_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "last.npz"
    bad.write_bytes(b"\x00" * 100)
    assert train_cli.main(["--device", "cpu", "--resume", str(bad), "--out", str(tmp_path)]) == 1
    _one_line_error(capsys, str(bad))


def test_evaluate_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert evaluate_cli.main(["--checkpoint", str(tmp_path / "nope.npz"), "--device", "cpu"]) == 1
    _one_line_error(capsys, "does not exist")


@needs_no_cuda
def test_cuda_requested_without_usable_gpu_is_one_line(tmp_path, capsys):
    assert train_cli.main(["--device", "cuda", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "lenet_xp[cuda12]" in err or ("CUDA is not usable" in err and "--device cpu" in err)


@needs_mnist
@needs_no_cuda
def test_auto_falls_back_to_cpu_with_a_notice(tmp_path):
    cmd = [sys.executable, "-m", "lenet_xp.train", "--device", "auto", "--epochs", "1"]
    cmd += [
        "--limit-train",
        "256",
        "--limit-test",
        "100",
        "--data-dir",
        str(DATA),
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    notice = [line for line in proc.stderr.splitlines() if line.startswith("device: auto")]
    assert len(notice) == 1 and notice[0].startswith("device: auto -> cpu")
    assert "[cpu]" in proc.stdout


@needs_mnist
def test_out_of_memory_names_the_batch_size(tmp_path):
    """A batch far too large for the memory allowed (an address-space limit, as a small GPU or
    host would impose) ends with one line that says which flag to lower."""
    code = (  # 2 GiB: the libraries fit, a batch of 60,000 does not
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
        "from lenet_xp.train import main\n"
        f"sys.exit(main(['--device', 'cpu', '--data-dir', {str(DATA)!r}, '--batch-size', '60000',"
        f" '--workers', '1', '--quiet', '--out', {str(tmp_path)!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr.strip()
    assert "\n" not in err and "out of memory" in err and "--batch-size 30000" in err


@needs_mnist
def test_resume_from_a_checkpoint_of_another_model_is_one_line(tmp_path, capsys):
    from lenet_xp import LeNet5
    from lenet_xp.storage.checkpoint import save_checkpoint

    state = LeNet5(seed=0).state_dict()
    state["fc1.weight"] = state["fc1.weight"][:, :300]  # not LeNet-5's shape
    config = {k: getattr(train_cli.build_parser().parse_args([]), k) for k in train_cli.CONFIG_KEYS}
    meta = {"epoch": 1, "step": 1, "best_score": 0.0, "config": config, "rng_state": {}}
    path = save_checkpoint(tmp_path / "other.npz", state, {}, meta)
    args = ["--resume", str(path), "--device", "cpu", "--data-dir", str(DATA), "--quiet"]
    assert train_cli.main(args + ["--out", str(tmp_path / "o")]) == 1
    _one_line_error(capsys, "does not fit")


def test_unwritable_out_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    args = ["--device", "cpu", "--data-dir", str(DATA), "--quiet", "--limit-train", "64"]
    assert train_cli.main(args + ["--out", str(blocker / "run")]) == 1
    _one_line_error(capsys, str(blocker))


@needs_mnist
def test_validation_split_chooses_best_and_is_reported(tmp_path):
    args = SMALL + ["--epochs", "2", "--val-size", "500", "--limit-test", "500"]
    assert train_cli.main(args + ["--out", str(tmp_path)]) == 0
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert all(0.5 < r["val_acc"] <= 1 for r in records)
    from lenet_xp.storage.checkpoint import load_checkpoint

    best_epoch = load_checkpoint(tmp_path / "best.npz")[2]["epoch"]
    assert records[best_epoch - 1]["val_acc"] == max(r["val_acc"] for r in records)


@needs_mnist
def test_ctrl_c_stops_cleanly_and_keeps_the_last_checkpoint(tmp_path):
    """SIGINT to the whole process group (as a terminal's Ctrl-C), workers included."""
    import os
    import signal
    import time

    from lenet_xp.storage.checkpoint import load_checkpoint

    cmd = [sys.executable, "-m", "lenet_xp.train", "--device", "cpu", "--data-dir", str(DATA)]
    cmd += ["--epochs", "50", "--limit-train", "3000", "--limit-test", "500", "--workers", "2"]
    cmd += ["--quiet", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "last.npz").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().count("\n") == 0
    assert "resume with --resume" in err
    assert load_checkpoint(tmp_path / "last.npz")[2]["epoch"] >= 1
    assert not list(tmp_path.glob(".*.tmp"))  # no half-written checkpoint left behind


@needs_mnist
def test_a_validation_split_is_the_default_and_patience_stops_early(tmp_path, capsys):
    """By default the last twelfth of the training images validates; with a learning rate
    too small to change anything, validation accuracy never improves after epoch 1, so
    ``--patience 2`` stops after epoch 3 and says so; the metrics record the best epoch."""
    args = ["--device", "cpu", "--data-dir", str(DATA), "--limit-train", "1200"]
    args += ["--limit-test", "200", "--epochs", "10", "--lr", "1e-12", "--schedule", "constant"]
    args += ["--patience", "2", "--out", str(tmp_path), "--workers", "1"]
    assert train_cli.main(args) == 0
    out = capsys.readouterr().out
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all("val_acc" in r and r["best_epoch"] == 1 for r in records)
    assert records[-1]["stopped_early"] is True and "stopped_early" not in records[0]
    assert "early stop: val_acc has not improved for 2 epochs (best: epoch 1" in out
    assert records[0]["images_per_second"] * records[0]["train_seconds"] == pytest.approx(1100)


def test_patience_without_validation_is_one_line(tmp_path, capsys):
    args = SMALL + ["--val-size", "0", "--patience", "2", "--out", str(tmp_path)]
    if not (DATA / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST not found in {DATA}")
    assert train_cli.main(args) == 1
    _one_line_error(capsys, "--patience needs a validation split")


@needs_mnist
def test_augmented_training_resumes_exactly(tmp_path):
    """``--augment`` draws from the run's seed, the epoch and each image: a run resumed from
    its epoch-1 checkpoint distorts epoch 2 exactly as the uninterrupted run did."""
    base = SMALL + ["--epochs", "2", "--limit-test", "500", "--augment", "default", "--shift", "0"]
    base += ["--keep-every-epoch", "--workers", "1"]
    assert (
        train_cli.main(
            base + ["--out", str(tmp_path / "s"), "--metrics", str(tmp_path / "s.jsonl")]
        )
        == 0
    )
    (tmp_path / "r.jsonl").write_text((tmp_path / "s.jsonl").read_text().splitlines()[0] + "\n")
    resume = ["--resume", str(tmp_path / "s" / "epoch_001.npz"), "--device", "cpu", "--quiet"]
    resume += ["--data-dir", str(DATA), "--out", str(tmp_path / "r"), "--workers", "1"]
    assert train_cli.main(resume + ["--metrics", str(tmp_path / "r.jsonl")]) == 0
    straight = without_timings(read_metrics(tmp_path / "s.jsonl"))
    assert without_timings(read_metrics(tmp_path / "r.jsonl")) == straight
    plain = SMALL + ["--epochs", "1", "--limit-test", "500", "--shift", "0", "--workers", "1"]
    assert train_cli.main(plain + ["--out", str(tmp_path / "p")]) == 0
    assert (
        read_metrics(tmp_path / "p" / "metrics.jsonl")[0]["train_loss"] != straight[0]["train_loss"]
    )


@pytest.mark.parametrize("spec", ["rotate=abc", "wobble=3", "rotate=-5", "extreme"])
def test_nonsense_augment_specs_exit_2_with_one_line(spec, capsys):
    with pytest.raises(SystemExit) as info:
        train_cli.main(["--augment", spec])
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("python -m lenet_xp.train: error: augment spec") and spec in last


@needs_mnist
def test_recipe_best_sets_its_flags_and_explicit_flags_win(tmp_path):
    from lenet_xp.storage.checkpoint import load_checkpoint

    args = SMALL + ["--recipe", "best", "--epochs", "1", "--limit-test", "200", "--workers", "1"]
    assert train_cli.main(args + ["--out", str(tmp_path)]) == 0
    config = load_checkpoint(tmp_path / "last.npz")[2]["config"]
    best = train_cli.RECIPES["best"]
    assert config["augment"] == best["augment"] and config["shift"] == 0 and config["epochs"] == 1
    assert config["ema"] == best["ema"] == 0.999
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 1
    assert train_cli.build_parser().parse_args([]).epochs == 10  # the plain default stays fast
