"""lenet_xp.sweep on real MNIST subsets: the table of a 2 x 2 grid (locally with 2 jobs, and
through a local Ray instance), resuming after a kill or a signal, failed runs, ASHA and every
bad sweep file."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, needs_mnist

from lenet_xp import sweep
from lenet_xp import train as train_cli
from lenet_xp.sweep import asha, places, spec
from lenet_xp.training.runlock import RunLock

ROOT = Path(__file__).resolve().parents[1]
TINY = f"""
seeds = [0]
[train]
device = "cpu"
data-dir = "{DATA}"
epochs = 1
limit-train = 400
limit-test = 200
[grid]
arch = ["lenet5", "compact-cnn"]
lr = [1e-3, 3e-3]
"""
#: Columns that depend on the machine and the moment, not on the runs' numbers.
TIMING_COLUMNS = {"minutes", "host"}


def sweep_cli(*args, timeout=300, **kw):
    cmd = [sys.executable, "-m", "lenet_xp.sweep", *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kw)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def without_timings(rows):
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]


def history(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """The 2 x 2 grid trained locally with 2 jobs: ``(sweep file, output folder)``."""
    if not (DATA / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(needs_mnist.kwargs["reason"])
    folder = tmp_path_factory.mktemp("sweep")
    file = folder / "tiny.toml"
    file.write_text(TINY)
    proc = sweep_cli(file, "--out", folder / "out", "--jobs", "2", "--cpus-per-run", "1")
    assert proc.returncode == 0, proc.stderr
    return file, folder / "out"


def test_a_grid_with_two_jobs_gives_the_table(tiny_sweep):
    """Four ordinary train runs, one row each with their best-validation epoch's accuracies,
    and a summary sorted by validation accuracy that names the best configuration."""
    _, out = tiny_sweep
    rows = read_csv(out / "results.csv")
    assert [(r["arch"], r["lr"]) for r in rows] == [
        ("lenet5", "0.001"), ("lenet5", "0.003"), ("compact-cnn", "0.001"),
        ("compact-cnn", "0.003"),
    ]  # fmt: skip
    for row in rows:
        records = history(out / row["run"])
        best = records[-1]["best_epoch"]
        assert row["status"] == "finished" and row["device"] == "cpu" and row["epochs"] == "1"
        assert float(row["val_acc"]) == records[best - 1]["val_acc"]
        assert float(row["test_acc"]) == records[best - 1]["test_acc"]
        assert (out / row["run"] / "best.npz").exists()
    summary = (out / "summary.md").read_text()
    table = [line for line in summary.splitlines() if line.startswith("| `")]
    assert len(table) == 4
    vals = [float(line.split("|")[3].split("%")[0]) for line in table]
    assert vals == sorted(vals, reverse=True)
    by_config = {}
    for row in rows:
        by_config.setdefault(row["config"], []).append(float(row["val_acc"]))
    best = max(by_config, key=lambda c: by_config[c][0])
    assert (
        f"**Best configuration** (highest mean validation accuracy, {vals[0]:.2f} %): `{best}`"
        in (summary)
    )
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sweep_run_is_the_train_run_of_its_flags(tiny_sweep, tmp_path):
    """The same flags and seed through ``train`` itself give the same metrics (the sweep
    gave each run one core: ``--workers 1``)."""
    _, out = tiny_sweep
    run = out / "arch=compact-cnn_lr=0.003_seed=0"
    flags = json.loads((run / "run.json").read_text())["flags"]
    argv = [*flags, "--seed", "0", "--workers", "1", "--device", "cpu", "--quiet"]
    assert train_cli.main([*argv, "--out", str(tmp_path)]) == 0
    strip = lambda records: [  # noqa: E731
        {k: v for k, v in r.items() if k not in ("train_seconds", "images_per_second")}
        for r in records
    ]
    assert strip(history(tmp_path)) == strip(history(run))


def test_the_same_sweep_through_a_local_ray_instance_gives_the_same_table(tiny_sweep, tmp_path):
    """Each run a Ray task (ray.init on this machine, 2 CPUs): the same numbers."""
    pytest.importorskip("ray", reason='Ray is not installed here (pip install "lenet_xp[ray]")')
    file, out = tiny_sweep
    code = (
        "import ray, sys; from lenet_xp import sweep; ray.init(num_cpus=2, include_dashboard="
        "False, logging_level='WARNING'); sys.exit(sweep.main(sys.argv[1:]))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(file), "--out", str(tmp_path), "--ray", "auto"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Ray: 2 at once, 1 CPU each" in proc.stdout
    local = without_timings(read_csv(out / "results.csv"))
    assert without_timings(read_csv(tmp_path / "results.csv")) == local


def test_a_second_sweep_on_the_same_folder_is_refused(tmp_path):
    refused = pytest.raises(spec.SweepError, match="in use by another sweep")
    with RunLock(tmp_path, sweep.LOCK_NAME, "sweep"), refused:
        sweep.run(toml_table(TINY), tmp_path)
    assert not (tmp_path / "results.csv").exists()


def test_unknown_only_and_jobs_with_ray_are_one_line_before_anything_trains(tmp_path, capsys):
    file = tmp_path / "s.toml"
    file.write_text(TINY)
    assert sweep.main([str(file), "--out", str(tmp_path / "a"), "--only", "arch=lenet6"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lenet_xp.sweep: error: --only arch=lenet6: no such configuration; ")
    assert "arch=lenet5_lr=0.001, arch=lenet5_lr=0.003" in err and err.count("\n") == 1
    assert (
        sweep.main([str(file), "--out", str(tmp_path / "b"), "--ray", "local", "--jobs", "2"]) == 1
    )
    assert "--jobs sizes local runs; with --ray" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not list((tmp_path / "a").glob("arch=*"))


def test_a_changed_sweep_file_does_not_reuse_runs_of_other_flags(tiny_sweep):
    """The folders hold 1-epoch runs: a sweep of 2 epochs neither reads them as its own nor
    trains over them."""
    _, out = tiny_sweep
    with pytest.raises(spec.SweepError, match="holds a run with other flags") as info:
        sweep.run(toml_table(TINY.replace("epochs = 1", "epochs = 2")), out)
    assert "--epochs 1 " in str(info.value) and "the sweep file changed" in str(info.value)


def toml_table(toml_text):
    """A sweep file's text as the dict ``lenet_xp.sweep.run`` also takes."""
    return spec.tomllib.loads(toml_text)


