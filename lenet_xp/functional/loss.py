"""Softmax cross-entropy on logits, mean over the batch. Pure functions."""

from __future__ import annotations

from typing import Any

from lenet_xp.backend import get_array_module


def log_softmax(logits: Any) -> Any:
    """Row-wise ``log softmax`` of ``logits (N, K)``, stable for any finite input (log-sum-exp)."""
    xp = get_array_module(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))


def softmax_cross_entropy(logits: Any, labels: Any) -> tuple[Any, Any]:
    """Mean cross-entropy of ``logits (N, K)`` against integer ``labels (N,)`` and its gradient.

    Returns ``(loss, grad_logits)``: ``loss`` is a 0-d array on the logits' device (no host
    sync), ``grad_logits (N, K) = (softmax(logits) - onehot(labels)) / N``.
    """
    xp = get_array_module(logits)
    n = logits.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels shape {labels.shape} does not match logits {logits.shape}")
    log_probs = log_softmax(logits)
    rows = xp.arange(n)
    loss = -log_probs[rows, labels].mean()
    grad_logits = xp.exp(log_probs)
    grad_logits[rows, labels] -= 1.0
    grad_logits *= 1.0 / n
    return loss, grad_logits
