"""``python -m lenet_xp.bench``: epoch time, images/s, launches per step, time to a target
accuracy, per-layer profile and peak memory.

Trains a preset (``--arch``, default LeNet-5; Adam, data resident on the device) with the
real training loop and prints tables. Engines: ``layers`` (the array-op layers, every
device), on CUDA also ``kernels`` (the layers with our CUDA kernels) and ``graph`` (the
layers' step captured as one CUDA graph); with ``--torch`` (``pip install
"lenet_xp[bench]"``) the same preset in PyTorch, eager (``torch``) and, on CUDA, as a captured CUDA
graph (``torch-graph``), timed in the same run, epochs alternating. Per preset:
``for a in lenet5 lenet5-nopad lenet5-sigmoid-avg lenet5-classic compact-cnn; do python -m
lenet_xp.bench --device cuda --arch $a --batch-sizes 128 1024 --torch; done``.
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import sys

from lenet_xp.backend import (
    Device,
    DeviceError,
    get_device,
    tune_host_allocator,
    use_device,
)
from lenet_xp.benchmarks import torch_reference as bench_torch
from lenet_xp.benchmarks.timing import (  # noqa: F401  (load_train_split: documented here)
    RACE_BATCH,
    RACE_LR,
    Timed,
    gpu_engine,
    load_train_split,
    machine_line,
    our_epoch,
    peak_memory_mib,
    preset_model,
    profile_layers,
    time_to_accuracy,
    timed,
    torch_engine,
)
from lenet_xp.data.augment import parse_augment
from lenet_xp.data.device_split import DeviceSplit, to_device_split
from lenet_xp.data.mnist import DataError, load_mnist
from lenet_xp.models.presets import PRESETS
from lenet_xp.optim.optimizers import Adam
from lenet_xp.training.config import default_workers
from lenet_xp.training.parallel import forward_backward


def _layers_engine(
    split: DeviceSplit, batch_size: int, args: argparse.Namespace, extras: bool = False
) -> Timed:
    """The layers; with ``extras``, training as ``--augment`` and ``--ema`` say."""
    augment = parse_augment(args.augment or "none") if extras else None
    ema_decay = args.ema if extras else None
    epoch, close = our_epoch(
        split, batch_size, args.workers, not args.plain_malloc, augment, ema_decay, args.arch
    )
    model = preset_model(args.arch).to(split.device)
    optimizer = Adam(model.parameters(), lr=1e-3)
    x, y = split.images[:batch_size], split.labels[:batch_size]

    def one_step() -> None:
        forward_backward(model, x, y)
        optimizer.step()

    return Timed("layers+aug" if extras else "layers", epoch, one_step, close)


def engines(
    args: argparse.Namespace, split: DeviceSplit, batch_size: int
) -> tuple[list[Timed], list[str]]:
    """The engines to time on this device, and one line per engine that could not run."""
    built, skipped = [], []
    names = ["layers"] + (["layers+aug"] if args.augment or args.ema else [])
    names += ["kernels", "graph"] if split.device.kind == "cuda" else []
    if args.torch:
        names += ["torch"] + (["torch-graph"] if split.device.kind == "cuda" else [])
    for name in names:
        try:
            if name == "layers":
                built.append(_layers_engine(split, batch_size, args))
            elif name == "layers+aug":
                built.append(_layers_engine(split, batch_size, args, extras=True))
            elif name in ("kernels", "graph"):
                built.append(gpu_engine(name, split, batch_size, args.epochs, args.arch))
            elif not bench_torch.available():
                skipped.append(f"{name}: PyTorch is not installed (pip install 'lenet_xp[bench]')")
            else:
                built.append(torch_engine(name, split, batch_size, args.arch))
        except Exception as exc:  # an engine that cannot run here is reported, not fatal
            skipped.append(f"{name}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
    return built, skipped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lenet_xp.bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--arch", default="lenet5", choices=list(PRESETS), help="the preset to time")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128], help="batch sizes to time")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per batch size (median)")
    p.add_argument(
        "--workers", type=int, default=default_workers(), help="CPU processes (see train --workers)"
    )
    p.add_argument("--torch", action="store_true", help="also time PyTorch on the same device")
    p.add_argument(
        "--time-to",
        type=float,
        default=None,
        metavar="ACC",
        help="also train each engine from scratch until this test accuracy (e.g. 0.99)",
    )
    p.add_argument(
        "--race-epochs", type=int, default=3, help="--time-to: epochs of the cosine schedule"
    )
    p.add_argument(
        "--augment",
        default=None,
        metavar="SPEC",
        help="also time the layers with this --augment spec (the cost of augmentation)",
    )
    p.add_argument(
        "--ema",
        type=float,
        default=None,
        metavar="DECAY",
        help="also time the layers averaging the weights (train --ema; with --augment: both)",
    )
    p.add_argument(
        "--plain-malloc",
        action="store_true",
        help="CPU: leave glibc's allocator as it is (to measure what tune_host_allocator buys)",
    )
    p.add_argument("--no-profile", action="store_true", help="skip the per-layer profile")
    p.add_argument("--data-dir", default=None, help="MNIST folder (else $LENET_XP_DATA)")
    p.add_argument(
        "--limit-train", type=int, default=60_000, help="train on the first N images (smoke runs)"
    )
    args = p.parse_args(argv)
    if args.limit_train < 20 * max(args.batch_sizes) or min(args.batch_sizes) <= 0:
        p.error("--limit-train must hold 20 batches of the largest --batch-sizes (warm-up)")
    try:
        device = get_device(args.device)
    except DeviceError as exc:
        print(f"lenet_xp.bench: error: {exc}", file=sys.stderr)
        return 1
    if device.kind == "cpu" and not args.plain_malloc:
        tune_host_allocator()
    with use_device(device):
        return _bench(args, device)


def _bench(args: argparse.Namespace, device: Device) -> int:
    """:func:`main` on the resolved ``device``, inside :func:`use_device`: prints the tables."""
    pad32 = preset_model(args.arch).input_size == 32
    split, source = load_train_split(device, args.data_dir, args.limit_train, pad32)
    print(f"lenet_xp bench on {device}: {machine_line(device)}; data: {source}; --arch {args.arch}")
    rows, notes, extra_costs = _time_engines(args, device, split)
    _print_epoch_table(rows, notes)
    _print_extra_costs(args, extra_costs)
    print(
        "launches: counted by scripts/count_launches.py on the CuPy stand-in; CUPTI: CUDA "
        "kernels and copies the GPU ran for one step (needs PyTorch's profiler; a graph "
        "replay's nodes)"
    )
    if args.time_to:
        _race(args, device, split)
    if not args.no_profile:
        _profile(args, device, split)
    what = "GPU pool" if device.kind == "cuda" else "RSS"
    print(f"\npeak memory: {peak_memory_mib(device):,.0f} MiB ({what})")
    if device.kind == "cpu" and args.workers > 1:
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"peak memory of the largest worker process: {children:,.0f} MiB (RSS)")
    return 0


def _time_engines(
    args: argparse.Namespace, device: Device, split: DeviceSplit
) -> tuple[list[tuple], list[str], dict[int, list[float]]]:
    """Every engine at every ``--batch-sizes``, ``--epochs`` epochs each, the engines taking
    turns. Returns the table's rows ``(batch size, engine, median epoch s, images/s,
    launches or None, CUPTI count or None, epoch time / torch's)``, a line for each engine
    not timed, and per batch size the extra cost of ``--augment``/``--ema`` (a fraction of
    the plain epoch) in each pair of epochs run back to back."""
    rows, notes = [], []
    extra_costs: dict[int, list[float]] = {}
    for batch_size in args.batch_sizes:
        built, skipped = engines(args, split, batch_size)
        notes += [f"batch {batch_size}: {line}" for line in skipped]
        times: dict[str, list[float]] = {engine.name: [] for engine in built}
        for _ in range(args.epochs):  # alternate the engines: all see the same conditions
            for engine in built:
                times[engine.name].append(timed(engine.epoch, device))
        if "layers+aug" in times:  # epochs run back to back compared: drift cancels
            pairs = zip(times["layers+aug"], times["layers"], strict=True)
            extra_costs[batch_size] = [extra / plain - 1 for extra, plain in pairs]
        reference = statistics.median(times["torch"]) if "torch" in times else math.nan
        for engine in built:
            seconds = statistics.median(times[engine.name])
            cupti = bench_torch.cupti_launches(engine.one_step) if device.kind == "cuda" else None
            rows.append(
                (batch_size, engine.name, seconds, len(split) / seconds, engine.issued, cupti,
                 seconds / reference)
            )  # fmt: skip
            engine.close()
    return rows, notes, extra_costs


def _print_epoch_table(rows: list[tuple], notes: list[str]) -> None:
    """The epoch table of :func:`_time_engines`'s rows, then the engines not timed."""
    print(f"\n{'batch':>6} {'engine':<12} {'epoch s':>9} {'images/s':>10} {'launches':>9} "
          f"{'CUPTI':>6} {'vs torch':>9}")  # fmt: skip
    for b, name, s, ips, issued, cupti, ratio in rows:
        issued_text = "-" if issued is None else str(issued)
        cupti_text = "-" if cupti is None else str(cupti)
        print(
            f"{b:>6} {name:<12} {s:>9.3f} {ips:>10,.0f} {issued_text:>9} {cupti_text:>6} "
            f"{ratio:>9.2f}"
        )
    for line in notes:
        print(f"not timed: {line}")


