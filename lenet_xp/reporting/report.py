"""``python -m lenet_xp.report RUN``: one HTML page about a training run, readable offline.

Writes ``RUN/report/index.html`` and its pictures beside it (PNG, drawn by
:mod:`lenet_xp.plots`): the run's configuration and final figures; loss and accuracy curves
(train, validation, test); the confusion matrix; the most confidently wrong test digits; every
conv layer's filters; the feature maps of one test digit through every layer; and the per-layer
statistics recorded during training (``RUN/stats.jsonl``, :mod:`lenet_xp.training.stats`).
The pictures of the model are of ``RUN/best.npz`` (``--checkpoint`` to choose another) on the
run's test set. ``train --report`` writes it at the end of training.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

from lenet_xp.backend import (
    CPU,
    Device,
    asnumpy,
    get_device,
    use_device,
)
from lenet_xp.data.device_split import DeviceSplit
from lenet_xp.models.feature_maps import feature_maps
from lenet_xp.storage.checkpoint import load_checkpoint
from lenet_xp.training.evaluation import classify, load_model, test_split
from lenet_xp.training.stats import STATS_FILE, read_jsonl, read_stats

np = CPU.xp  # host arrays: the report reads everything back once


class ReportError(Exception):
    """The report cannot be written (no run there, no matplotlib, ...); one line."""


def require_matplotlib() -> None:
    """Raise :class:`ReportError` unless matplotlib imports (check before a long run)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ReportError('the report needs matplotlib: pip install "lenet_xp[report]"') from None


def confusion_matrix(labels: Any, predicted: Any, classes: int = 10) -> Any:
    """``(classes, classes)`` int64 counts: ``[true, predicted]``, host arrays in and out."""
    return np.bincount(labels * classes + predicted, minlength=classes * classes).reshape(
        classes, classes
    )


def epoch_records(run: Path, metrics: str | Path | None, meta: dict) -> list[dict]:
    """The run's records, one per epoch: ``metrics`` (a ``metrics.jsonl``) if given, else
    ``run/metrics.jsonl``, else the ``history`` of ``run/last.npz`` (or, without it, of the
    checkpoint whose ``meta`` this is): a run trained with ``--metrics`` elsewhere."""
    path = Path(metrics) if metrics else run / "metrics.jsonl"
    if metrics or path.is_file():
        if not path.is_file():
            raise ReportError(f"--metrics {path}: no such file")
        return read_jsonl(path)
    last = run / "last.npz"
    history = (load_checkpoint(last)[2] if last.is_file() else meta).get("history")
    if not history:
        raise ReportError(
            f"{path} not found and the run's checkpoint holds no epoch's metrics: pass "
            "--metrics PATH (the file train --metrics wrote)"
        )
    return history


def write_report(
    run_dir: str | Path, *, checkpoint: str | Path | None = None,
    metrics: str | Path | None = None, data_dir: str | None = None,
    device: Device | str = "cpu", digit: int = 0,
) -> Path:  # fmt: skip
    """Write ``run_dir/report/index.html`` and its pictures; return the page's path.

    ``metrics`` defaults to ``run_dir/metrics.jsonl`` (else the epochs' metrics the run's
    checkpoint holds: :func:`epoch_records`), ``checkpoint`` to ``run_dir/best.npz``,
    ``data_dir`` to the folder the run was trained on (:func:`~lenet_xp.evaluate.run_data_dir`);
    ``digit`` is the index of the test image whose feature maps are drawn. Raises
    :class:`ReportError` (or the loaders' one-line errors) when something is missing."""
    require_matplotlib()
    run = Path(run_dir)
    if checkpoint is None and not (run / "best.npz").is_file():
        raise ReportError(
            f"{run / 'best.npz'} not found: is {run} a folder written by train --out?"
        )
    device = get_device(device)
    with use_device(device):
        model, meta = load_model(str(checkpoint or run / "best.npz"), device)
        records = epoch_records(run, metrics, meta)
        if not records:
            raise ReportError(f"{metrics or run / 'metrics.jsonl'} holds no epoch yet")
        test = test_split(meta, device, data_dir, model.input_size)
        limit = meta.get("config", {}).get("limit_test")
        if limit:  # the test set the run's curves were measured on
            test = DeviceSplit(test.images[:limit], test.labels[:limit], device)
        if not 0 <= digit < len(test):
            raise ReportError(f"--digit {digit} is not a test image index (0..{len(test) - 1})")
        host = asnumpy(test.images)  # (N, 1, H, W), as the model sees them
        probs = classify(model, host, 2000)  # host (N, 10), the model's dtype
        model.eval()  # classify restores the training mode load_model left
        maps = [(name, m[0]) for name, m in feature_maps(model, test.images[digit : digit + 1])]
    images, labels = host[:, 0], asnumpy(test.labels)
    out = run / "report"
    out.mkdir(parents=True, exist_ok=True)
    stats = read_stats(run / STATS_FILE)
    pictures = _pictures(out, records, model, images, labels, probs, digit, maps, stats)
    page = out / "index.html"
    page.write_text(_page(run, records, meta, pictures, stats, digit, labels[digit]))
    return page


