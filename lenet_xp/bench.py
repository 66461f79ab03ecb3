"""``python -m lenet_xp.bench``: epoch time, images/s, per-layer profile and peak memory.

Trains the default LeNet-5 (Adam, data resident on the device) with the real training loop
and prints tables. ``--torch`` trains the same network in PyTorch in the same run (if
installed: ``pip install "lenet_xp[bench]"``) and prints the time ratio.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any

from lenet_xp.backend import (
    Device,
    DeviceError,
    get_device,
    host_rng,
    synchronize,
    tune_host_allocator,
    use_device,
)
from lenet_xp.data import DeviceSplit, to_device_split
from lenet_xp.functional.loss import softmax_cross_entropy
from lenet_xp.mnist import DataError, load_mnist
from lenet_xp.model import LeNet5
from lenet_xp.optim import Adam
from lenet_xp.parallel import DataParallel
from lenet_xp.schedules import ConstantLR
from lenet_xp.train import default_workers, train_epoch


def load_train_split(device: Device, data_dir: str | None) -> tuple[DeviceSplit, str]:
    """MNIST's 60,000 training images on ``device``, or random images of the same size."""
    try:
        mnist = load_mnist(data_dir, download=False)
        return to_device_split(mnist.train_images, mnist.train_labels, device), "MNIST"
    except DataError:
        rng = host_rng(0)
        images = rng.integers(0, 256, (60_000, 28, 28), dtype="uint8")
        labels = rng.integers(0, 10, 60_000, dtype="uint8")
        return to_device_split(images, labels, device), "random images (MNIST not found)"


def our_epoch(
    split: DeviceSplit, batch_size: int, workers: int, tune_allocator: bool = True
) -> tuple[Any, Any]:
    """``(run_one_epoch, close)`` for lenet_xp's training loop, after a 20-step warm-up."""
    model = LeNet5(seed=0).to(split.device)
    workers = workers if split.device.kind == "cpu" else 1
    runner = DataParallel(model, workers, batch_size, tune_allocator=tune_allocator)
    optimizer = Adam(model.parameters(), lr=1e-3)
    rng, schedule = host_rng(0), ConstantLR(1e-3)
    n_warm = 20 * batch_size
    warmup = DeviceSplit(split.images[:n_warm], split.labels[:n_warm], split.device)
    train_epoch(runner, optimizer, schedule, warmup, batch_size, rng, 0, None)

    def epoch() -> None:
        train_epoch(runner, optimizer, schedule, split, batch_size, rng, 0, None)

    return epoch, runner.close


def profile_layers(
    split: DeviceSplit, batch_size: int, steps: int = 30
) -> list[tuple[str, float, float]]:
    """Mean milliseconds per step of each layer's forward and backward (device-synchronised)."""
    model = LeNet5(seed=0).to(split.device)
    names = [name for name, _ in model.named_children()]
    layers = model.layers()
    fwd, bwd = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    x, y = split.images[:batch_size], split.labels[:batch_size]

    def timed(fn: Any, arg: Any) -> tuple[Any, float]:
        synchronize(split.device)
        start = time.perf_counter()
        out = fn(arg)
        synchronize(split.device)
        return out, time.perf_counter() - start

    for step in range(steps + 3):
        h = x
        for name, layer in zip(names, layers, strict=True):
            h, dt = timed(layer.forward, h)
            fwd[name] += dt * (step >= 3)
        loss, g = softmax_cross_entropy(h, y)
        for name, layer in zip(reversed(names), reversed(layers), strict=True):
            g, dt = timed(layer.backward, g)
            bwd[name] += dt * (step >= 3)
    return [(n, 1e3 * fwd[n] / steps, 1e3 * bwd[n] / steps) for n in names]


