"""``LeNet5``: the modern LeNet-5 for 28x28 MNIST digits (61,706 parameters).

conv 1->6 5x5 pad 2 -> ReLU -> max-pool 2 -> conv 6->16 5x5 -> ReLU -> max-pool 2
-> flatten 400 -> fc 120 -> ReLU -> fc 84 -> ReLU -> fc 10 (logits).

Parameter names and layouts are PyTorch's (``conv1.weight (6, 1, 5, 5)``, ``fc1.weight
(120, 400)``, ...), so ``state_dict()`` moves to and from a PyTorch model unchanged.
"""

from __future__ import annotations

from typing import Any

from lenet_xp.backend import host_rng
from lenet_xp.functional.loss import softmax_cross_entropy
from lenet_xp.layers import Conv2d, Flatten, Linear, MaxPool2d, Module, ReLU, Sequential


class LeNet5(Sequential):
    """LeNet-5 on ``x (N, 1, 28, 28)`` -> logits ``(N, 10)``; weights drawn from ``seed``.

    With ``input_size=32`` (images padded to 32x32 beforehand, as in LeCun 1998) conv1 uses no
    padding; the parameters are the same either way.
    """

    def __init__(
        self,
        seed: int | None = 0,
        init: str = "pytorch",
        dtype: str = "float32",
        input_size: int = 28,
    ) -> None:
        if input_size not in (28, 32):
            raise ValueError(f"input_size must be 28 (padded in conv1) or 32, got {input_size}")
        rng = host_rng(seed)
        kw = {"init": init, "rng": rng, "dtype": dtype}
        self.input_shape = (1, input_size, input_size)
        # ReLU and max-pool commute exactly (max is monotone; both send the gradient to the
        # first maximum, or nowhere if it is <= 0), so ReLU runs after pooling on 4x fewer values.
        self.conv1 = Conv2d(1, 6, 5, padding=(32 - input_size) // 2, **kw)
        self.pool1, self.relu1 = MaxPool2d(2), ReLU(inplace=True)
        self.conv2 = Conv2d(6, 16, 5, **kw)
        self.pool2, self.relu2 = MaxPool2d(2), ReLU(inplace=True)
        self.flatten = Flatten()
        self.fc1 = Linear(16 * 5 * 5, 120, **kw)
        self.relu3 = ReLU(inplace=True)
        self.fc2 = Linear(120, 84, **kw)
        self.relu4 = ReLU(inplace=True)
        self.fc3 = Linear(84, 10, **kw)
        self.conv1.needs_input_grad = False  # the image needs no gradient


def model_loss(model: Module, logits: Any, labels: Any) -> tuple[Any, Any]:
    """``(mean loss, grad_logits)`` of ``model``'s output: its ``loss_fn`` if it has one (e.g.
    LeCun's RBF loss for ``lenet5-classic --output rbf``), else softmax cross-entropy. A
    ``loss_fn`` also takes ``kernels`` and ``sums`` as ``softmax_cross_entropy`` does: the GPU
    engines' step calls it so (one launch, the epoch's running sums included)."""
    loss_fn = getattr(model, "loss_fn", None)
    if loss_fn is not None:
        return loss_fn(logits, labels)
    return softmax_cross_entropy(logits, labels, model._kernels(logits))


def loss_and_grads(model: Module, x: Any, labels: Any) -> tuple[Any, dict[str, Any]]:
    """One forward and backward pass on a batch.

    ``x (N, 1, 28, 28)`` float, ``labels (N,)`` int. Returns ``(loss, grads)``: the mean
    softmax cross-entropy (a 0-d array on the model's device) and a dict of gradients keyed
    like ``model.state_dict()`` (``"conv1.weight"``, ...). Also sets each ``param.grad``.
    """
    logits = model.forward(x)
    loss, grad_logits = model_loss(model, logits, labels)
    model.backward(grad_logits)
    return loss, {name: param.grad for name, param in model.named_parameters()}
