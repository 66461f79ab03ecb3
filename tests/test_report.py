"""The HTML report of a real (tiny) run: written by `train --report`, every picture decodable
and not blank, and the page rendered by a real headless Chromium with no missing image and
no console error. Also `inspect.layer_outputs`, which draws the feature maps."""

import io
import shutil
import sys

import numpy as np
import pytest
from conftest import DATA, needs_mnist
from reliability_helpers import metrics

from lenet_xp import evaluate, plots, report
from lenet_xp import train as train_cli
from lenet_xp.backend import asnumpy, host_rng
from lenet_xp.models.feature_maps import feature_maps, layer_outputs
from lenet_xp.models.presets import build
from lenet_xp.storage.checkpoint import load_checkpoint, save_checkpoint

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")
PICTURES = ["curves", "confusion", "mistakes", "filters", "feature_maps", "layer_stats"]


@pytest.mark.parametrize("arch", ["lenet5", "lenet5-classic"])
def test_layer_outputs_end_in_the_models_output(arch):
    model = build(arch).eval()
    size = model.input_size
    x = host_rng(0).standard_normal((3, 1, size, size)).astype("float32")
    outputs = layer_outputs(model, x)
    assert [name for name, _ in outputs] == [name for name, _ in model.named_children()]
    assert np.array_equal(outputs[-1][1], asnumpy(model.forward(x)))
    assert all(out.shape[0] == 3 for _, out in outputs)
    maps = feature_maps(model, x)
    assert [n for n, _ in maps] == [n for n, out in outputs if out.ndim == 4]
    assert maps[0][1].shape == (3, 6, 28, 28)  # conv1: 6 maps, padded or 32x32 input
    relu = dict(outputs)["relu1" if arch == "lenet5" else "act1"]
    assert relu.min() >= (0 if arch == "lenet5" else -1.7159)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-epoch run on 1,300 images with statistics every 2 steps and --report."""
    if not (DATA / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST not found in {DATA}")
    out = tmp_path_factory.mktemp("report_run")
    args = ["--device", "cpu", "--data-dir", str(DATA), "--quiet", "--epochs", "2"]
    args += ["--limit-train", "1300", "--limit-test", "600", "--stats-every", "2"]
    assert train_cli.main([*args, "--out", str(out), "--report"]) == 0
    return out


def test_report_pictures(run):
    page = run / "report" / "index.html"
    text = page.read_text()
    for name in PICTURES:
        assert f'src="{name}.png"' in text
        with Image.open(run / "report" / f"{name}.png") as picture:
            assert picture.format == "PNG" and min(picture.size) > 200
            assert np.asarray(picture.convert("L")).std() > 20  # not a blank canvas
    assert "final test accuracy" in text and "limit_train" in text


def test_report_cli_redraws_and_refuses_bad_input(run, tmp_path, capsys):
    assert report.main([str(run), "--data-dir", str(DATA), "--digit", "5"]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report" / "index.html")
    for argv in (
        [str(tmp_path / "nothing")],
        [str(run), "--data-dir", str(DATA), "--digit", "600"],  # --limit-test 600: 0..599
        [str(run), "--checkpoint", str(tmp_path / "none.npz")],
    ):
        assert report.main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("lenet_xp.report: error:") and "\n" not in err, err


@pytest.fixture(params=["unset", "empty"])
def no_default_data(request, tmp_path, monkeypatch):
    """No MNIST where the defaults look: ``$LENET_XP_DATA`` unset and the cache
    (``$XDG_CACHE_HOME``) an empty folder, or ``$LENET_XP_DATA`` an empty folder; every download
    refused at once (a closed port on 127.0.0.1). MNIST is found only where a run or a flag
    says. Returns the empty folder."""
    empty = tmp_path / "empty"
    empty.mkdir()
    if request.param == "unset":
        monkeypatch.delenv("LENET_XP_DATA", raising=False)
        monkeypatch.setenv("XDG_CACHE_HOME", str(empty))
    else:
        monkeypatch.setenv("LENET_XP_DATA", str(empty))
    monkeypatch.setenv("LENET_XP_MIRRORS", "http://127.0.0.1:9/")
    return empty


def test_report_evaluate_plots_read_the_runs_data_folder(run, no_default_data, capsys):
    """A run trained with ``--data-dir`` records the folder in its checkpoint's config; report,
    evaluate and plots read MNIST from there without the flag, where ``$LENET_XP_DATA`` has
    none; an explicit ``--data-dir`` still wins."""
    assert load_checkpoint(run / "best.npz")[2]["config"]["data_dir"] == str(DATA.resolve())
    assert report.main([str(run)]) == 0
    assert evaluate.main(["--checkpoint", str(run / "best.npz"), "--device", "cpu"]) == 0
    assert "(10000 images)" in capsys.readouterr().out
    assert plots.main(["--run", str(run)]) == 0
    assert str(run / "misclassified.png") in capsys.readouterr().out.split()
    assert report.main([str(run), "--data-dir", str(no_default_data)]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the downloader's notes
    assert error.startswith("lenet_xp.report: error:") and str(no_default_data) in error


def test_without_the_recorded_folder_the_defaults_are_read(run, no_default_data, tmp_path, capsys):
    """A run whose recorded folder is gone reads the defaults (``$LENET_XP_DATA``, else the
    cache): here empty, with downloads refused, so one line naming where it looked."""
    moved = tmp_path / "moved"
    shutil.copytree(run, moved, ignore=shutil.ignore_patterns("report"))
    checkpoint = moved / "best.npz"
    model_state, optim_state, meta = load_checkpoint(checkpoint)
    meta["config"]["data_dir"] = str(tmp_path / "gone")
    save_checkpoint(checkpoint, model_state, optim_state, meta)
    assert evaluate.main(["--checkpoint", str(checkpoint), "--device", "cpu"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("lenet_xp.evaluate: error:") and str(no_default_data) in error


@needs_mnist
def test_metrics_written_elsewhere_and_resuming_without_data_dir(tmp_path, no_default_data):
    """A run trained with ``--metrics`` elsewhere: ``report RUN`` takes the epochs' metrics
    from the run's checkpoint. Resumed without ``--data-dir``, it reads the data it was
    trained on, and ends as the uninterrupted run did."""
    out, elsewhere = tmp_path / "run", tmp_path / "logs" / "m.jsonl"
    args = ["--device", "cpu", "--quiet", "--epochs", "2", "--limit-train", "400"]
    args += ["--limit-test", "200", "--val-size", "0", "--keep-every-epoch"]
    args += ["--data-dir", str(DATA), "--out", str(out), "--metrics", str(elsewhere)]
    assert train_cli.main(args) == 0
    assert not (out / "metrics.jsonl").exists()
    records = metrics(elsewhere)
    assert report.main([str(out)]) == 0
    page = (out / "report" / "index.html").read_text()
    assert "<th>epochs trained</th><td>2</td>" in page
    assert f"<td>{100 * records[-1]['test_acc']:.2f} %</td>" in page
    assert plots.main(["--run", str(out)]) == 0  # its curves too, from the checkpoint
    assert (out / "curves.png").is_file()
    assert plots.main(["--run", str(out), "--metrics", str(out / "none.jsonl")]) == 1
    resumed = tmp_path / "resumed"
    resume = ["--resume", str(out / "epoch_001.npz"), "--out", str(resumed), "--quiet"]
    assert train_cli.main([*resume, "--device", "cpu"]) == 0  # no --data-dir
    assert metrics(resumed / "metrics.jsonl") == records


def _browser():
    """A headless Chromium driven by selenium, or a skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip("Chromium and chromedriver are needed (apt install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver_path))


def _load(browser, page):
    """``(images as (src, loaded), console errors)`` of ``page`` opened in ``browser``."""
    browser.get(page.resolve().as_uri())
    images = browser.execute_script(
        "return [...document.images].map(i => [i.getAttribute('src'),"
        " i.complete && i.naturalWidth > 0])"
    )
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    return images, errors


def test_report_in_a_headless_browser(run, tmp_path):
    browser = _browser()
    try:
        broken = tmp_path / "broken.html"  # the checks can see a missing picture
        broken.write_text('<!DOCTYPE html><link rel="icon" href="data:,"><img src="none.png">')
        images, errors = _load(browser, broken)
        assert images == [["none.png", False]] and len(errors) == 1

        images, errors = _load(browser, run / "report" / "index.html")
        assert images == [[f"{name}.png", True] for name in PICTURES]
        assert errors == []
        assert browser.title == f"lenet_xp report: {run.name}"
        shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("L")
        assert shot.width >= 1000
        pixels = np.asarray(shot)
        assert pixels.std() > 20 and (pixels < 100).mean() > 0.01  # text, not a blank page
    finally:
        browser.quit()


@needs_mnist
def test_train_report_needs_matplotlib_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    args = ["--device", "cpu", "--data-dir", str(DATA), "--quiet", "--out", str(tmp_path)]
    assert train_cli.main([*args, "--report"]) == 1
    err = capsys.readouterr().err.strip()
    assert (
        err == 'lenet_xp.train: error: the report needs matplotlib: pip install "lenet_xp[report]"'
    )
    assert not (tmp_path / "last.npz").exists()  # refused before any training