def torch_epoch(split: DeviceSplit, batch_size: int) -> Any:
    """The same network, data in memory, Adam, in PyTorch eager: ``run_one_epoch`` (after a
    20-step warm-up), or ``None`` if PyTorch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    from lenet_xp.backend import asnumpy

    nn = torch.nn
    on_gpu = split.device.kind == "cuda"
    dev = torch.device("cuda", split.device.index) if on_gpu else torch.device("cpu")
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    ).to(dev)  # fmt: skip
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    images = torch.from_numpy(asnumpy(split.images)).to(dev)
    labels = torch.from_numpy(asnumpy(split.labels)).to(dev)
    n = images.shape[0]

    def epoch(limit: int = n) -> None:
        order = torch.randperm(n, device=dev)[:limit]
        for start in range(0, limit, batch_size):
            idx = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(net(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    epoch(20 * batch_size)
    return epoch


def timed(fn: Any, device: Device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def peak_memory_mib(device: Device) -> float:
    """Peak resident set size of this process (CPU), or the CuPy pool's bytes (GPU), in MiB."""
    if device.kind == "cuda":
        return device.xp.get_default_memory_pool().total_bytes() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def machine_line(device: Device) -> str:
    if device.kind == "cuda":
        props = device.xp.cuda.runtime.getDeviceProperties(device.index)
        return f"{props['name'].decode()} (CuPy {device.xp.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPUs, NumPy {device.xp.__version__}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lenet_xp.bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128], help="batch sizes to time")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per batch size (median)")
    p.add_argument(
        "--workers", type=int, default=default_workers(), help="CPU processes (see train --workers)"
    )
    p.add_argument("--torch", action="store_true", help="also time PyTorch on the same device")
    p.add_argument(
        "--plain-malloc",
        action="store_true",
        help="CPU: leave glibc's allocator as it is (to measure what tune_host_allocator buys)",
    )
    p.add_argument("--no-profile", action="store_true", help="skip the per-layer profile")
    p.add_argument("--data-dir", default=None, help="MNIST folder (else $LENET_XP_DATA)")
    args = p.parse_args(argv)
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
    split, source = load_train_split(device, args.data_dir)
    print(f"lenet_xp bench on {device}: {machine_line(device)}; data: {source}")
    rows = []
    for batch_size in args.batch_sizes:
        # Alternate ours and PyTorch's epochs, so that both see the same machine conditions.
        ours_epoch, close = our_epoch(split, batch_size, args.workers, not args.plain_malloc)
        theirs_epoch = torch_epoch(split, batch_size) if args.torch else None
        ours, theirs = [], []
        for _ in range(args.epochs):
            ours.append(timed(ours_epoch, device))
            if theirs_epoch is not None:
                theirs.append(timed(theirs_epoch, device))
        close()
        ours = statistics.median(ours)
        ref = statistics.median(theirs) if theirs else math.nan
        rows.append((batch_size, ours, len(split) / ours, ref, ours / ref if theirs else math.nan))
    print(f"\n{'batch':>6} {'epoch s':>9} {'images/s':>10} {'torch s':>9} {'ours/torch':>11}")
    for b, s, ips, ref, ratio in rows:
        print(f"{b:>6} {s:>9.2f} {ips:>10,.0f} {ref:>9.2f} {ratio:>11.2f}")
    if not args.no_profile:
        # What one worker does: its slice of the batch, with one BLAS thread.
        workers = args.workers if device.kind == "cpu" else 1
        slice_size = -(-args.batch_sizes[0] // workers)
        limits = None
        if workers > 1:
            from threadpoolctl import threadpool_limits

            limits = threadpool_limits(limits=1, user_api="blas")
        print(f"\nper-layer ms per step for one worker's slice of {slice_size} images")
        print(f"{'layer':<8} {'forward':>8} {'backward':>9}")
        total_f = total_b = 0.0
        for name, f, b in profile_layers(split, slice_size):
            total_f, total_b = total_f + f, total_b + b
            print(f"{name:<8} {f:>8.3f} {b:>9.3f}")
        print(f"{'total':<8} {total_f:>8.3f} {total_b:>9.3f}")
        if limits is not None:
            limits.restore_original_limits()
    what = "GPU pool" if device.kind == "cuda" else "RSS"
    print(f"\npeak memory: {peak_memory_mib(device):,.0f} MiB ({what})")
    if device.kind == "cpu" and args.workers > 1:
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"peak memory of the largest worker process: {children:,.0f} MiB (RSS)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
