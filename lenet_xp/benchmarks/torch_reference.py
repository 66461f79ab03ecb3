"""PyTorch's side of ``lenet_xp.bench --torch``: the same network as ours, any preset (its
PyTorch twin, :mod:`lenet_xp.benchmarks.torch_twin`, from our initial weights), data already
on the device, Adam, trained eagerly or as one captured CUDA graph per step
(``torch.cuda.graphs``).

PyTorch is an optional extra (``pip install "lenet_xp[bench]"``); nothing else imports this.
"""

from __future__ import annotations

from typing import Any

from lenet_xp.backend import asnumpy
from lenet_xp.benchmarks.torch_twin import torch_loss, torch_twin
from lenet_xp.data.device_split import DeviceSplit
from lenet_xp.models.presets import Options, build


def available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


class TorchRun:
    """Preset ``arch`` in PyTorch on ``split``'s images (copied once to PyTorch's device), as
    ``train --arch`` builds it (seed 0, float32) and with its loss, Adam at a
    learning rate ``lr_of_step(step)`` (default: a constant 1e-3). ``graph=True`` (CUDA only)
    captures forward, loss, backward and the (capturable) Adam step once and replays it per
    batch; the batch is gathered into the graph's static input and the learning rate written
    into its tensor first. :meth:`epoch` runs one pass in a fresh random order."""

    def __init__(
        self, split: DeviceSplit, batch_size: int, graph: bool = False, lr_of_step: Any = None,
        arch: str = "lenet5",
    ) -> None:  # fmt: skip
        import torch

        self.torch = torch
        on_gpu = split.device.kind == "cuda"
        self.device = torch.device("cuda", split.device.index) if on_gpu else torch.device("cpu")
        if graph and not on_gpu:
            raise ValueError("a CUDA graph needs a CUDA device")
        if on_gpu:
            torch.cuda.set_device(self.device)  # streams and graphs go to --device's GPU
        torch.manual_seed(0)
        model = build(arch, Options())  # as bench's preset_model
        self.net = torch_twin(model).to(self.device)
        self.loss_fn = torch_loss(model)
        self.images = torch.from_numpy(asnumpy(split.images)).to(self.device)
        self.labels = torch.from_numpy(asnumpy(split.labels)).to(self.device)
        self.batch_size = batch_size
        self.lr_of_step = lr_of_step or (lambda step: 1e-3)
        self.steps = 0
        # A captured step reads the learning rate from a tensor (capturable Adam allows it).
        lr = torch.tensor(self.lr_of_step(0), device=self.device) if graph else self.lr_of_step(0)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr, capturable=graph)
        self.graph = None
        if graph:
            self._capture()

    def _loss(self, x: Any, y: Any) -> Any:
        return self.loss_fn(self.net(x), y)

    def _eager_step(self, x: Any, y: Any) -> None:
        loss = self._loss(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def _capture(self) -> None:
        torch, b = self.torch, self.batch_size
        self.static_x = self.images[:b].clone()
        self.static_y = self.labels[:b].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as the docs require
            for _ in range(3):
                self._eager_step(self.static_x, self.static_y)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            loss = self._loss(self.static_x, self.static_y)
            loss.backward()
            self.opt.step()

    def epoch(self, limit: int | None = None) -> None:
        """One pass over (the first ``limit`` of) a fresh permutation."""
        torch, b = self.torch, self.batch_size
        n = self.images.shape[0] if limit is None else limit
        order = torch.randperm(self.images.shape[0], device=self.device)[:n]
        group = self.opt.param_groups[0]
        for start in range(0, n, b):
            idx = order[start : start + b]
            lr = self.lr_of_step(self.steps)
            self.steps += 1
            if self.graph is not None:
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
            if self.graph is not None and idx.shape[0] == b:
                self.static_x.copy_(self.images[idx])
                self.static_y.copy_(self.labels[idx])
                self.graph.replay()
            else:  # eager, and the graph's short last batch
                self._eager_step(self.images[idx], self.labels[idx])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def accuracy(self, split: DeviceSplit) -> float:
        """Test accuracy of the current weights on ``split``."""
        torch = self.torch
        x = torch.from_numpy(asnumpy(split.images)).to(self.device)
        y = torch.from_numpy(asnumpy(split.labels)).to(self.device)
        with torch.no_grad():
            correct = sum(
                int((self.net(x[i : i + 2000]).argmax(1) == y[i : i + 2000]).sum())
                for i in range(0, x.shape[0], 2000)
            )
        return correct / x.shape[0]


def cupti_launches(step: Any) -> int | None:
    """CUDA kernels and memory operations the GPU ran during ``step()`` (any library of the
    process: CUPTI, through ``torch.profiler``); ``None`` without PyTorch or a GPU."""
    if not available():
        return None
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    from torch.autograd import DeviceType

    return sum(1 for event in prof.events() if event.device_type == DeviceType.CUDA)