@needs_mnist
def test_a_killed_sweep_restarted_retrains_nothing_that_finished(tmp_path):
    """kill -9 of the whole sweep (its runs too) after two of four runs: run again, the two
    are read back (their files untouched) and the sweep finishes."""
    file = tmp_path / "s.toml"
    file.write_text(TINY.replace("epochs = 1", "epochs = 2").replace("400", "1500"))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lenet_xp.sweep", str(file), "--out", str(out), "--jobs", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("[2/4]"):
                break
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    finished = [out / "arch=lenet5_lr=0.001_seed=0", out / "arch=lenet5_lr=0.003_seed=0"]
    before = {p: p.stat().st_mtime_ns for f in finished for p in f.iterdir()}
    again = sweep_cli(file, "--out", out, "--jobs", "1")
    assert again.returncode == 0, again.stderr
    assert "4 runs: 2 done (read back, not trained again), 2 to train" in again.stdout
    assert {p: p.stat().st_mtime_ns for f in finished for p in f.iterdir()} == before
    assert [r["status"] for r in read_csv(out / "results.csv")] == ["finished"] * 4


@needs_mnist
def test_sigterm_stops_the_sweep_saved_and_the_run_resumes(tmp_path):
    """SIGTERM to the sweep: its running training saves and stops, the sweep says how to go
    on and exits 143; run again, the run resumes (its first epoch is not trained again)."""
    file = tmp_path / "s.toml"
    file.write_text(
        TINY.split("[grid]")[0].replace("epochs = 1", "epochs = 3").replace("400", "3000")
    )
    out = tmp_path / "out"
    run = out / "base_seed=0"
    cmd = [sys.executable, "-m", "lenet_xp.sweep", str(file), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        while not (run / "metrics.jsonl").exists() or not history(run):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "run the same command again" in stderr
    first_epoch = history(run)[0]
    assert len(history(run)) < 3
    again = sweep_cli(file, "--out", out)
    assert again.returncode == 0, again.stderr
    assert "resumed and finished" in again.stdout
    records = history(run)
    assert [r["epoch"] for r in records] == [1, 2, 3] and records[0] == first_epoch


@needs_mnist
def test_a_failed_run_is_recorded_with_its_error_and_the_sweep_goes_on(tmp_path, capsys):
    table = toml_table(TINY)
    table["grid"] = {"val-size": [50, 5000]}  # 5000 of 400 images: train refuses
    results = sweep.run(table, tmp_path, quiet=True)
    assert [r.status for r in results] == ["finished", "failed"]
    assert "--val-size 5000 must be between 1 and 399" in results[1].error
    row = read_csv(tmp_path / "results.csv")[1]
    assert row["status"] == "failed" and "--val-size 5000" in row["error"]
    assert "--val-size 5000 must be between" in (tmp_path / "summary.md").read_text()
    file = tmp_path / "s.toml"
    file.write_text(TINY.split("[grid]")[0] + "[grid]\nval-size = [50, 5000]\n")
    assert sweep.main([str(file), "--out", str(tmp_path), "--quiet"]) == 1
    assert "1 of 2 runs failed" in capsys.readouterr().err


@needs_mnist
def test_asha_stops_the_hopeless_run_for_good(tmp_path):
    """A learning rate of 1e-7 learns nothing: at the first milestone it is below the good
    run's accuracy and is stopped; run again, it stays stopped (not resumed). Epochs here
    take a fraction of a second and a stop lands within about a second (the sweep looks
    every 0.5 s), during which the run trains on: 8 epochs leave it time to land."""
    table = toml_table(TINY)
    table["train"].update({"epochs": 8, "limit-train": 3000})
    table["grid"] = {"lr": [3e-3, 1e-7]}
    table["asha"] = {"grace": 1, "eta": 2}
    results = sweep.run(table, tmp_path, jobs=1, cpus_per_run=1, quiet=True)
    good, hopeless = results
    assert good.status == "finished" and len(good.history) == 8
    assert hopeless.status == "stopped" and len(hopeless.history) < 8
    stopped = json.loads((tmp_path / hopeless.run.name / "stopped.json").read_text())
    assert stopped["epoch"] == 1 and stopped["val_acc"] < stopped["cutoff"]
    assert [r.status for r in sweep.run(table, tmp_path, quiet=True)] == ["finished", "stopped"]


def test_a_run_that_ends_between_two_looks_counts_at_its_milestones(tmp_path):
    """Run ``good`` trains all 4 epochs between two looks of the scheduler (a short run on a
    loaded machine); once it has ended, ``hopeless`` is judged against it at epoch 1, and
    only once: the next milestone it reaches before it stops does not judge it again."""
    from lenet_xp.sweep.spec import Asha, Run

    runs = [Run(name, 0, (), (), 4) for name in ("good", "hopeless")]
    scheduler = asha.AshaScheduler(Asha(grace=1, eta=2), tmp_path, runs)

    def write(name: str, accuracies: list[float]) -> None:
        (tmp_path / f"{name}_seed=0").mkdir(exist_ok=True)
        lines = [json.dumps({"epoch": i, "val_acc": a}) for i, a in enumerate(accuracies, 1)]
        (tmp_path / f"{name}_seed=0" / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    write("good", [0.9, 0.95, 0.96, 0.97])
    scheduler.ended("good_seed=0")
    write("hopeless", [0.1])
    line = scheduler.check("hopeless_seed=0")
    assert line is not None and line.startswith("stopped by ASHA at epoch 1"), line
    assert json.loads((tmp_path / "hopeless_seed=0" / "stopped.json").read_text())["epoch"] == 1
    # it trains on while it winds down (a loaded machine): judged once, its stop is kept
    write("hopeless", [0.1, 0.1])
    assert scheduler.check("hopeless_seed=0") is None
    assert json.loads((tmp_path / "hopeless_seed=0" / "stopped.json").read_text())["epoch"] == 1


@pytest.mark.parametrize("eta", [2, 3, 4])
def test_the_asha_cutoff_is_numpys_percentile(eta):
    values = [0.91, 0.12, 0.95, 0.5, 0.97, 0.33, 0.8][: eta + 2]
    for n in range(1, len(values) + 1):
        expected = np.percentile(values[:n], 100 * (1 - 1 / eta))
        assert asha.quantile(values[:n], 1 - 1 / eta) == pytest.approx(expected, abs=1e-15)


def test_local_runs_are_sized_to_their_share_of_the_cores():
    placement = places.local_placement("cpu", jobs=2, cpus=None, gpus=None)
    assert placement.cpus == max(1, places.cores() // 2) and placement.gpus == 0
    task = placement.task("/tmp/x", ("--epochs", "1"), 0)
    threads = str(int(placement.cpus))
    assert task.extra == ("--workers", str(min(places.MAX_WORKERS, int(placement.cpus))))
    assert task.env["OPENBLAS_NUM_THREADS"] == threads == task.env["OMP_NUM_THREADS"]
    assert placement.task("/tmp/x", ("--workers", "3"), 0).extra == ()  # the file's wins
    assert places.local_placement("cpu", None, None, None).jobs == places.cores()


def test_random_draws_are_fixed_by_their_seed_rounded_and_in_range():
    table = {
        "seeds": [0, 1],
        "grid": {"arch": ["lenet5", "lenet5-nopad"]},
        "random": {"samples": 5, "lr": {"log-uniform": [1e-4, 1e-2]},
                   "batch-size": {"int-uniform": [32, 256]}},
    }  # fmt: skip
    first, second = spec.load(table), spec.load(table)
    assert [r.flags for r in first.runs] == [r.flags for r in second.runs]
    assert len(first.runs) == 2 * 5 * 2 and first.axes == ["arch", "lr", "batch-size"]
    lrs = {float(dict(r.values)["lr"]) for r in first.runs}
    assert len(lrs) == 5 and all(1e-4 <= lr <= 1e-2 and float(f"{lr:.3g}") == lr for lr in lrs)
    run = first.runs[0]
    assert run.name == f"arch=lenet5_lr={dict(run.values)['lr']}_batch-size=" + (
        f"{dict(run.values)['batch-size']}_seed=0"
    )
    assert f"--lr {dict(run.values)['lr']}" in " ".join(run.flags)


BAD_FILES = [  # (sweep file text, what its one line must say)
    (
        "[train]\nlimit_train = 20",
        "[train] limit_train: unknown train flag (did you mean 'limit-train'?)",
    ),
    ("[grid]\nlr = []", "[grid] lr: is an empty axis: give at least one value"),
    ("[random]\nsamples = 2\nlr = { log-uniform = [0, 1e-2] }", "log-uniform needs 0 < low < high"),
    (
        "[random]\nsamples = 2\nlr = { uniform = [0.1, 0.01] }",
        "uniform needs [low, high] with low < high",
    ),
    ("[random]\nsamples = 2\nlr = { gaussian = [0, 1] }", "unknown distribution 'gaussian'"),
    ("[train]\nout = 'x'", "[train] out: is set by the sweep"),
    ("[grid]\nlr = ['fast']", "--lr: expected a float, got 'fast'"),
    ("[grid]\noptimizer = ['adam', 'lion']", "invalid choice: 'lion'"),
    ("[grid]\narch = ['lenet6']", "unknown --arch 'lenet6'"),
    ("[train]\nbatchnorm = 'yes'", "[train] batchnorm: takes true or false"),
    ("seeds = []", "seeds: must be a non-empty list"),
    ("[grids]\nlr = [1]", "grids: unknown key"),
    ("[grid]\nlr = [0.1", "is not valid TOML"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_a_bad_sweep_file_is_one_clear_line(tmp_path, capsys, text, message):
    file = tmp_path / "bad.toml"
    file.write_text(text + "\n")
    assert sweep.main([str(file), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lenet_xp.sweep: error: {file}") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "out").exists()  # nothing ran


def as_options(flags):
    """``{"--flag": value}`` of an argv (a switch: ``True``), order free."""
    options, i = {}, 0
    while i < len(flags):
        takes_value = i + 1 < len(flags) and not flags[i + 1].startswith("--")
        options[flags[i]] = flags[i + 1] if takes_value else True
        i += 2 if takes_value else 1
    return options


#: The runs of the README tables' former scripts (scripts/presets_table.py,
#: scripts/augment_table.py): ``{sweep file: (device, seeds, [flags of each row])}``.
README_TABLES = {
    "presets.toml": ("cpu", [0], [
        "--arch lenet5 --epochs 10", "--arch lenet5 --pad32 --epochs 3",
        "--arch lenet5-classic --epochs 10", "--arch lenet5-classic --output rbf --epochs 10",
        "--arch lenet5-nopad --epochs 6", "--arch lenet5-sigmoid-avg --epochs 10 --lr 0.005",
        "--arch compact-cnn --epochs 5",
    ]),
    "augment-recipes.toml": ("cpu", [0, 1, 2], [
        "--epochs 10", "--augment default --shift 0 --epochs 50",
        "--recipe best --ema 0 --epochs 50", "--recipe best --epochs 50", "--recipe best",
    ]),
    "augment-archs.toml": ("cpu", [0, 1, 2], [
        f"{arch} {aug} --epochs 15".replace("  ", " ")
        for arch in ("--arch lenet5", "--arch lenet5-nopad", "--arch lenet5-sigmoid-avg --lr 0.005",
                     "--arch lenet5-classic", "--arch lenet5-classic --output rbf",
                     "--arch compact-cnn")
        for aug in ("", "--recipe best")
    ]),
}  # fmt: skip


@pytest.mark.parametrize("name", README_TABLES)
def test_the_readme_tables_sweep_files_train_the_tables_runs(name):
    device, seeds, rows = README_TABLES[name]
    loaded = spec.load(ROOT / "sweeps" / name)
    assert loaded.device == device and loaded.seeds == seeds and loaded.sort == "file"
    expected = [(as_options(row.split()), seed) for row in rows for seed in seeds]
    assert [(as_options(run.flags), run.seed) for run in loaded.runs] == expected


@needs_mnist
def test_rows_keep_the_files_order_with_their_flags_and_notes(tmp_path):
    """A grid axis of rows (tables of flags), sorted as the file says: the summary shows each
    row's name, the flags it sets and its note, in the file's order."""
    table = toml_table(TINY.split("[grid]")[0])
    table["sort"] = "file"
    table["grid"] = {"preset": [
        {"name": "sigmoid", "arch": "lenet5-sigmoid-avg", "lr": 5e-3, "note": "report D"},
        {"name": "plain", "note": "the default"},
    ]}  # fmt: skip
    results = sweep.run(table, tmp_path, quiet=True)
    assert [r.run.name for r in results] == ["preset=sigmoid_seed=0", "preset=plain_seed=0"]
    rows = [line for line in (tmp_path / "summary.md").read_text().splitlines() if "| `" in line]
    assert rows[0].startswith("| `sigmoid` | `--arch lenet5-sigmoid-avg --lr 0.005` | ")
    assert rows[0].endswith(" | report D |")
    assert rows[1].startswith("| `plain` |  | ") and rows[1].endswith(" | the default |")
