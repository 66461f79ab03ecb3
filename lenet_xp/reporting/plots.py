"""``python -m lenet_xp.plots --run OUT``: pictures of a training run (matplotlib).

Writes into ``OUT``: ``curves.png`` (loss and accuracy per epoch, from ``metrics.jsonl``),
``filters.png`` (every conv layer's filters) and ``misclassified.png`` (test digits the model
gets wrong, with true and predicted labels). The HTML report (:mod:`lenet_xp.report`) draws
these and the confusion matrix, feature maps and per-layer statistics with the same functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lenet_xp.backend import CPU, asnumpy
from lenet_xp.data.device_split import DeviceSplit
from lenet_xp.layers import Module
from lenet_xp.models.feature_maps import MAX_TILES, conv_filters, filter_mosaic, mosaic
from lenet_xp.training.evaluation import classify

np = CPU.xp  # host arrays only: every picture is drawn from NumPy copies


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            'lenet_xp.plots: error: needs matplotlib: pip install "lenet_xp[plots]"'
        ) from None
    matplotlib.use("Agg")  # files only, no screen needed
    import matplotlib.pyplot as plt

    return plt


def misclassified(model: Module, split: DeviceSplit, batch_size: int = 2000) -> tuple[Any, Any]:
    """``(indices, predictions)`` (host int arrays) of the images of ``split`` that ``model``
    gets wrong, in order."""
    predicted = classify(model, asnumpy(split.images), batch_size).argmax(axis=1)
    model.eval()  # as before: plots leave the model in eval mode
    wrong = (predicted != asnumpy(split.labels)).nonzero()[0]
    return wrong, predicted[wrong]


def _epoch_axis(ax: Any, epochs: list[int]) -> None:
    """Whole epochs on the x axis: each one when there are few, else integer ticks."""
    from matplotlib.ticker import MaxNLocator

    if len(epochs) <= 12:
        ax.set_xticks(epochs)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)


def plot_curves(records: list[dict], out: Path, name: str = "curves.png") -> Path:
    """Loss (log scale) and accuracy per epoch: train, validation (if held out) and test, from
    a run's ``records`` (one per epoch, as ``metrics.jsonl`` holds them)."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val", "test"):
        if f"{split}_loss" in records[-1]:
            label = {"val": "validation"}.get(split, split)
            losses = [r.get(f"{split}_loss", np.nan) for r in records]
            accs = [100 * r.get(f"{split}_acc", np.nan) for r in records]
            ax_loss.plot(epochs, losses, "o-", label=label)
            ax_acc.plot(epochs, accs, "o-", label=label)
    ax_loss.set(ylabel="loss (log scale)", yscale="log", title="loss")
    ax_acc.set(ylabel="%", title="accuracy")
    for ax in (ax_loss, ax_acc):
        _epoch_axis(ax, epochs)
        ax.legend()
    return _save(fig, out / name)


def plot_filters(model: Module, out: Path, name: str = "filters.png") -> Path:
    """Every conv layer's filters, a mosaic each (red positive, blue negative)."""
    plt = _pyplot()
    layers = [(n, w, filter_mosaic(w)) for n, w in conv_filters(model)]
    heights = [max(m.shape[0] / m.shape[1], 0.08) for _, _, m in layers]  # full width each
    fig, axes = plt.subplots(
        len(layers), 1, figsize=(10, 9 * sum(heights) + 0.6 * len(layers)),
        height_ratios=heights, squeeze=False,
    )  # fmt: skip
    for ax, (layer, w, grid) in zip(axes[:, 0], layers, strict=True):
        limit = float(abs(w).max()) or 1.0
        cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.55")  # grey gaps: 0 is white
        image = ax.imshow(grid, cmap=cmap, vmin=-limit, vmax=limit)
        shown = "" if max(w.shape[:2]) <= MAX_TILES else f", first {MAX_TILES} of each"
        ax.set_title(
            f"{layer}: {w.shape[0]} filters of {w.shape[1]}x{w.shape[2]}x{w.shape[3]} "
            f"(columns: output channels, rows: input channels{shown})",
            fontsize=9,
        )
        ax.set(xticks=[], yticks=[])
        fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)
    return _save(fig, out / name)


def plot_misclassified(
    images: Any, labels: Any, wrong: Any, predicted: Any, out: Path,
    confidence: Any = None, name: str = "misclassified.png",
) -> Path:  # fmt: skip
    """The digits ``images[wrong]`` (host ``(N, H, W)``), titled true -> predicted, and the
    predicted class's probability when ``confidence`` (one per ``wrong``) is given."""
    plt = _pyplot()
    shown = min(len(wrong), 36 if confidence is None else 24)
    cols = 9 if confidence is None else 8
    rows = max(1, -(-shown // cols))
    high = 1.6 if confidence is None else 1.9  # room for two-line titles
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * high), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, index, guess) in enumerate(zip(axes.flat, wrong[:shown], predicted, strict=False)):
        ax.imshow(images[index], cmap="gray")
        title = f"{labels[index]} -> {guess}"
        if confidence is not None:
            title += f"\n{100 * confidence[i]:.1f} %"
        ax.set_title(title, fontsize=9)
    if confidence is None:
        fig.suptitle(f"{len(wrong)} misclassified test digits (true -> predicted)")
    else:
        fig.suptitle(
            f"the {shown} most confidently wrong of {len(wrong)} misclassified test digits "
            "(true -> predicted, probability given to the prediction)"
        )
    return _save(fig, out / name)


