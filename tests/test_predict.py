"""Predicting your own pictures: MNIST digits re-drawn as photos would be, and bad files."""

import numpy as np
import pytest
from test_train import DATA, needs_mnist

from lenet_xp import predict
from lenet_xp import train as train_cli
from lenet_xp.images import ImageError, load_digit, mnist_style
from lenet_xp.mnist import load_mnist

Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    args = ["--device", "cpu", "--data-dir", str(DATA), "--quiet", "--epochs", "2"]
    assert (
        train_cli.main(args + ["--limit-train", "8000", "--limit-test", "100", "--out", str(out)])
        == 0
    )
    return out / "last.npz"


def test_mnist_style_inverts_crops_and_centres():
    picture = np.ones((90, 60), np.float32)  # white paper
    picture[10:70, 5:15] = 0.0  # a dark vertical stroke near the left edge
    digit = mnist_style(picture)
    assert digit.shape == (28, 28) and digit.max() > 0.9 and digit[0].max() == 0  # light ink
    rows, cols = np.nonzero(digit > 0.5)
    assert rows.max() - rows.min() + 1 == 20  # the long side scaled to 20 pixels
    assert abs(cols.mean() - 13.5) <= 1 and abs(rows.mean() - 13.5) <= 1


@needs_mnist
@pytest.mark.parametrize("style", ["mnist", "photo"])
def test_predicts_redrawn_test_digits(checkpoint, tmp_path, capsys, style):
    mnist = load_mnist(DATA, download=False)
    paths, labels = [], mnist.test_labels[:20]
    for i, image in enumerate(mnist.test_images[:20]):
        picture = Image.fromarray(image)
        if style == "photo":  # dark ink on light paper, larger, off-centre, as a JPEG
            big = Image.fromarray(255 - image).resize((112, 112), Image.Resampling.BILINEAR)
            picture = Image.new("L", (170, 150), 255)
            picture.paste(big, (40, 10))
        path = tmp_path / f"digit{i}.{'png' if style == 'mnist' else 'jpg'}"
        picture.save(path)
        paths.append(str(path))
    assert predict.main(["--checkpoint", str(checkpoint), "--device", "cpu", *paths]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    predicted = [int(line.split(": ")[1].split()[0]) for line in lines]
    assert len(predicted) == 20 and sum(np.array(predicted) == labels) >= 17  # chance: 2


@needs_mnist
def test_unreadable_and_blank_pictures_are_one_line_each(checkpoint, tmp_path, capsys):
    fake = tmp_path / "fake.png"
    fake.write_text("not a picture")
    blank = tmp_path / "blank.png"
    Image.new("L", (30, 30), 255).save(blank)
    missing = tmp_path / "missing.png"
    code = predict.main(["--checkpoint", str(checkpoint), str(fake), str(blank), str(missing)])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("lenet_xp.predict: error: ") for line in err)
    assert str(fake) in err[0] and "blank" in err[1] and "no such file" in err[2]
    with pytest.raises(ImageError):
        load_digit(fake)
