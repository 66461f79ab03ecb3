"""Pictures of a run: really written, decodable, and showing the right digits."""

import numpy as np
import pytest
from test_train import DATA, needs_mnist

from lenet_xp import plots
from lenet_xp import train as train_cli
from lenet_xp.backend import CPU
from lenet_xp.data.device_split import to_device_split
from lenet_xp.data.mnist import load_mnist
from lenet_xp.reporting.plots import misclassified
from lenet_xp.training.evaluation import evaluate, load_model

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")


@needs_mnist
def test_plots_of_a_run(tmp_path, capsys):
    args = ["--device", "cpu", "--data-dir", str(DATA), "--quiet", "--epochs", "2"]
    assert train_cli.main(args + ["--limit-train", "3000", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert plots.main(["--run", str(tmp_path), "--data-dir", str(DATA)]) == 0
    written = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[1] for p in written] == [
        "curves.png",
        "filters.png",
        "misclassified.png",
    ]
    for path in written:
        with Image.open(path) as picture:
            assert picture.format == "PNG" and min(picture.size) > 100
            assert np.asarray(picture.convert("L")).std() > 5  # not a blank canvas

    model, _ = load_model(str(tmp_path / "best.npz"), CPU)
    mnist = load_mnist(DATA, download=False)
    test = to_device_split(mnist.test_images, mnist.test_labels, CPU)
    wrong, predicted = misclassified(model, test, batch_size=3000)
    _, accuracy, confusion = evaluate(model, test)
    assert len(wrong) == round((1 - accuracy) * len(test)) == confusion.sum() - confusion.trace()
    assert (predicted != mnist.test_labels[wrong]).all()


def test_missing_run_is_one_line(tmp_path, capsys):
    assert plots.main(["--run", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lenet_xp.plots: error:") and "\n" not in err


@needs_mnist
def test_plots_of_a_classic_run_on_32x32_inputs(tmp_path, capsys):
    """A checkpoint of another arch (here LeNet-5 as in 1998, 32x32 inputs) is rebuilt and
    drawn: its 32x32 test images and its conv1 filters."""
    args = ["--device", "cpu", "--data-dir", str(DATA), "--quiet", "--epochs", "1"]
    args += ["--limit-train", "2000", "--arch", "lenet5-classic", "--out", str(tmp_path)]
    assert train_cli.main(args) == 0
    capsys.readouterr()
    assert plots.main(["--run", str(tmp_path), "--data-dir", str(DATA)]) == 0
    written = capsys.readouterr().out.split()
    assert len(written) == 3
    for path in written:
        with Image.open(path) as picture:
            assert np.asarray(picture.convert("L")).std() > 5