def _print_extra_costs(args: argparse.Namespace, extra_costs: dict[int, list[float]]) -> None:
    """One line per batch size: what ``--augment``/``--ema`` add to the layers' epoch."""
    for batch_size, costs in extra_costs.items():
        extras = [f"augmentation ({args.augment})"] if args.augment else []
        extras += [f"EMA {args.ema:g}"] if args.ema else []
        print(
            f"{' + '.join(extras)} at batch {batch_size}: "
            f"{100 * statistics.median(costs):+.1f} % epoch time (layers; median of "
            f"{len(costs)} pair{'s' * (len(costs) != 1)} of epochs run back to back, range "
            f"{100 * min(costs):+.1f} to {100 * max(costs):+.1f} %)"
        )


def _race(args: argparse.Namespace, device: Device, split: DeviceSplit) -> None:
    """The time-to-accuracy table: every engine from scratch on the real test set."""
    try:
        mnist = load_mnist(args.data_dir, download=False)
    except DataError as exc:
        print(f"\ntime to accuracy: skipped ({exc})")
        return
    test = to_device_split(mnist.test_images, mnist.test_labels, device)
    names = ["layers"] + (["kernels", "graph"] if device.kind == "cuda" else [])
    if args.torch and bench_torch.available():
        names += ["torch"] + (["torch-graph"] if device.kind == "cuda" else [])
    print(f"\ntime to {100 * args.time_to:.1f} % test accuracy from the first step (batch "
          f"{RACE_BATCH}, Adam, cosine from {RACE_LR:g} over {args.race_epochs} epochs, no "
          "augmentation; tested after each epoch, testing not timed)")  # fmt: skip
    print(f"{'engine':<12} {'setup s':>8} {'train s':>8} {'epochs':>6} {'test acc':>9}")
    for name in names:
        setup, seconds, epochs, acc = time_to_accuracy(
            name, split, test, args.time_to, args.race_epochs
        )
        print(f"{name:<12} {setup:>8.2f} {seconds:>8.2f} {epochs:>6} {100 * acc:>8.2f}%")


def _profile(args: argparse.Namespace, device: Device, split: DeviceSplit) -> None:
    """Per-layer forward/backward milliseconds of the array-op layers."""
    # What one worker does: its slice of the batch, with one BLAS thread.
    workers = args.workers if device.kind == "cpu" else 1
    slice_size = -(-args.batch_sizes[0] // workers)
    limits = None
    if workers > 1:
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(limits=1, user_api="blas")
    print(f"\nper-layer ms per step for one worker's slice of {slice_size} images (layers engine)")
    rows = profile_layers(split, slice_size)
    width = max(8, *(len(name) for name, _, _ in rows))
    print(f"{'layer':<{width}} {'forward':>8} {'backward':>9}")
    total_f = total_b = 0.0
    for name, f, b in rows:
        total_f, total_b = total_f + f, total_b + b
        print(f"{name:<{width}} {f:>8.3f} {b:>9.3f}")
    print(f"{'total':<{width}} {total_f:>8.3f} {total_b:>9.3f}")
    if limits is not None:
        limits.restore_original_limits()


if __name__ == "__main__":
    sys.exit(main())
