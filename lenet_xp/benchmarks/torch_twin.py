"""Any of our networks in PyTorch, layer for layer: the reference ``bench --torch`` times for
every preset, and what the tests compare our forward and backward with.

:func:`torch_twin` mirrors a model's named layers as ``torch.nn`` modules under the same
names, so :func:`lenet_xp.export.torch_state_dict`'s weights load into it (strict). LeCun's
layers have no ``torch.nn`` form and are written here: the scaled tanh, the trainable
subsampling, the partially connected C3 (an ``nn.Conv2d`` whose weight is multiplied by its
connection table's 0/1 mask, so the kernels outside the table stay zero while it trains) and
the RBF output; :func:`torch_loss` is the model's loss (LeCun's RBF loss where it has it).

PyTorch is an optional extra (``pip install "lenet_xp[bench]"``); nothing else imports this.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from lenet_xp import layers as L
from lenet_xp.backend import asnumpy, host_zeros
from lenet_xp.functional.loss import RBF_LOSS_J, rbf_loss


def _lecun_modules(torch: Any) -> dict[str, type]:
    nn = torch.nn

    class LeCunTanh(nn.Module):
        def forward(self, x: Any) -> Any:
            return L.LeCunTanh.amplitude * torch.tanh(L.LeCunTanh.slope * x)

    class Subsampling(nn.Module):  # weight * window sum + bias, per map
        def __init__(self, channels: int, k: int) -> None:
            super().__init__()
            self.k = k
            self.weight = nn.Parameter(torch.zeros(channels))
            self.bias = nn.Parameter(torch.zeros(channels))

        def forward(self, x: Any) -> Any:
            s = nn.functional.avg_pool2d(x, self.k) * self.k**2
            return s * self.weight[:, None, None] + self.bias[:, None, None]

    class PartialConv2d(nn.Conv2d):  # the dense weight times the table's mask
        def __init__(self, layer: L.PartialConv2d) -> None:
            o, i, k = layer.out_channels, layer.in_channels, layer.kernel
            super().__init__(i, o, k, stride=layer.stride, padding=layer.padding)
            mask = host_zeros((o, i, 1, 1), "float32")
            for out_map, row in enumerate(layer.table):
                mask[out_map, list(row)] = 1
            self.register_buffer("mask", torch.from_numpy(mask), persistent=False)

        def forward(self, x: Any) -> Any:
            return self._conv_forward(x, self.weight * self.mask, self.bias)

    class RBF(nn.Module):  # logits = -|x - c|^2; the centres fixed
        def __init__(self, classes: int, features: int) -> None:
            super().__init__()
            self.centres = nn.Parameter(torch.zeros(classes, features), requires_grad=False)

        def forward(self, x: Any) -> Any:
            return -((x[:, None, :] - self.centres) ** 2).sum(dim=2)

    return {"LeCunTanh": LeCunTanh, "Subsampling": Subsampling, "Partial": PartialConv2d,
            "RBF": RBF}  # fmt: skip


def _twin(layer: Any, torch: Any, lecun: dict[str, type]) -> Any:
    nn = torch.nn
    if isinstance(layer, L.PartialConv2d):
        return lecun["Partial"](layer)
    if isinstance(layer, L.Conv2d):
        o, i, k, _ = layer.weight.shape
        return nn.Conv2d(i, o, k, stride=layer.stride, padding=layer.padding)
    if isinstance(layer, L.Linear):
        return nn.Linear(layer.weight.shape[1], layer.weight.shape[0])
    if isinstance(layer, L.BatchNorm1d | L.BatchNorm2d):
        cls = nn.BatchNorm1d if isinstance(layer, L.BatchNorm1d) else nn.BatchNorm2d
        return cls(layer.weight.shape[0], eps=layer.eps, momentum=layer.momentum)
    if isinstance(layer, L.MaxPool2d | L.AvgPool2d):
        cls = nn.MaxPool2d if isinstance(layer, L.MaxPool2d) else nn.AvgPool2d
        return cls(layer.kernel, layer.stride)
    if isinstance(layer, L.TrainableSubsampling):
        return lecun["Subsampling"](layer.channels, layer.kernel)
    if isinstance(layer, L.RBFOutput):
        return lecun["RBF"](*layer.centres.shape)
    if isinstance(layer, L.LeakyReLU):
        return nn.LeakyReLU(layer.negative_slope)
    if isinstance(layer, L.Dropout):
        return nn.Dropout(layer.p)
    simple = {L.ReLU: nn.ReLU, L.Sigmoid: nn.Sigmoid, L.Tanh: nn.Tanh, L.Flatten: nn.Flatten,
              L.LeCunTanh: lecun["LeCunTanh"]}  # fmt: skip
    if type(layer) not in simple:
        raise ValueError(f"no PyTorch twin for {type(layer).__name__}")
    return simple[type(layer)]()


def torch_twin(model: L.Module, weights: bool = True) -> Any:
    """A ``torch.nn.Sequential`` with ``model``'s layers under their names (any preset), in
    ``model``'s dtype on the CPU; ``weights``: with ``model``'s weights (else PyTorch's
    initialisation, LeCun's layers' zeros)."""
    import torch

    lecun = _lecun_modules(torch)
    named = ((name, _twin(child, torch, lecun)) for name, child in model.named_children())
    net = torch.nn.Sequential(OrderedDict(named))
    net.to(torch.float64 if str(model.parameters()[0].data.dtype) == "float64" else torch.float32)
    if weights:
        net.load_state_dict(_torch_state(model, torch))  # strict
    return net


def _torch_state(model: L.Module, torch: Any) -> dict[str, Any]:
    """``model``'s parameters and buffers under PyTorch's names, as CPU tensors (a partial
    convolution's weight dense: ``lenet_xp.export``'s layout)."""
    state = {name: asnumpy(value) for name, value in model.state_dict().items()}
    for name, child in model.named_children():
        if isinstance(child, L.PartialConv2d):
            state[f"{name}.weight"] = asnumpy(child.dense_weight())
    return {name: torch.tensor(value) for name, value in state.items()}  # copies


def torch_loss(model: L.Module) -> Any:
    """``loss(logits, labels)`` of ``model`` in PyTorch: cross-entropy, or LeCun's RBF loss
    (cross-entropy with one more constant logit ``-j``) where the model has it."""
    import torch

    if getattr(model, "loss_fn", None) is not rbf_loss:
        return torch.nn.functional.cross_entropy

    def rbf(logits: Any, labels: Any) -> Any:
        rubbish = torch.full_like(logits[:, :1], -RBF_LOSS_J)
        return torch.nn.functional.cross_entropy(torch.cat([logits, rubbish], dim=1), labels)

    return rbf
