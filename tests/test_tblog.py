"""Run logs: metrics.csv is metrics.jsonl's twin, and the TensorBoard event file, read back
record by record, holds the run's scalars, histograms and filter images."""

import csv
import io
import json
import struct
import sys

import numpy as np
import pytest
from conftest import DATA, needs_mnist

from lenet_xp import train as train_cli
from lenet_xp.training.logs import LogError, TensorBoardLog, write_csv

event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2", reason="tensorboardX missing")
Image = pytest.importorskip("PIL.Image")


def read_events(path):
    """The ``Event`` protos of a TensorBoard file: TFRecords of (length u64, crc u32,
    payload, crc u32)."""
    data, events, offset = path.read_bytes(), [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        events.append(event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length]))
        offset += 12 + length + 4
    return events


def test_csv_is_the_jsonl_twin(tmp_path):
    rows = [
        {"epoch": 1, "train_loss": 0.1 + 0.2, "device": "cpu"},
        {"epoch": 2, "train_loss": 1e-17, "device": "cuda:0", "stopped_early": True},
    ]
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = write_csv(jsonl)
    assert path == tmp_path / "metrics.csv"
    with path.open(newline="") as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == ["epoch", "train_loss", "device", "stopped_early"]
    assert [float(r["train_loss"]) for r in read] == [r["train_loss"] for r in rows]  # exact
    assert [r["device"] for r in read] == ["cpu", "cuda:0"]
    assert [r["stopped_early"] for r in read] == ["", "True"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "metrics.jsonl"]
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed, none left


@needs_mnist
def test_tensorboard_and_csv_of_a_run(tmp_path):
    out, logdir = tmp_path / "run", tmp_path / "tb"
    args = ["--device", "cpu", "--data-dir", str(DATA), "--quiet", "--epochs", "2"]
    args += ["--limit-train", "1300", "--limit-test", "500", "--out", str(out)]
    assert train_cli.main([*args, "--tensorboard", str(logdir), "--stats-every", "3"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    with (out / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for row, record in zip(rows, records, strict=True):
        assert set(row) == set(record)
        assert all(row[k] == str(v) for k, v in record.items())

    (event_file,) = logdir.glob("events.out.tfevents.*")
    scalars, histograms, images = {}, set(), {}
    for event in read_events(event_file):
        for value in event.summary.value:
            kind = value.WhichOneof("value")
            if kind == "simple_value":
                scalars[(value.tag, event.step)] = value.simple_value
            elif kind == "histo":
                assert value.histo.num > 0
                histograms.add((value.tag, event.step))
            elif kind == "image":
                images[(value.tag, event.step)] = value.image
    for r in records:
        epoch = r["epoch"]
        for split in ("train", "val", "test"):
            assert scalars[(f"loss/{split}", epoch)] == pytest.approx(r[f"{split}_loss"], 1e-6)
            assert scalars[(f"accuracy/{split}", epoch)] == pytest.approx(r[f"{split}_acc"], 1e-6)
        assert scalars[("learning_rate", epoch)] == pytest.approx(r["lr"], 1e-6)
        assert scalars[("speed/images_per_second", epoch)] == pytest.approx(
            r["images_per_second"], 1e-6
        )
        assert ("update_ratio_mean/conv1.weight", epoch) in scalars
        assert ("act_std/relu1", epoch) in scalars
        for name in ("conv1.weight", "conv2.bias", "fc3.weight"):
            assert (f"weights/{name}", epoch) in histograms
            assert (f"gradients/{name}", epoch) in histograms
    for layer, tiles in (("conv1", (1, 6)), ("conv2", (6, 16))):  # (rows, columns) of 5x5
        image = images[(f"filters/{layer}", 2)]
        picture = Image.open(io.BytesIO(image.encoded_image_string))
        size = (tiles[1] * 6 - 1) * 4, (tiles[0] * 6 - 1) * 4  # 5x5 + gaps, 4x larger
        assert picture.size == size == (image.width, image.height)
        assert np.asarray(picture.convert("L")).std() > 10


@needs_mnist
def test_missing_tensorboardx_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails as if not installed
    with pytest.raises(LogError, match=r'pip install "lenet_xp\[tensorboard\]"'):
        TensorBoardLog(tmp_path)
    args = ["--device", "cpu", "--data-dir", str(DATA), "--tensorboard", str(tmp_path)]
    assert train_cli.main([*args, "--out", str(tmp_path / "run"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lenet_xp.train: error: --tensorboard needs tensorboardX")
    assert "\n" not in err


def test_unwritable_tensorboard_dir_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(LogError, match="cannot write TensorBoard logs"):
        TensorBoardLog(blocker / "tb")