def _pictures(
    out: Path, records: list[dict], model: Any, images: np.ndarray, labels: np.ndarray,
    probs: np.ndarray, digit: int, maps: list, stats: Any,
) -> dict[str, Path | None]:  # fmt: skip
    """The report's pictures, drawn into ``out``: ``images (N, H, W)`` and ``labels (N,)`` of
    the test set on the host, ``probs (N, 10)`` the model's, ``maps`` of test image ``digit``."""
    from lenet_xp.reporting import plots

    predicted = probs.argmax(axis=1)
    wrong = (predicted != labels).nonzero()[0]
    wrong = wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="stable")]
    confident = probs[wrong, predicted[wrong]]
    return {
        "curves": plots.plot_curves(records, out),
        "confusion": plots.plot_confusion(confusion_matrix(labels, predicted), out),
        "mistakes": plots.plot_misclassified(
            images, labels, wrong, predicted[wrong], out, confident, name="mistakes.png"
        ),
        "filters": plots.plot_filters(model, out),
        "maps": plots.plot_feature_maps(images[digit], maps, probs[digit], out),
        "stats": plots.plot_layer_stats(stats, out) if stats else None,
    }


def _table(rows: list[tuple[str, Any]], per_row: int = 1) -> str:
    """An HTML table of ``(name, value)`` pairs, ``per_row`` pairs to a row."""
    cells = [f"<th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td>" for k, v in rows]
    lines = ["".join(cells[i : i + per_row]) for i in range(0, len(cells), per_row)]
    return "<table>" + "".join(f"<tr>{line}</tr>" for line in lines) + "</table>"


def _figure(picture: Path | None, alt: str, caption: str) -> str:
    if picture is None:
        return f"<p class=note>{html.escape(caption)}</p>"
    return (
        f'<figure><img src="{picture.name}" alt="{html.escape(alt)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def _page(
    run: Path, records: list[dict], meta: dict, pictures: dict, stats: list, digit: int,
    label: int,
) -> str:  # fmt: skip
    last = records[-1]
    best = next((r for r in records if r["epoch"] == last.get("best_epoch")), last)
    seconds = sum(r.get("train_seconds", 0) for r in records)
    summary = [
        ("epochs trained", len(records)),
        ("final test accuracy", _percent(last.get("test_acc"))),
        ("final validation accuracy", _percent(last.get("val_acc"))),
        ("final training loss", f"{last['train_loss']:.4f}"),
        ("best epoch (validation)", f"{best['epoch']}: test {_percent(best.get('test_acc'))}"),
        ("training time", f"{seconds:.1f} s ({last.get('images_per_second', 0):,.0f} img/s last)"),
        ("device, engine", f"{last.get('device', '?')}, {last.get('engine', '?')}"),
        ("pictures of the model", f"checkpoint of epoch {meta.get('epoch', '?')}"),
    ]
    config = sorted(meta.get("config", {}).items())
    stats_caption = (
        "Per-layer statistics per epoch, means over the steps sampled "
        f"(every {stats[-1]['every']} steps). Vanishing gradients: the gradient std falls by "
        "orders of magnitude from the last layer to the first; exploding: it grows. Dead "
        "ReLUs: a layer whose outputs are all 0. The update ratio should sit near 1e-3: "
        "much lower, the learning rate is too low; much higher, too high."
        if stats
        else f"No per-layer statistics: {run / STATS_FILE} is missing (trained with "
        "--stats-every 0, or by an older version)."
    )
    body = [
        f"<h1>Training run {html.escape(run.resolve().name)}</h1>",
        f"<p class=note>{html.escape(str(run.resolve()))}, report written "
        f"{time.strftime('%Y-%m-%d %H:%M')}</p>",
        "<h2>Results</h2>",
        _table(summary, per_row=2),
        "<h2>Configuration</h2>",
        _table(config, per_row=4),
        "<h2>Curves</h2>",
        _figure(pictures["curves"], "loss and accuracy per epoch", "Loss and accuracy."),
        "<h2>Confusion matrix</h2>",
        _figure(pictures["confusion"], "confusion matrix", "Rows: true digit; columns: predicted."),
        "<h2>Most confidently wrong</h2>",
        _figure(pictures["mistakes"], "misclassified digits", "True -> predicted, probability."),
        "<h2>Filters</h2>",
        _figure(pictures["filters"], "conv filters", "Every conv layer's filters."),
        "<h2>Feature maps</h2>",
        _figure(
            pictures["maps"], "feature maps", f"Test digit {digit} (a {label}) through the layers."
        ),
        "<h2>Per-layer statistics</h2>",
        _figure(pictures["stats"], "per-layer statistics", stats_caption),
    ]
    return _TEMPLATE.format(title=html.escape(f"lenet_xp report: {run.name}"), body="\n".join(body))


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; }}
h2 {{ border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }}
table {{ border-collapse: collapse; }}
th, td {{ text-align: left; padding: .15em 1em .15em 0; border-bottom: 1px solid #eee; }}
th {{ font-weight: 600; }}
td {{ padding-right: 2em; }}
img {{ max-width: 100%; }}
figure {{ margin: 0; }}
figcaption, .note {{ color: #555; font-size: .95em; }}
</style></head>
<body>
{body}
</body></html>
"""