def plot_confusion(confusion: Any, out: Path, name: str = "confusion.png") -> Path:
    """``confusion (10, 10)`` counts (rows: true digit, columns: predicted) as a picture;
    colours on a log scale so that the few errors show beside the diagonal."""
    plt = _pyplot()
    confusion = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    shade = np.log1p(confusion)
    ax.imshow(shade, cmap="Blues")
    for (t, p), count in np.ndenumerate(confusion):
        if count:
            dark = shade[t, p] > 0.6 * shade.max()
            color = "white" if dark else ("black" if t == p else "firebrick")
            ax.text(p, t, str(count), ha="center", va="center", fontsize=8, color=color)
    accuracy = 100 * confusion.trace() / max(confusion.sum(), 1)
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true")
    ax.set_title(f"confusion matrix, {confusion.sum()} test digits, {accuracy:.2f} % right")
    return _save(fig, out / name)


def plot_feature_maps(
    image: Any, maps: list[tuple[str, Any]], probabilities: Any, out: Path,
    name: str = "feature_maps.png",
) -> Path:  # fmt: skip
    """One digit ``image (H, W)`` through the network: each layer's ``maps (C, H, W)`` as a
    row of pictures (8 or, if small, 16 per row; each layer on its own colour scale), and the
    ``probabilities (10,)`` of the output."""
    plt = _pyplot()

    def grid(m: Any) -> Any:
        if m.shape[1] * m.shape[2] == 1:  # 1x1 maps: one strip of pixels, no gaps
            return m.reshape(1, -1)
        return mosaic(m, min(len(m), 8 if m.shape[1] >= 10 else 16))

    grids = [(layer, m, grid(m)) for layer, m in maps]
    heights = [max(g.shape[0] / g.shape[1], 0.05) for _, _, g in grids]  # full width each
    fig = plt.figure(figsize=(10, 2.6 + 9.5 * sum(heights) + 0.35 * len(grids)))
    spec = fig.add_gridspec(len(grids) + 1, 2, height_ratios=[0.22, *heights], width_ratios=[1, 4])
    ax = fig.add_subplot(spec[0, 0])
    ax.imshow(image, cmap="gray")
    ax.set(xticks=[], yticks=[], title="input")
    ax = fig.add_subplot(spec[0, 1])
    guess = int(np.argmax(probabilities))
    ax.bar(range(10), 100 * probabilities, color=["C1" if d == guess else "C0" for d in range(10)])
    ax.set(xticks=range(10), ylim=(0, 100), ylabel="%", title="output probabilities")
    for row, (layer, m, grid) in enumerate(grids, start=1):
        ax = fig.add_subplot(spec[row, :])
        ax.imshow(grid, cmap="viridis")
        ax.set(xticks=[], yticks=[])
        ax.set_title(f"{layer}: {m.shape[0]} maps of {m.shape[1]}x{m.shape[2]}", fontsize=9)
    return _save(fig, out / name)


def plot_layer_stats(records: list[dict], out: Path, name: str = "layer_stats.png") -> Path:
    """Per-layer statistics per epoch (``stats.jsonl`` records, see :mod:`lenet_xp.training.stats`):
    activations' mean, std and zero fraction per layer; the weights' gradient mean and std
    and their update ratio ``||dw|| / ||w||`` per step (with its spread over the samples)."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in records]
    panels = [
        ("layers", "act_mean", "activation mean", "linear"),
        ("layers", "act_std", "activation std", "log"),
        ("layers", "act_zero", "activations that are 0 (fraction)", "linear"),
        ("params", "grad_mean", "weight gradient mean", "symlog"),
        ("params", "grad_std", "weight gradient std", "log"),
        ("params", "update_ratio_mean", "update ratio ||dw|| / ||w|| per step", "log"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    for ax, (group, stat, title, scale) in zip(axes.flat, panels, strict=True):
        names = list(dict.fromkeys(n for r in records for n in r.get(group, {})))
        if group == "params":
            names = [n for n in names if n.endswith("weight")]
        for i, layer in enumerate(names):
            entries = [r.get(group, {}).get(layer, {}) for r in records]
            values = [e.get(stat, np.nan) for e in entries]
            style = {"color": plt.get_cmap("tab20")(i % 20), "label": layer, "marker": "o"}
            if stat == "update_ratio_mean":
                spread = [e.get("update_ratio_std", 0) for e in entries]
                ax.errorbar(epochs, values, yerr=spread, capsize=3, **style)
            else:
                ax.plot(epochs, values, **style)
        if stat == "update_ratio_mean":
            ax.axhline(1e-3, color="gray", linestyle="--", linewidth=1, label="1e-3")
        ax.set_yscale(scale, **({"linthresh": 1e-6} if scale == "symlog" else {}))
        ax.set_title(title, fontsize=10)
        _epoch_axis(ax, epochs)
        if not names:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
    for row in axes:  # one legend per row, right of it
        if row[-1].get_legend_handles_labels()[0]:
            row[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    return _save(fig, out / name)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path
