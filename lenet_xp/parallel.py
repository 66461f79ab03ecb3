"""Data parallelism over CPU threads: each thread runs a slice of the batch.

NumPy runs elementwise work on one core while BLAS can use all of them; at LeNet's size the
elementwise work is the wall. Splitting each batch into ``threads`` slices, each run by a
replica of the model in its own thread with a single BLAS thread, keeps every core busy:
NumPy releases the GIL inside its loops. Replicas share the parameter arrays (so optimizer
updates reach all of them) and own their gradients and caches. Gradients of the slices are
combined in a fixed order, so the same seed gives the same numbers run after run (for a
given thread count).
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lenet_xp.backend import get_array_module
from lenet_xp.functional.loss import softmax_cross_entropy
from lenet_xp.layers import Module


def replicate(model: Module) -> Module:
    """A copy of ``model`` whose parameters share ``data`` arrays with ``model``'s."""
    if any(True for _ in model.named_buffers()):
        raise ValueError("models with buffers (batch-norm statistics) cannot be replicated")
    memo = {id(param.data): param.data for param in model.parameters()}
    return copy.deepcopy(model, memo)


def forward_backward(model: Module, x: Any, labels: Any) -> tuple[Any, Any]:
    """Forward, loss and backward on one batch: returns ``(loss, n_correct)`` as 0-d device
    arrays (no host sync) and leaves the gradients in ``param.grad``."""
    logits = model.forward(x)
    loss, grad_logits = softmax_cross_entropy(logits, labels)
    model.backward(grad_logits)
    return loss, (logits.argmax(axis=1) == labels).sum()


class DataParallel:
    """``model`` plus ``threads - 1`` replicas; ``forward_backward`` splits the batch."""

    def __init__(self, model: Module, threads: int) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.model = model
        self.replicas = [model] + [replicate(model) for _ in range(threads - 1)]
        self._pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def train(self, mode: bool = True) -> None:
        for replica in self.replicas:
            replica.train(mode)

    def eval(self) -> None:
        self.train(False)

    def _slices(self, n: int) -> list[slice]:
        k = min(len(self.replicas), n)
        bounds = [n * i // k for i in range(k + 1)]
        return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def forward(self, x: Any) -> Any:
        """Logits of ``x (N, ...)``, slices run in parallel."""
        if self._pool is None:
            return self.model.forward(x)
        parts = self._slices(x.shape[0])
        futures = [
            self._pool.submit(replica.forward, x[part])
            for replica, part in zip(self.replicas, parts, strict=False)
        ]
        return get_array_module(x).concatenate([f.result() for f in futures])

    def forward_backward(self, x: Any, labels: Any) -> tuple[Any, Any]:
        """As :func:`forward_backward` for the whole batch; the combined gradient (the
        slice-size-weighted mean) ends up in the parameters of ``self.model``."""
        if self._pool is None:
            return forward_backward(self.model, x, labels)
        n = x.shape[0]
        parts = self._slices(n)
        futures = [
            self._pool.submit(forward_backward, replica, x[part], labels[part])
            for replica, part in zip(self.replicas, parts, strict=False)
        ]
        results = [f.result() for f in futures]
        weights = [(part.stop - part.start) / n for part in parts]
        loss = sum(w * r[0] for w, r in zip(weights, results, strict=True))
        correct = sum(r[1] for r in results)
        params = [replica.parameters() for replica in self.replicas[: len(parts)]]
        for i, param in enumerate(params[0]):
            param.grad *= weights[0]
            for weight, other in zip(weights[1:], params[1:], strict=True):
                param.grad += weight * other[i].grad
        return loss, correct
