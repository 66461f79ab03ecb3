"""Predicting your own pictures: MNIST digits re-drawn as photos would be, bad files, --json,
--save-input, and ``predict(model, images)`` from Python on paths and arrays."""

import json

import numpy as np
import pytest
from conftest import DATA, DEVICES, needs_mnist

from lenet_xp import predict
from lenet_xp.backend import get_device
from lenet_xp.data.images import ImageError, load_digit, mnist_style
from lenet_xp.data.mnist import MEAN, STD, load_mnist
from lenet_xp.models.presets import Options, build
from lenet_xp.training.evaluation import load_model

Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def checkpoint(trained_checkpoint):
    """The session's trained LeNet-5 (conftest's: trained once, shared with the serve tests)."""
    return trained_checkpoint


@pytest.fixture(scope="module")
def test_digits():
    """The first 20 MNIST test digits ``(20, 28, 28)`` uint8 and their labels."""
    mnist = load_mnist(DATA, download=False)
    return mnist.test_images[:20], mnist.test_labels[:20]


def _save_pngs(images, folder):
    paths = []
    for i, image in enumerate(images):
        paths.append(str(folder / f"digit{i}.png"))
        Image.fromarray(image).save(paths[-1])
    return paths


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
def test_predicts_redrawn_test_digits(checkpoint, test_digits, tmp_path, capsys, style):
    images, labels = test_digits
    paths = []
    for i, image in enumerate(images):
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
    assert predict.main(["--checkpoint", str(checkpoint), "--json", str(missing)]) == 1
    assert json.loads(capsys.readouterr().out) == []  # still a JSON array


@needs_mnist
@pytest.mark.parametrize("device", DEVICES)
def test_json_and_save_input(checkpoint, test_digits, tmp_path, capsys, device):
    """--json: one array on stdout, an object per readable picture; the bad one is one line on
    stderr and exit status 1; --save-input writes the 28x28 each one became, which classifies
    (from Python, as an array) as the file did."""
    images, labels = test_digits
    paths = _save_pngs(images[:6], tmp_path)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    paths.insert(3, str(tmp_path / "bad.png"))
    seen = tmp_path / "seen"
    args = ["--checkpoint", str(checkpoint), "--device", device, "--json", "--save-input"]
    assert predict.main([*args, str(seen), *paths]) == 1
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    (err,) = captured.err.strip().splitlines()
    assert err.startswith("lenet_xp.predict: error: ") and "bad.png" in err
    assert [r["file"] for r in results] == paths[:3] + paths[4:]
    assert [r["digit"] for r in results] == list(labels[:6])
    for r in results:
        top = r["top3"]
        assert [t["digit"] for t in top][0] == r["digit"] and len({t["digit"] for t in top}) == 3
        assert top[0]["probability"] == r["probability"] >= top[1]["probability"]
        assert top[1]["probability"] >= top[2]["probability"] > 0
    saved = [np.asarray(Image.open(r["input"])) for r in results]
    assert sorted(p.name for p in seen.iterdir()) == [f"digit{i}.png" for i in range(6)]
    want = [np.round(mnist_style(image / 255.0) * 255) for image in images[:6]]
    for got, expected in zip(saved, want, strict=True):
        assert got.shape == (28, 28) and got.dtype == np.uint8
        assert np.abs(got.astype(int) - expected).max() <= 1
    digits, probs = predict.predict(checkpoint, np.stack(saved), device=device)
    assert list(digits) == [r["digit"] for r in results]
    np.testing.assert_allclose(probs.max(axis=1), [r["probability"] for r in results], rtol=2e-3)


@needs_mnist
@pytest.mark.parametrize("device", DEVICES)
def test_predict_from_python_on_paths_and_arrays(checkpoint, test_digits, tmp_path, device):
    images, labels = test_digits
    model, _ = load_model(str(checkpoint), get_device(device))
    model.train()
    digits, probs = predict.predict(model, images)  # (N, 28, 28) uint8
    assert model.training  # its mode is left as it was
    assert digits.shape == (20,) and digits.dtype == np.int64 and probs.shape == (20, 10)
    assert isinstance(probs, np.ndarray) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)
    assert (digits == labels).sum() >= 17 and (digits == probs.argmax(axis=1)).all()
    for same in (images[:, None], images / np.float32(255), images / 255.0):
        d, p = predict.predict(model, same)
        assert (d == digits).all() and np.abs(p - probs).max() < 1e-5
    paths = _save_pngs(images[:5], tmp_path)
    from_files, _ = predict.predict(str(checkpoint), paths, device=device)
    (one,), _ = predict.predict(model, paths[0])
    assert list(from_files) == list(labels[:5]) and one == labels[0]
    with pytest.raises(ImageError, match="missing.png: no such file"):
        predict.predict(model, [paths[0], str(tmp_path / "missing.png")])


def test_predict_on_a_32x32_model_pads_as_training_did():
    """lenet5-classic takes 32x32: 28x28 arrays are padded with the background."""
    model = build("lenet5-classic", Options(output="rbf"))
    rng = np.random.default_rng(0)
    pixels = rng.random((4, 28, 28)).astype(np.float32)
    padded = np.pad((pixels[:, None] - MEAN) / STD, ((0, 0), (0, 0), (2, 2), (2, 2)),
                    constant_values=-MEAN / STD)  # fmt: skip
    logits = model.eval().forward(padded.astype(np.float32))
    digits, probs = predict.predict(model, pixels)
    assert (digits == logits.argmax(axis=1)).all()
    want = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probs, want / want.sum(axis=1, keepdims=True), atol=1e-6)
    d32, _ = predict.predict(model, np.pad(pixels, ((0, 0), (2, 2), (2, 2))))
    assert (d32 == digits).all()  # already padded: the same


@pytest.mark.parametrize(
    "images, message",
    [
        (np.zeros((2, 32, 32), np.uint8), r"shape \(N, 28, 28\) or \(N, 1, 28, 28\), got"),
        (np.zeros((28, 28), np.uint8), "got \\(28, 28\\)"),
        (np.full((2, 28, 28), -0.4), r"in \[0, 1\].*already normalised"),
        (np.zeros((2, 28, 28), np.int64), "uint8 or float pixels, got int64"),
    ],
)
def test_bad_arrays_are_one_clear_error(images, message):
    with pytest.raises(ValueError, match=message):
        predict.predict(build("lenet5"), images)
